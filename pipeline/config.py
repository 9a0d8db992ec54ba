"""Job configuration: pydantic models whose field descriptions are the documentation.

A job file (YAML) holds values only; everything it may say is declared here. Loading resolves
`${ENV_VAR}` references (for secrets) and `--set a.b=c` overrides before validation, so an invalid
job fails before any work starts, naming the field path and what is allowed.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

TaskName = Literal["ocr", "table", "caption", "video_caption"]
#: Columns the output tables may be partitioned by (pipeline/partitions.py): `date` is the UTC day of
#: `created_at` (a directory only; rows keep `created_at`).
PartitionKey = Literal["task", "status", "media_type", "run_id", "date"]
#: `name` of a task with its own prompt (and usually `json_schema` or `choices`); it needs an `id`.
CUSTOM_TASK = "custom"
FamilyName = Literal[
    "auto", "minicpmv4_6", "minicpmv4_7", "minicpm_ocr",
    "minicpmv2_0", "minicpmv2_5", "minicpmv2_6", "minicpmv4_0", "minicpmv4_5",
    "minicpmv1_0", "omnilmm_12b",
]


#: A name safe as one path segment and visible to Parquet readers (which skip `_`/`.` prefixes).
SAFE_SEGMENT = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Model(BaseModel):
    # Unknown keys are errors: a typo in a job file must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class S3Config(_Model):
    """Credentials and endpoint for `s3://` URIs (inputs, outputs and model checkpoints)."""

    endpoint_url: str | None = Field(
        None, description="S3 endpoint, e.g. http://127.0.0.1:8333 for a local server; unset means AWS. "
        "Falls back to AWS_ENDPOINT_URL."
    )
    access_key_id: SecretStr | None = Field(
        None, description="Access key; use `${AWS_ACCESS_KEY_ID}` in job files. Unset uses the standard AWS chain."
    )
    secret_access_key: SecretStr | None = Field(
        None, description="Secret key; use `${AWS_SECRET_ACCESS_KEY}`. Never logged or written to outputs."
    )
    region: str | None = Field(None, description="Region name; unset uses AWS_REGION / AWS_DEFAULT_REGION.")
    anon: bool = Field(False, description="Anonymous access (public buckets).")

    @field_validator("endpoint_url", "access_key_id", "secret_access_key", "region", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        # `${VAR:-}` in a job file yields "" when VAR is unset: treat it as "not configured".
        return None if v == "" else v


class StorageConfig(_Model):
    """How URIs are opened (any fsspec protocol)."""

    s3: S3Config = Field(default_factory=S3Config, description="Options for s3:// URIs.")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Extra fsspec storage options per protocol, e.g. {gcs: {project: p}}.",
    )


class InputConfig(_Model):
    """Where the corpus comes from."""

    uris: list[str] = Field(
        default_factory=list,
        description="Files, directories (listed recursively) or globs, on any fsspec filesystem "
        "(local paths, s3://bucket/prefix/, s3://bucket/**/*.pdf).",
    )
    manifest: str | None = Field(
        None, description="A Parquet, CSV or JSONL file with one input URI per row, in column `manifest_column`."
    )
    manifest_column: str = Field("uri", description="Column of the manifest that holds the URIs.")
    manifest_images_column: str | None = Field(
        None, description="Column of the manifest whose rows each list several image URIs (a list of strings, or "
        "one string of URIs separated by `|`, e.g. in CSV) that make ONE multi-image unit, the images in the order "
        "listed (e.g. the views of one product). Set, it replaces `manifest_column`. Such a source's `source_uri` is "
        "its URIs joined by `|`; each URI must name one image file (first frame used).",
    )
    max_sources: int | None = Field(None, ge=1, description="Stop after this many sources (sampling runs).")
    prompt_column: str | None = Field(
        None, description="Column of the manifest holding a per-row prompt for that row's source: plain text, or a "
        "template whose `{column}` fields are filled from the same row (`{{`/`}}` for literal braces). It replaces "
        "every task's prompt for that source; an empty or null cell keeps the task's own prompt. A template naming "
        "a column the manifest lacks, or a null cell, makes that source an error row `prompt_template` "
        "(pipeline/rowdata.py). The prompt enters the results' prompt_version, fingerprint and `prompt` columns."
    )
    pass_through: list[str] = Field(
        default_factory=list, description="Manifest columns copied to every results and documents row of the "
        "row's source, with their Arrow types (CSV/JSON: as pyarrow infers them), appended after our own columns: "
        "join keys for enriching a data lake. Names must not clash with our columns (`cpmv schema --output`)."
    )
    dedup: Literal["none", "content"] = Field(
        "none", description="`content`: sources with identical bytes (sha256, computed as they are read) are "
        "inferred once per run and set of tasks (and per-row prompt); every other copy gets the inferred rows with "
        "its own source_uri/source_id and `dedup_of` naming the source they were inferred from (pipeline/dedup.py)."
    )

    @model_validator(mode="after")
    def _some_input(self) -> "InputConfig":
        if not self.uris and not self.manifest:
            raise ValueError("set `input.uris` (a list of URIs/globs) or `input.manifest` (a file of URIs)")
        if self.manifest_images_column and not self.manifest:
            raise ValueError("input.manifest_images_column names a column of `input.manifest`: set input.manifest")
        return self

    @field_validator("pass_through")
    @classmethod
    def _own_names(cls, names: list[str]) -> list[str]:
        from schemas.records import DOCUMENTS_SCHEMA, STREAM_SCHEMA

        ours = set(STREAM_SCHEMA.names) | set(DOCUMENTS_SCHEMA.names)
        clash = [c for c in names if c in ours]
        if clash:
            raise ValueError(f"{', '.join(map(repr, clash))} clash with the pipeline's own output columns "
                             "(`cpmv schema --output`); rename the manifest column(s)")
        dupes = sorted({c for c in names if names.count(c) > 1})
        if dupes:
            raise ValueError(f"{', '.join(map(repr, dupes))} listed more than once")
        return names

    @model_validator(mode="after")
    def _row_columns(self) -> "InputConfig":
        if (self.prompt_column or self.pass_through) and not self.manifest:
            raise ValueError("input.prompt_column and input.pass_through read the manifest: set input.manifest")
        return self


class LimitsConfig(_Model):
    """Bounds on inputs; a source beyond one becomes an error row, never a crash or an OOM."""

    max_bytes: int = Field(512 * 2**20, ge=1, description="Largest source file read, in bytes.")
    max_pixels: int = Field(
        100_000_000, ge=1, description="Largest decoded image (width*height), checked from the header before decoding."
    )
    min_image_side: int = Field(
        4, ge=1, description="Smallest side, in pixels, of an image sent to the model; smaller images become "
        "`image_too_small` rows before the engine (the MiniCPM-V 2.x-4.5 image processors raise on images 1 or 3 "
        "pixels high: they take such an array for channels-first)."
    )
    max_pages: int = Field(2000, ge=1, description="Most pages expanded from one PDF; later pages become error rows.")
    max_video_seconds: float = Field(4 * 3600.0, gt=0, description="Longest video accepted, in seconds.")
    max_frames: int = Field(512, ge=1, description="Most frames sampled from one video in total.")
    source_timeout_s: float = Field(
        600.0, gt=0, description="Time one source's expansion may take (default 600 s; time spent waiting for the "
        "pipeline to take its output is not counted). Past it, the next unit and every later one become one error "
        "row `source_timeout` at that unit; in a run, a unit still running 5% (at least 1 s) past it has its "
        "preprocess worker stopped, with the same row on the retry."
    )
    page_timeout_s: float = Field(
        60.0, gt=0, description="Time one PDF page's planning (display list, text layer) or rendering may take, and "
        "one image frame's decoding (default 60 s). Past it, in a run, the preprocess worker is stopped (MuPDF and "
        "Pillow cannot be interrupted otherwise) and the unit becomes an error row `page_timeout`: the rest of a PDF goes "
        "on, a multi-frame image ends there. Video clips have only `source_timeout_s` (decoding time grows with "
        "`video.clip_seconds`)."
    )
    max_worker_memory_mb: int = Field(
        8192, ge=1, description="Resident memory (RSS, MiB) a preprocess worker may reach while it expands a source "
        "(default 8192). Past it the worker is stopped and replaced, and the unit it was on becomes an error row "
        "`worker_memory` (a PDF goes on with its next page)."
    )


class PdfConfig(_Model):
    """Page rendering."""

    min_dpi: float = Field(72.0, gt=0, description="Floor of the render resolution.")
    max_dpi: float = Field(300.0, gt=0, description="Cap of the render resolution.")
    extract_text_layer: bool = Field(True, description="Store each page's embedded text layer with the unit.")
    detect_text_orientation: bool = Field(
        True, description="Turn a page upright before inference when most of its text layer reads sideways or upside "
        "down (flag rotated_90/180/270); scans without a text layer are not turned."
    )
    plan_ahead_pages: int = Field(
        32, ge=1, le=256, description="Pages interpreted (display list, text layer, orientation) in a row before "
        "they are rendered in a row: each kind of work then runs with warm CPU caches (~10% faster on Letter "
        "pages). Only display lists wait, no pixels: tens of KB for a text page, but up to tens of MB for a page "
        "of dense vector drawings (maps, CAD), so lower it for such corpora."
    )
    text_layer_min_chars: int = Field(
        50, ge=1, description="`text_layer: use` trusts a page's text layer only with at least this many characters..."
    )
    text_layer_min_quality: float = Field(
        0.97, ge=0, le=1, description="...and at least this fraction of them printable (no U+FFFD, control or "
        "private-use glyphs, which broken font encodings produce)."
    )
    page_window: int = Field(
        1, ge=1, le=4, description="Pages per unit of the `table` task: 2 makes each table unit a page and the next "
        "one (tables that run over a page break), sent as two images in one prompt; the last page's window holds "
        "it alone. Result rows keep `page`'s unit_index (the first page) and list every page in `pages`. Window "
        "units are never tiled (each page fits the pixel budget). Other tasks keep one page per unit.",
    )

    @model_validator(mode="after")
    def _order(self) -> "PdfConfig":
        if self.min_dpi > self.max_dpi:
            raise ValueError(f"pdf.min_dpi ({self.min_dpi}) must not exceed pdf.max_dpi ({self.max_dpi})")
        return self


class TilingConfig(_Model):
    """Cutting images too large or too long for the model's slicer into overlapping tiles."""

    enabled: bool = Field(True, description="Tile posters, drawings and long receipts instead of shrinking them.")
    max_factor: float = Field(
        4.0, gt=1, description="Tile when fitting into one pixel budget would shrink the area more than this."
    )
    max_aspect: float = Field(8.0, gt=1, description="Tile images longer than this ratio (receipts, screenshots).")
    overlap: float = Field(0.05, ge=0, lt=0.5, description="Overlap between neighbouring tiles, as a fraction of a tile.")
    max_tiles: int = Field(16, ge=1, description="Most tiles per unit; beyond it tiles grow rather than content dropped.")
    min_page_dpi: float = Field(
        110.0, gt=0, description="A large PDF page (see min_page_area) whose budget DPI falls below this renders at "
        "it and is tiled (posters, drawings)."
    )
    min_page_area: float = Field(
        190.0, gt=0, description="Pages at least this large, in square inches (A3 is 193), may be tiled; smaller "
        "pages always render at the job's pixel budget."
    )


class ImageConfig(_Model):
    """Image decoding."""

    multi_frame: Literal["auto", "first", "all"] = Field(
        "auto", description="Multi-frame files. `auto`: every page of a multi-page still (TIFF, DCX) is a unit, "
        "like a PDF page; an animation (GIF, APNG, WebP, FLI) gives its first frame (flag `animation_first_frame`); "
        "other multi-image files (PSD layers, icon sizes) their main image. `first`: the first frame only (a "
        "multi-page still is then `partial`, flag `multi_frame_first_only`). `all`: every frame."
    )
    max_frames: int = Field(
        64, ge=1, description="Most frames (pages) taken from one image file; beyond it the document is `partial` "
        "(flag `multi_frame_capped`)."
    )


class VideoConfig(_Model):
    """Video sampling."""

    clip_seconds: float = Field(30.0, gt=0, description="Length of one clip (one inference unit), in seconds.")
    fps: float = Field(1.0, gt=0, description="Frames sampled per second of video.")
    max_frames_per_clip: int = Field(
        16, ge=1, description="Most frames per clip; sampling is uniform when capped. With stack_frames: most main "
        "frames per clip (4.6's max_num_frames; sub-frames up to stack_frames-1 times as many)."
    )
    max_side: int | None = Field(
        None, ge=28, description="Longest side of a sampled frame, in pixels (resized on CPU). Unset: frames go at "
        "the size the model's processor uses for them (e.g. 602x336 for a 1920x1080 frame on 2.6-4.5), never below."
    )
    stack_frames: int = Field(
        1, ge=1, le=8,
        description="MiniCPM-V 4.6 / MiniCPM-OCR 1.0 only (transformers engine): sample each clip as 4.6 does with "
        "its `stack_frames` option, main frames at 1 per second plus stack_frames-1 sub-frames per second, which "
        "the model sees stacked into one composite image next to each main frame. 1: off.",
    )

    @model_validator(mode="after")
    def _stacking(self) -> "VideoConfig":
        if self.stack_frames > 1 and self.fps != 1:
            raise ValueError(
                f"video.stack_frames={self.stack_frames} samples main frames at 1 per second (MiniCPM-V 4.6's "
                f"layout) but video.fps is {self.fps}: set video.fps: 1, or video.stack_frames: 1"
            )
        return self


class ModelConfig(_Model):
    """Which MiniCPM-V checkpoint to run."""

    name: str = Field(
        "openbmb/MiniCPM-V-4.6",
        description="Hub id, local directory, or s3:// prefix holding the checkpoint; `tiny` builds a tiny random "
        "model offline (smoke runs).",
    )
    family: FamilyName = Field("auto", description="Model generation; `auto` reads it from the checkpoint config.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; `auto` is bfloat16 on GPU and float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Run code from the model repository. Off unless a job asks.")
    max_slice_nums: int | None = Field(None, ge=1, description="Slices per image; unset uses the family default.")
    use_image_id: bool | None = Field(None, description="Prefix images with an id tag; unset uses the family default.")
    downsample_mode: Literal["4x", "16x"] | None = Field(
        None, description="4.6/OCR visual token downsampling; unset uses the checkpoint's."
    )
    cache_dir: str | None = Field(None, description="Where downloaded checkpoints are kept on each node.")


class VLLMOptions(_Model):
    """vLLM engine settings (engine.kind: vllm)."""

    max_model_len: int = Field(8192, ge=256, description="Context length; longer prompts become error rows first.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica (a placement group per replica).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use.")
    load_format: Literal["auto", "dummy"] = Field("auto", description="`dummy`: random weights (tests, benchmarks).")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (faster start, slower decode).")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences vLLM schedules at once per replica.")
    cpu_kvcache_space_gib: float = Field(2.0, gt=0, description="KV cache size when vLLM runs on CPU.")


class OpenAIOptions(_Model):
    """OpenAI-compatible HTTP engine settings (engine.kind: openai), e.g. an existing `vllm serve`."""

    base_url: str | None = Field(None, description="Server root, e.g. http://vllm.internal:8000 (required for openai).")
    served_model: str | None = Field(None, description="Model name the server knows; unset uses model.name.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (never logged).")
    concurrency: int = Field(16, ge=1, description="Requests in flight per engine actor.")
    timeout_s: float = Field(600.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(4, ge=0, description="Retries with backoff on 429, 5xx and connection errors.")


class EngineConfig(_Model):
    """Inference engine and its actor pool (wired in pipeline/resources.py only)."""

    kind: Literal["auto", "transformers", "vllm", "openai"] = Field(
        "auto", description="`vllm` (GPU serving), `transformers` (CPU, MPS or CUDA), `openai` (an HTTP server); "
        "`auto` picks vLLM when the cluster has GPUs and vLLM is installed, else transformers."
    )
    replicas: int = Field(1, ge=1, description="Engine actors (model copies) in the pool.")
    batch_size: int = Field(4, ge=1, description="Units handed to one engine call.")
    gpus_per_replica: float | None = Field(
        None, ge=0, description="GPUs per engine actor (fractions allowed); unset: 1 if the cluster has GPUs, else 0."
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs reserved per engine actor.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Torch device; `auto` picks cuda, mps, cpu.")
    max_retries: int = Field(1, ge=0, description="Retries of a failed engine call, one unit at a time, before error rows.")
    reslice_on_overflow: bool = Field(
        True,
        description="A unit whose estimated prompt (text + visual tokens + max_new_tokens) exceeds the context "
        "(engine.vllm.max_model_len; the checkpoint's max_position_embeddings for transformers) is retried with "
        "fewer slices (max_slice_nums halved until it fits or 1; flag `resliced_<n>`) instead of becoming a "
        "`prompt_too_long` error row. vLLM's 2.x-4.5 models fix slices per engine and are never re-sliced.",
    )
    max_restarts: int = Field(
        3, ge=0, description="Restarts of an engine actor whose process died (OOM, segfault), each retrying its "
        "in-flight batch; beyond this the job stops rather than looping forever.",
    )
    vllm: VLLMOptions = Field(default_factory=VLLMOptions, description="vLLM settings.")
    openai: OpenAIOptions = Field(default_factory=OpenAIOptions, description="OpenAI-compatible server settings.")

    @model_validator(mode="after")
    def _openai_needs_url(self) -> "EngineConfig":
        if self.kind == "openai" and not self.openai.base_url:
            raise ValueError("engine.kind openai needs engine.openai.base_url (e.g. http://host:8000)")
        return self


class ExampleConfig(_Model):
    """One few-shot example: an image and the answer the model should give for it (pipeline/examples.py)."""

    image: str = Field(..., min_length=1, description="URI of the example image (any fsspec URI, e.g. s3://b/ex1.png); "
                       "read once per engine actor through the same storage layer, limits and slicing as inputs.")
    answer: str = Field(..., description="The answer to the task's prompt for that image, put in as the model's "
                        "own earlier reply.")


class TaskConfig(_Model):
    """One task run over every unit it applies to."""

    name: TaskName | Literal["custom"] = Field(
        ..., description="`ocr`, `table` (markdown), `caption` (images, pages), `video_caption`, or `custom` (your "
        "own `prompt`, with an `id`; it applies to pages, images and clips)."
    )
    id: str | None = Field(
        None, pattern=SAFE_SEGMENT, max_length=64,
        description="The task's name in outputs (`results.task`, `json_<id>` columns, fingerprints); unset: `name`. "
        "Required for `custom`; lets one job run a built-in task twice (e.g. `caption` and a `caption` with a "
        "json_schema under id `caption_json`). Letters, digits, `_.-`."
    )
    json_schema: dict[str, Any] | str | None = Field(
        None, description="Structured output: a JSON Schema the reply must follow, given inline (a mapping), as a "
        "path to a .json file, or as a pydantic model's import path `package.module:Model`; resolved to the "
        "schema itself when the job loads. Decoding is constrained to it (vLLM structured outputs; the OpenAI "
        "engine's `response_format`; xgrammar for transformers) and every reply is validated (jsonschema): an "
        "invalid one fails the reply check `invalid` (retried, then `reply_invalid` with `validation_error`). The "
        "parsed value goes to the results column `json_<id>` (README: Structured output)."
    )
    choices: list[str] | None = Field(
        None, min_length=2, description="Label task: the reply is exactly one of these strings (decoding "
        "constrained to the list); written to the categorical results column `label`. A reply outside the list "
        "fails the reply check `invalid`."
    )
    thinking: bool = Field(
        False, description="Let the model reason before it answers (MiniCPM-V 4.5, 4.6 and 4.7: their chat "
        "templates' `enable_thinking`); the reasoning goes to the results column `reasoning`, never into `text`. "
        "Refused for generations without a thinking mode. Give it a larger `max_new_tokens`: the reasoning counts."
    )
    max_new_tokens: int = Field(1024, ge=1, description="Generation cap per unit.")
    temperature: float = Field(0.0, ge=0, description="0 is greedy decoding.")
    prompt: str | None = Field(None, description="Replace the built-in prompt (its version becomes `custom-<hash>`).")
    text_layer: Literal["ignore", "hint", "use"] = Field(
        "ignore",
        description="PDF text layer: `ignore` it; `hint`: add it to the prompt as an anchor (olmOCR-style); `use`: "
        "skip the model for pages whose text layer passes pdf.text_layer_min_chars/min_quality (results "
        "`output_source` = text_layer). Scans and broken layers still go to the model.",
    )
    hint_max_chars: int = Field(4000, ge=100, description="With `hint`, the most text-layer characters put in a prompt.")
    retries: int = Field(
        3, ge=0, le=10, description="Times a unit whose reply fails a reply check (`checks`) is asked again before "
        "it becomes an error row `reply_*` (or, for OCR of a page with a usable text layer, falls back to it)."
    )
    retry_temperatures: list[float] = Field(
        [0.2, 0.5, 0.8], description="Temperature of each retry in order (the first attempt uses `temperature`; the "
        "last value repeats when `retries` is longer). A greedy reply that loops or runs to the cap does the same "
        "again at temperature 0, so retries sample (olmOCR's schedule).",
    )
    retry_max_new_tokens: int | None = Field(
        None, ge=1, description="Token cap of a retry after a reply cut at the cap (`reply_truncated`); unset keeps "
        "`max_new_tokens`. Other failed checks retry with `max_new_tokens`."
    )
    examples: list[ExampleConfig] = Field(
        default_factory=list, max_length=8,
        description="Few-shot examples (image and answer pairs) put before each unit as earlier user/assistant turns, "
        "in the model generation's own multi-image chat format; the user turn of each example is its image and this "
        "task's prompt. Not for `video_caption`, nor MiniCPM-V 2.0 (one image per prompt). Their content (image "
        "bytes and answers) is part of the resume fingerprint.",
    )

    @model_validator(mode="after")
    def _examples_apply(self) -> "TaskConfig":
        if self.examples and self.name == "video_caption":
            raise ValueError("tasks[].examples: few-shot examples are images and cannot go before a video clip; "
                             "remove `examples` from the video_caption task")
        return self

    @field_validator("retry_temperatures")
    @classmethod
    def _temperatures(cls, v: list[float]) -> list[float]:
        if any(t < 0 for t in v):
            raise ValueError(f"temperatures must be >= 0, got {v}")
        return v

    @property
    def key(self) -> str:
        """The task's name in outputs: `id`, else `name`."""
        return self.id or self.name

    @field_validator("choices")
    @classmethod
    def _choices(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(set(v)) != len(v) or any(not c.strip() for c in v)):
            raise ValueError(f"choices must be distinct, non-blank strings, got {v}")
        return v

    @model_validator(mode="after")
    def _structured(self) -> "TaskConfig":
        if self.name == CUSTOM_TASK and (not self.id or not self.prompt):
            raise ValueError("a `custom` task needs an `id` (its name in outputs) and a `prompt`")
        if self.json_schema is not None and self.choices is not None:
            raise ValueError(f"task {self.key}: set `json_schema` or `choices`, not both (a label is a JSON "
                             "schema `enum`: put it in the schema, or keep `choices` alone)")
        if self.thinking and (self.json_schema is not None or self.choices is not None):
            raise ValueError(f"task {self.key}: `thinking` cannot be combined with `json_schema`/`choices` (constrained "
                             "decoding would forbid the reasoning block): run them as two tasks")
        if self.json_schema is not None:
            from pipeline.structured import load_schema

            self.json_schema = load_schema(self.json_schema)
        return self


class ChecksConfig(_Model):
    """Checks every model reply passes before it is an `ok` row (pipeline/checks.py); a reply that fails one is
    retried (`tasks[].retries`) and then becomes an error row `reply_truncated`, `reply_repetitive`, `reply_empty`
    or `reply_invalid`, with the reply kept in `text` for inspection."""

    enabled: bool = Field(True, description="Run the checks; off, every reply is `ok` (a reasoning block is still "
                          "removed from `text`).")
    truncated: bool = Field(True, description="A reply cut at the token cap (finish_reason `length`) fails: the end "
                            "of the page or table is missing.")
    repetition_min_share: float = Field(
        0.4, gt=0, le=1, description="A reply fails as repetitive when one loop covers at least this share of its "
        "characters (whitespace collapsed): a chunk of up to `repetition_max_period` characters repeated back to back, "
        "or one line repeated anywhere, `repetition_min_repeats` times or more."
    )
    repetition_min_repeats: int = Field(8, ge=2, description="Fewest repeats of the chunk or line that count as a loop.")
    repetition_max_period: int = Field(256, ge=1, le=4096, description="Longest repeated chunk looked for, in characters.")
    repetition_min_chars: int = Field(
        64, ge=1, description="Loops shorter than this many characters never fail a reply (a row of dots, `|---|---|`)."
    )
    allow_empty_tasks: list[TaskName] = Field(
        default_factory=lambda: ["table"], description="Tasks whose empty reply (not cut at the cap) is a valid "
        "answer: `table` by default, whose prompt asks for nothing on a page without tables (most pages); add "
        "`ocr` for corpora with blank pages. For other tasks an empty, whitespace-only or null reply fails as "
        "`reply_empty`."
    )
    reasoning_tags: tuple[str, str] = Field(
        ("<think>", "</think>"), description="Open and close tags of a reasoning block. The block is removed from "
        "`text`; a reply that is only a reasoning block (or one the cap cut inside it) has no answer."
    )
    validate_tasks: bool = Field(True, description="Task validity checks: a `table` reply must parse into tables of "
                                 "at least one row with a consistent column count (pipeline/tables.py).")
    text_layer_fallback: bool = Field(
        True, description="OCR of a PDF page whose every attempt failed uses the page's text layer instead when it "
        "passes pdf.text_layer_min_chars/min_quality (`output_source` text_layer_fallback; `retry_reasons` says why)."
    )


class DocumentsConfig(_Model):
    """How unit outcomes make a document's status."""

    max_failed_unit_share: float = Field(
        0.1, ge=0, le=1, description="A document with more than this share of failed units (any task in error) is "
        "`error`; with fewer, but at least one, `partial`. A document with no ok result is always `error`."
    )


class OutputConfig(_Model):
    """Where results go."""

    uri: str = Field(..., description="Output prefix (local dir or s3://bucket/prefix); tables go under it.")
    rows_per_file: int = Field(
        50_000, ge=1, description="Most result rows per Parquet file: a commit window closes early when it holds "
        "this many."
    )
    commit_every_s: float = Field(
        300.0, gt=0, description="Publish the sources completed so far at least this often, in seconds (a commit "
        "window). A crash loses at most the work of one window; each window adds one results and one documents "
        "file, so very short windows make many small files."
    )
    commit_every_units: int = Field(
        5000, ge=1, description="...or as soon as the completed sources hold this many units (pages, images, tiles, "
        "clips), whichever comes first."
    )
    commit_retry_s: float = Field(
        600.0, ge=0, description="How long a commit keeps retrying, with backoff, while the output store fails "
        "(an S3 server restarting) before the run stops with status `failed` (what was published stays)."
    )
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field("zstd", description="Parquet compression codec.")
    create_bucket: bool = Field(
        False, description="Create the output bucket when it does not exist; by default a missing bucket stops the "
        "run before any work (a typo must not create a bucket)."
    )

    partition_by: list[PartitionKey] = Field(
        [], description="Hive-style partition directories, outermost first, e.g. [task] writes "
        "`results/task=ocr/<file>.parquet`: `task`, `status`, `media_type`, `run_id` or `date` (the UTC day of "
        "`created_at`). `documents` is partitioned by those of them it has (all but `task`). The columns move from "
        "the files into the directory names, as Spark and pyarrow write them; a null `media_type` is `unknown`. "
        "A prefix keeps the partitioning it was first written with: changing it needs a new output.uri."
    )
    min_rows_per_file: int = Field(
        0, ge=0, description="Fewest result rows a file set should hold before a new one is started: a commit "
        "window then replaces the run's last, still small files by copies with its own rows appended (one atomic "
        "write per file, so readers never see a row twice or miss one), instead of adding small files. The next "
        "run continues the last one. Costs rewriting the open file once per window. 0 (default): one file set per "
        "window. At most output.rows_per_file."
    )

    @field_validator("uri")
    @classmethod
    def _safe_uri(cls, uri: str) -> str:
        return normalize_output_uri(uri)

    @field_validator("partition_by")
    @classmethod
    def _unique_keys(cls, keys: list[str]) -> list[str]:
        if len(set(keys)) != len(keys):
            raise ValueError(f"output.partition_by {keys} names a column twice: name each once")
        return keys

    @model_validator(mode="after")
    def _file_sizes(self) -> "OutputConfig":
        if self.min_rows_per_file > self.rows_per_file:
            raise ValueError(f"output.min_rows_per_file ({self.min_rows_per_file}) is above output.rows_per_file "
                             f"({self.rows_per_file}): lower it or raise rows_per_file")
        return self


def normalize_output_uri(uri: str) -> str:
    """`uri` with a local path normalised (`out/a/../x` -> `out/x`); refuses an empty URI, a remote one
    with `.`/`..` segments (object stores take them literally: S3 answers `Bad Request`) and one with
    no bucket. Raises ValueError naming the fix.
    """
    uri = uri.strip()
    if not uri:
        raise ValueError("output.uri is empty: name a directory or a prefix such as s3://bucket/out "
                         "(an empty one would write into the current directory)")
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        return os.path.normpath(path) if path else path
    scheme, rest = uri.split("://", 1)
    segments = rest.rstrip("/").split("/")
    if not segments[0]:
        raise ValueError(f"output.uri {uri!r} names no bucket: use {scheme}://BUCKET/PREFIX")
    if any(seg in (".", "..") for seg in segments) or any(not seg for seg in segments[1:]):
        raise ValueError(f"output.uri {uri!r} has '.', '..' or empty segments, which object stores take "
                         f"literally: write the prefix it means without them")
    return f"{scheme}://{'/'.join(segments)}"


class RayConfig(_Model):
    """The Ray cluster the job runs on."""

    address: str | None = Field(
        None, description="Existing cluster (`auto`, ray://host:10001); unset starts a local one. Falls back to RAY_ADDRESS."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster; unset uses the machine's.")
    plan_restarts: int = Field(
        2, ge=0, description="Times a run rebuilds its Ray Data plan for the sources not yet complete after the "
        "plan failed (an engine actor out of restarts, a task Ray gave up on); complete sources are kept. Then the "
        "run ends as `failed` and the next run redoes the rest."
    )
    preprocess_concurrency: int | None = Field(
        None, ge=1, description="CPU actors that expand and preprocess sources; unset sizes it from the cluster."
    )
    metrics_export_port: int | None = Field(
        None, ge=1, le=65535, description="Port of a local cluster's Prometheus endpoint "
        "(http://127.0.0.1:PORT/metrics, the run's metrics among Ray's: pipeline/metrics.py); unset lets Ray pick "
        "one. A cluster that is joined keeps the port it was started with."
    )


class JobConfig(_Model):
    """A cpmv-batch job: inputs, model, tasks and outputs."""

    # Both become file-name prefixes of every output file: a leading `_` or `.` would hide the files
    # from pyarrow, pandas, DuckDB and Spark (they skip such names), and a path separator or a very
    # long name would fail only at the first commit.
    name: str = Field("job", pattern=SAFE_SEGMENT, max_length=100,
                      description="Job name, used in run ids (letters, digits, `_.-`; starts with a letter or digit).")
    run_id: str | None = Field(
        None, pattern=SAFE_SEGMENT, max_length=100,
        description="Run id (as `name`); unset makes one from the job name and the time."
    )
    input: InputConfig = Field(..., description="Inputs.")
    output: OutputConfig = Field(..., description="Outputs.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Engine and its actor pool.")
    tasks: list[TaskConfig] = Field(
        default_factory=lambda: [TaskConfig(name="ocr")], min_length=1, description="Tasks to run."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Filesystem options.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Input bounds.")
    pdf: PdfConfig = Field(default_factory=PdfConfig, description="PDF rendering.")
    image: ImageConfig = Field(default_factory=ImageConfig, description="Image decoding.")
    video: VideoConfig = Field(default_factory=VideoConfig, description="Video sampling.")
    tiling: TilingConfig = Field(default_factory=TilingConfig, description="Tiling of oversized images and pages.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster.")
    checks: ChecksConfig = Field(default_factory=ChecksConfig, description="Reply checks and their thresholds.")
    documents: DocumentsConfig = Field(default_factory=DocumentsConfig, description="Document status rules.")

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        names = [t.key for t in tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"each task may appear once (give a second one its own `id`); repeated: {', '.join(dupes)}")
        return tasks


class ConfigError(ValueError):
    """A job file that cannot run; the message names the field and the fix."""


SECRET_OPTION_NAME = re.compile(r"(secret|passw|token|key|credential|auth|signature|private|sas)", re.IGNORECASE)
"""Storage option names whose values are credentials (`key`, `secret`, `token`, `password`,
`account_key`, `sas_token`, an `Authorization` header...), in any protocol and at any depth."""
MASK = "**********"
"""What a masked value reads as (the same as pydantic's SecretStr)."""
_URL_USERINFO = re.compile(r"(://)[^/@\s:]+:[^/@\s]+@")


def mask_secrets(value: Any, secret: bool = False) -> Any:
    """A copy of JSON-like `value` with every value under a credential-like key (SECRET_OPTION_NAME),
    whatever its type, replaced by MASK, and `user:password@` removed from URLs in strings."""
    if secret and value is not None:
        return MASK
    if isinstance(value, dict):
        return {k: mask_secrets(v, bool(SECRET_OPTION_NAME.search(str(k)))) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_secrets(v) for v in value]
    if isinstance(value, str):
        return _URL_USERINFO.sub(r"\1***@", value)
    return value


def public_dump(job: JobConfig) -> dict[str, Any]:
    """The job as JSON for people and records (`cpmv validate`, runs/<attempt>.json): SecretStr fields
    and every credential-like storage option masked. Never dump a job any other way where it is shown
    or stored."""
    data = _mask_urls(job.model_dump(mode="json"))
    # Key names decide only inside storage.options: elsewhere "max_new_tokens" is no credential.
    data["storage"]["options"] = mask_secrets(data["storage"]["options"])
    return data


def _mask_urls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_urls(v) for v in value]
    return _URL_USERINFO.sub(r"\1***@", value) if isinstance(value, str) else value


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, path: str = "") -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in strings, recursively; a missing variable is an error."""
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable {name} is not set (referenced as ${{{name}}})")
        return _ENV_REF.sub(sub, value)
    return value


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set engine.batch_size=8")
    key, raw = item.split("=", 1)
    # YAML parsing gives numbers, booleans, lists (`[a, b]`) and null their natural types.
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides to a raw job mapping (lists are indexed by number: tasks.0.name=ocr)."""
    for item in overrides:
        keys, value = _parse_override(item)
        node: Any = data
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"--set {item!r}: {'.'.join(keys[:i])} has no item {key}")
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
            elif isinstance(node, dict):
                if last:
                    node[key] = value
                elif key not in node and keys[i + 1].isdigit():
                    raise ConfigError(f"--set {item!r}: {'.'.join(keys[:i + 1])} has no item {keys[i + 1]} "
                                      f"(the job file does not list it; set the whole list instead)")
                else:
                    node = node.setdefault(key, {})
            else:
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[:i])} is not a mapping")
    return data


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid job {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `cpmv schema` lists the fields)"
        elif e["type"] == "string_pattern_mismatch" and e.get("ctx", {}).get("pattern") == SAFE_SEGMENT:
            msg = (f"{e.get('input')!r} is not a safe name: use letters, digits, `_`, `.` and `-`, starting with "
                   "a letter or digit")
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")  # our validators' messages stand on their own
        lines.append(f"  {loc}: {msg}")
    if len(lines) == 2:  # one error: one line
        return f"{lines[0]} {lines[1].strip()}"
    return "\n".join(lines)


def load_job_data(data: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>") -> JobConfig:
    """Validate a raw job mapping after overrides and `${ENV}` interpolation."""
    data = apply_overrides(copy.deepcopy(data), overrides or [])
    data = _interpolate(data)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job file, apply overrides, interpolate env vars and validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job file {p} does not exist")
    try:
        with p.open(encoding="utf-8") as f:  # a stream, so YAML's messages name the file, not <unicode string>
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x) or err
        raise ConfigError(f"job file {p} is not valid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"job file {p} must be a mapping of fields, got {type(data).__name__}")
    return load_job_data(data, overrides, source=str(p))

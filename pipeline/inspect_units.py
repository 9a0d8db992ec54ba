"""`cpmv inspect`: what a run would hand the model, one JSON object per unit, without running a model.

It goes through the real preprocess path (source discovery, then `ExpandSource`, the callable the
Ray plan maps over sources, called directly: no Ray) and then asks `pipeline.media.slicing` what the
model's processor will make of each unit: slice grid, visual tokens, placeholder tokens. Users size
jobs and estimate cost with it; tests use it to check what a run would ship.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, InputConfig, JobConfig, load_job, load_job_data
from pipeline import models
from pipeline.media import slicing

DEFAULT_FAMILY = "minicpmv4_6"


def load_inspect_job(uri: str, job_path: str | None = None, overrides: list[str] | None = None) -> JobConfig:
    """The job to inspect `uri` with: `job_path` (its inputs replaced by `uri`) or a default job.

    The default job runs every task on the kinds it applies to (OCR on pages and images, captions on
    clips), so no unit is skipped as "task not applicable"; `overrides` are `--set` items.
    """
    if job_path:
        job = load_job(job_path, overrides)
        return job.model_copy(update={"input": InputConfig(uris=[uri])})
    data: dict[str, Any] = {
        "name": "inspect",
        "input": {"uris": [uri]},
        "output": {"uri": str(Path(tempfile.gettempdir()) / "cpmv-inspect")},  # never written
        "tasks": [{"name": "ocr"}, {"name": "video_caption"}],
    }
    return load_job_data(data, overrides, source="<inspect default job>")


def resolve_family(job: JobConfig, override: str | None = None) -> str:
    """--model, else the job's model.family, else the family of a local checkpoint, else 4.6."""
    if override:
        slicing.get_slice_spec(override)  # ValueError naming the known families
        return override
    if job.model.family != "auto":
        return job.model.family
    if Path(job.model.name, "config.json").is_file():
        from pipeline.models import detect_family

        return detect_family(job.model.name)
    return DEFAULT_FAMILY


def pixel_budget(job: JobConfig, family: str) -> int:
    """The render budget a run of `job` uses (pipeline/run.py), for any slicing family."""
    from pipeline import models

    if family in models.FAMILIES:
        spec = models.get_family(family)
        return models.pixel_budget(spec, job.model.max_slice_nums or spec.image_max_slice_nums)
    sspec = slicing.get_slice_spec(family)
    return (job.model.max_slice_nums or sspec.image_max_slice_nums) * sspec.scale_resolution**2


def inspect_units(job: JobConfig, family: str) -> Iterator[dict[str, Any]]:
    """One record per unit (and per failed source) of every source `job.input` names, in order."""
    from pipeline.sources import discover

    for _, records in inspect_sources(job, family, discover(job.input, job.storage)):
        yield from records


def inspect_sources(job: JobConfig, family: str, sources: Any) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    """(source, its unit records) for each of `sources` (pipeline.sources.Source), expanded one at a
    time (so a caller can time each: `cpmv plan` does)."""
    import pyarrow as pa

    from pipeline.expand import ExpandSource
    from pipeline.tasks import resolve_task

    tasks = {t.key: resolve_task(t) for t in job.tasks}
    expander = ExpandSource(job, pixel_budget(job, family), {n: sorted(t.unit_kinds) for n, t in tasks.items()},
                            family)
    examples = example_sizes(job, expander)
    for src in sources:
        row = {"source_uri": src.uri, "source_id": src.source_id, "size": src.size, "tasks": list(tasks),
               "parts": list(src.parts)}
        records = []
        for table in expander(pa.Table.from_pylist([row])):
            # Pixels are not needed here: drop them before converting to Python objects.
            records.extend(unit_record(unit, job, family, examples) for unit in table.drop_columns(["pixels"]).to_pylist())
        yield src, records


def example_sizes(job: JobConfig, expander: Any) -> dict[str, list[tuple[int, int]]]:
    """task -> sizes of its few-shot example images after the engine actor's resize (pipeline/examples.py).
    Reads each image once; ConfigError naming the example when one cannot be read."""
    from pipeline.examples import ExampleCache

    cache = ExampleCache(job, lambda frame: expander._fit(frame, False))
    out = {}
    for t in job.tasks:
        if t.examples:
            try:
                examples = cache.get(t.name, "")
            except RuntimeError as err:
                raise ConfigError(str(err)) from None
            out[t.name] = [(im.shape[1], im.shape[0]) for ex in examples for im in ex.images]
    return out


def unit_record(unit: dict[str, Any], job: JobConfig, family: str,
                examples: dict[str, list[tuple[int, int]]] | None = None) -> dict[str, Any]:
    """The JSON record of one unit row (UNITS_SCHEMA, without pixels); `examples`: task -> sizes of its
    few-shot example images (`example_sizes`), counted into `prompt_placeholder_tokens`."""
    text = unit.get("text_layer")
    rec: dict[str, Any] = {
        "source_uri": unit["source_uri"],
        "source_id": unit["source_id"],
        "unit_index": unit["unit_index"],
        "unit_kind": unit["unit_kind"],
        "media_type": unit["media_type"],
        "tasks": unit["tasks"],
        "family": family,
        "width": unit["width"],
        "height": unit["height"],
        "frames": unit["num_frames"],
        "stack_frames": unit.get("stack_frames"),
        "tiles": unit.get("num_tiles") or 1,
        "tile_index": unit.get("tile_index"),
        "text_layer_quality": unit.get("text_layer_quality"),
        "slice_grid": None,
        "overview": None,
        "slice_size": None,
        "num_slices": 0,
        "visual_tokens": None,
        "placeholder_tokens": None,
        "tokens_exact": None,
        "text_layer_chars": None if text is None else len(text),
        "start_s": unit["start_s"],
        "end_s": unit["end_s"],
        "flags": unit["flags"],
        "error_type": unit["error_type"],
        "error_message": unit["error_message"],
    }
    if unit["error_type"] is not None or not unit["width"] or not unit["height"]:
        return rec
    try:
        rec.update(_plan(unit, job, family, examples or {}))
    except ValueError as err:  # e.g. a clip for a generation without video
        rec["plan_error"] = str(err)
    return rec


def _plan(unit: dict[str, Any], job: JobConfig, family: str,
          examples: dict[str, list[tuple[int, int]]]) -> dict[str, Any]:
    m = job.model
    w, h = unit["width"], unit["height"]
    spec = slicing.get_slice_spec(family)
    mode = m.downsample_mode if spec.native else None
    from pipeline.media.stacking import STACK_FAMILIES, unit_layout

    layout = unit_layout(unit, job.video.max_frames_per_clip)
    if layout is not None:
        # 4.6's stack_frames layout: main frames and per-second composites, each planned at its size.
        if family not in STACK_FAMILIES:
            raise ValueError(f"video.stack_frames: {spec.display} has no stacked-frame video input")
        units = layout.units()
        clip = slicing.plan_stacked_video(family, w, h, units, downsample_mode=mode)
        frame = clip.frame
        visual, placeholder = clip.visual_tokens, clip.placeholder_tokens
        extra = {"visual_tokens_per_frame": frame.visual_tokens, "visual_units": len(units),
                 "composites": sum(1 for k in units if k)}
    elif unit["unit_kind"] == "clip":
        # The engine's video defaults: 1 slice per frame and no image ids; the job's downsample mode.
        clip = slicing.plan_video(family, w, h, unit["num_frames"], downsample_mode=mode)
        frame = clip.frame
        visual, placeholder = clip.visual_tokens, clip.placeholder_tokens
        extra = {"visual_tokens_per_frame": frame.visual_tokens}
    else:
        # Each page/image is the only image of its prompt (image id 0), with the job's model options;
        # vLLM (offline or served) writes the id of 2.0-4.5 images by its own rule, whatever they say.
        use_id = m.use_image_id if spec.image_ids else None
        if job.engine.kind != "transformers" and family in models.FAMILIES:
            use_id = models.vllm_placeholder_image_id(family, use_id) if spec.image_ids else None
        frame = slicing.plan_image(family, w, h, max_slice_nums=m.max_slice_nums, downsample_mode=mode,
                                   use_image_id=use_id)
        visual, placeholder = frame.visual_tokens, frame.placeholder_tokens
        extra = {}
        sizes = unit.get("frame_sizes") or [(w, h)] * (unit["num_frames"] or 1)
        if len(sizes) > 1:
            # A multi-image unit (a page window): every image, ids counting through them.
            plans = [slicing.plan_image(family, fw, fh, max_slice_nums=m.max_slice_nums, downsample_mode=mode,
                                        use_image_id=use_id, image_index=k) for k, (fw, fh) in enumerate(sizes)]
            visual = sum(p.visual_tokens for p in plans)
            placeholder = sum(p.placeholder_tokens for p in plans)
            extra = {"pages": unit.get("pages"), "images": len(sizes)}
        if examples:
            # Per task with few-shot examples: the placeholder tokens of the whole prompt, examples'
            # images first (their ids come first), as the engine sends it.
            extra["prompt_placeholder_tokens"] = {
                task: sum(slicing.plan_image(family, fw, fh, max_slice_nums=m.max_slice_nums, downsample_mode=mode,
                                             use_image_id=use_id, image_index=k).placeholder_tokens
                          for k, (fw, fh) in enumerate([*ex_sizes, *sizes]))
                for task, ex_sizes in examples.items() if task in unit["tasks"]
            }
    return {
        "slice_grid": None if frame.grid is None else list(frame.grid),
        "overview": list(frame.overview),
        "slice_size": list(frame.slices[0]) if frame.slices else None,
        "num_slices": len(frame.slices),
        "visual_tokens": visual,
        "placeholder_tokens": placeholder,
        "tokens_exact": frame.exact,
        **extra,
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over inspected records: sources, units, failed units, tokens."""
    units = [r for r in records if r["unit_index"] >= 0]
    return {
        "sources": len({r["source_uri"] for r in records}),
        "units": len(units),
        "failed": sum(1 for r in records if r["error_type"] is not None),
        "visual_tokens": sum(r["visual_tokens"] or 0 for r in records),
        "placeholder_tokens": sum(r["placeholder_tokens"] or 0 for r in records),
    }


__all__ = ["ConfigError", "inspect_units", "load_inspect_job", "resolve_family", "summarize", "unit_record"]

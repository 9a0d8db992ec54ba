"""Tasks: what is asked of the model for each unit, with versioned prompts.

A prompt's version is part of every result row and of the resume fingerprint: change the text and
bump the version, and a rerun redoes the work instead of mixing answers to two different questions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pipeline.config import ExampleConfig, JobConfig, LimitsConfig, ModelConfig, StorageConfig, TaskConfig


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: its prompt, the prompt's version, and which unit kinds it applies to."""

    name: str
    prompt: str
    version: str
    unit_kinds: frozenset[str]


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "ocr",
            "Extract all text in this image in natural reading order. Keep headings, lists and paragraphs; "
            "write tables as Markdown tables and formulas as LaTeX. Output only the extracted text. "
            "If the image contains no text, output nothing.",
            "ocr-v1",
            frozenset({"page", "image"}),
        ),
        TaskSpec(
            "table",
            "Convert every table in this image to a GitHub-flavoured Markdown table, in reading order, "
            "with one blank line between tables. Output only the tables; output nothing if there is no table.",
            "table-v1",
            frozenset({"page", "image"}),
        ),
        TaskSpec(
            "caption",
            "Describe this image in one detailed paragraph: the main subjects, their attributes and actions, "
            "the setting, and any visible text.",
            "caption-v1",
            frozenset({"page", "image"}),
        ),
        TaskSpec(
            "video_caption",
            "Describe what happens in this video clip in one paragraph: the scene, the subjects, their actions "
            "in order, and any visible text.",
            "video-caption-v1",
            frozenset({"clip"}),
        ),
    )
}


#: What a `custom` task starts from: its prompt is the job's own; it applies to every unit kind.
CUSTOM = TaskSpec("custom", "", "custom", frozenset({"page", "image", "clip"}))


#: Tasks that read small print and so may run on tiles of an oversized image. A caption describes the
#: whole picture: it always gets the whole image (fit to the budget), never tiles.
TILING_TASKS = frozenset({"ocr", "table"})


HINT_TEMPLATE = (
    "\n\nThe page's embedded text layer follows; it may be incomplete, out of order or wrong, so use it only "
    "as a hint and trust the image:\n<text_layer>\n{text}\n</text_layer>"
)


@dataclass(frozen=True)
class ResolvedTask:
    """A task as one job runs it: prompt text, version and generation settings."""

    name: str
    prompt: str
    prompt_version: str
    unit_kinds: frozenset[str]
    max_new_tokens: int
    temperature: float
    text_layer: str = "ignore"  # ignore | hint | use
    hint_max_chars: int = 4000
    retries: int = 0  # reply-check retries (pipeline/checks.py)
    retry_temperatures: tuple[float, ...] = ()
    retry_max_new_tokens: int | None = None
    examples: tuple[ExampleConfig, ...] = ()  # few-shot examples (pipeline/examples.py)
    base: str = ""  # the built-in task (or `custom`) it comes from; `name` is its id in outputs
    json_schema: str | None = None  # canonical JSON Schema text (pipeline/structured.py): constrained, validated
    choices: tuple[str, ...] = ()  # label task: the reply is one of these
    thinking: bool = False  # reasoning before the answer (chat template's enable_thinking)

    def retry_temperature(self, retry: int) -> float:
        """Temperature of retry number `retry` (1-based): the schedule's entry, its last one past its end,
        the task's own temperature when the schedule is empty."""
        if not self.retry_temperatures:
            return self.temperature
        return self.retry_temperatures[min(retry, len(self.retry_temperatures)) - 1]

    def prompt_for(self, text_layer: str | None) -> str:
        """The prompt for one unit: with `hint`, the page's text layer is appended (bounded)."""
        if self.text_layer != "hint" or not text_layer or not text_layer.strip():
            return self.prompt
        return self.prompt + HINT_TEMPLATE.format(text=text_layer.strip()[: self.hint_max_chars])

    def applies_to(self, unit_kind: str) -> bool:
        return unit_kind in self.unit_kinds

    def validate(self, answer: str) -> tuple[object, str | None] | None:
        """(parsed value, why it is invalid or None) for a task with a json_schema or choices; None
        for a task without (pipeline/checks.py then uses its VALIDATORS)."""
        from pipeline.structured import validate_choice, validate_json

        if self.json_schema is not None:
            return validate_json(answer, self.json_schema)
        if self.choices:
            return validate_choice(answer, self.choices)
        return None


def resolve_task(cfg: TaskConfig) -> ResolvedTask:
    """Combine the built-in task with a job's settings (a custom prompt gets a content-hash version).

    A task with a json_schema or choices gets the shape appended to its prompt
    (pipeline/structured.py `prompt_suffix`), so its version (a hash of the prompt) changes with them;
    `thinking` adds `+think` (the same prompt asked for reasoning first is another question).
    """
    from pipeline.structured import canonical, prompt_suffix

    spec = TASKS.get(cfg.name, CUSTOM)
    prompt, version = spec.prompt, spec.version
    schema = canonical(cfg.json_schema) if isinstance(cfg.json_schema, dict) else None
    choices = tuple(cfg.choices or ())
    if cfg.prompt or schema or choices:
        prompt = (cfg.prompt or prompt) + prompt_suffix(schema, choices)
        version = "custom-" + hashlib.sha256(prompt.encode()).hexdigest()[:12]
    if cfg.text_layer == "hint":
        version += "+hint"  # a different question: a rerun must not mix hinted and plain answers
    if cfg.examples:
        version += f"+fewshot{len(cfg.examples)}"  # which examples: the fingerprint's content hash
    if cfg.thinking:
        version += "+think"
    return ResolvedTask(cfg.key, prompt, version, spec.unit_kinds, cfg.max_new_tokens, cfg.temperature,
                        cfg.text_layer, cfg.hint_max_chars, cfg.retries, tuple(cfg.retry_temperatures),
                        cfg.retry_max_new_tokens, tuple(cfg.examples), base=cfg.name, json_schema=schema,
                        choices=choices, thinking=cfg.thinking)


def fingerprint(task: ResolvedTask, model: ModelConfig, model_id: str, job: JobConfig | None = None) -> str:
    """The resume key of a task's results: same fingerprint, same question asked of the same model.

    The question includes what the model sees of each unit: with `job`, the settings that decide a
    unit's pixels for the task's unit kinds are part of the key (`unit_settings`), so a rerun
    with another DPI, tiling, image policy or video sampling redoes the work it changes.
    """
    payload: dict[str, object] = {
        "task": task.name,
        "prompt_version": task.prompt_version,
        "model": model_id,
        "revision": model.revision,
        "max_slice_nums": model.max_slice_nums,
        "use_image_id": model.use_image_id,
        "downsample_mode": model.downsample_mode,
        "max_new_tokens": task.max_new_tokens,
        "temperature": task.temperature,
        "text_layer": task.text_layer,
    }
    # Only when set, so that the fingerprints of jobs without them stay what they were (no rerun).
    if task.json_schema is not None:
        payload["json_schema"] = task.json_schema
    if task.choices:
        payload["choices"] = list(task.choices)
    if task.thinking:
        payload["thinking"] = True
    if job is not None:
        payload.update(unit_settings(job, task.unit_kinds))
        if task.name == "table" and job.pdf.page_window > 1:
            payload["page_window"] = job.pdf.page_window  # table units are windows of pages
    if task.examples:  # their content: a changed image under the same URI redoes the work
        from pipeline.examples import examples_digest

        payload["examples"] = examples_digest(list(task.examples), job.storage if job else StorageConfig(),
                                              job.limits if job else LimitsConfig())
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def unit_settings(job: JobConfig, unit_kinds: frozenset[str]) -> dict[str, object]:
    """The job settings that decide what the model sees of units of these kinds.

    Left out: settings that only make a unit an error row (max_bytes, max_pages,
    max_video_seconds: rerunning errors is its own decision) and ones that change speed, not
    output (pdf.plan_ahead_pages).
    """
    out: dict[str, object] = {}
    if "page" in unit_kinds:
        # page_window changes the table task's units only (added by `fingerprint` for it).
        out["pdf"] = job.pdf.model_dump(exclude={"plan_ahead_pages", "page_window"})
    if "image" in unit_kinds:
        out["image"] = job.image.model_dump()
    if unit_kinds & {"page", "image"}:
        out["tiling"] = job.tiling.model_dump()
        out["max_pixels"] = job.limits.max_pixels  # caps the DPI of a huge page and the pixels of an image
    if "clip" in unit_kinds:
        out["video"] = job.video.model_dump()
        out["max_frames"] = job.limits.max_frames  # decides which clips are sampled (stacked clips come whole)
    return out

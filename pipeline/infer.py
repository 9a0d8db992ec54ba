"""Stage 2 (engine actor pool): units in, one result row per unit and task out.

The stage owns what every engine needs and none should re-implement: turning unit rows into
requests, passing error units through as error rows, retrying a failed batch one request at a time
(bounded), checking every reply and asking again for those that fail a check (pipeline/checks.py),
and casting every output batch to the results schema (so an all-error batch still writes typed
columns).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pipeline.config import JobConfig
from pipeline.engines.base import Engine, Reply, Request, VideoStack
from pipeline.guards import PROMPT_TOO_LONG
from pipeline.media.stacking import unit_layout
from pipeline.tasks import ResolvedTask
from schemas.records import MARKER_KIND, NO_ROW_KIND

if TYPE_CHECKING:
    from pathlib import Path

    import pyarrow as pa

    from pipeline.checks import Attempts
    from pipeline.guards import Verdict

log = logging.getLogger(__name__)

#: Times one engine actor rebuilds a dead engine before its units become `engine_error` rows.
MAX_ENGINE_REBUILDS = 2


@dataclass(frozen=True)
class RunContext:
    """What every result row records about the run: ids and provenance."""

    run_id: str
    model_id: str  # provenance string: hub id, path or s3 prefix; `tiny:<family>` for tiny models
    family: str
    engine: str
    tasks: dict[str, ResolvedTask] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)  # task -> fingerprint


class InferStage:
    """Callable class for `Dataset.map_batches`: loads the model once per actor."""

    def __init__(self, job: JobConfig, ctx: RunContext):
        from pipeline.engines.factory import LOADS_WEIGHTS, make_engine
        from pipeline.model_source import materialize

        self.job, self.ctx = job, ctx
        model_dir = materialize(job.model, job.storage) if ctx.engine in LOADS_WEIGHTS else None
        self._model_dir = model_dir
        self.engine: Engine = make_engine(job, model_dir, ctx.family, ctx.engine)
        self.rebuilds_left = MAX_ENGINE_REBUILDS
        self.context_limit = _context_limit(job, ctx.engine, model_dir)
        from pipeline.examples import ExampleCache

        # Few-shot examples: read and preprocessed on first use, once per actor (pipeline/examples.py).
        self.examples = ExampleCache(job, self._fit_example)
        self._expander: Any = None

    def _fit_example(self, frame: Any) -> Any:
        """An example image resized as the expand stage resizes a unit's image (never tiled)."""
        if self._expander is None:
            from pipeline.expand import ExpandSource
            from pipeline.models import get_family, pixel_budget

            spec = get_family(self.ctx.family)
            budget = pixel_budget(spec, self.job.model.max_slice_nums or spec.image_max_slice_nums)
            self._expander = ExpandSource(self.job, budget, {}, self.ctx.family)
        return self._expander._fit(frame, False)

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        from schemas.records import STREAM_SCHEMA, to_table

        now = datetime.now(timezone.utc)
        out, todo = self._split(batch, now)
        if todo:
            t0 = time.perf_counter()
            outcomes = self._generate_checked(todo)
            call_ms = (time.perf_counter() - t0) * 1000.0
            for (unit, task, _), outcome in zip(todo, outcomes, strict=True):
                # One call answers all of them at once: each waited the whole call, retry rounds
                # included (latency), and costs its share of it (infer_ms).
                out.append(self._reply_row(unit, task, outcome, call_ms / len(todo), now, latency_ms=call_ms,
                                           batch_units=len(todo)))
        return to_table(out, STREAM_SCHEMA)

    def _generate_checked(self, todo: list[tuple[dict[str, Any], ResolvedTask, Request]]) -> list["Attempts"]:
        """Generate, check every reply (pipeline/checks.py) and send the failed ones again, in rounds
        of one engine call each, until each passes or its task's retries are spent."""
        from pipeline.checks import Attempts

        outcomes = [Attempts(task, request, self.job.checks) for _, task, request in todo]
        pending = list(range(len(todo)))
        requests = [request for _, _, request in todo]
        while pending:
            replies = self._generate(requests)
            retry = []
            for i, reply in zip(pending, replies, strict=True):
                again = outcomes[i].take(reply)
                if again is not None:
                    retry.append((i, again))
            if retry:
                log.info("%d of %d replies failed a reply check; retrying them", len(retry), len(pending))
            pending, requests = [i for i, _ in retry], [r for _, r in retry]
        return outcomes

    def _guard(self, unit: dict[str, Any], task: ResolvedTask, examples: list[Any] = ()) -> "Verdict | None":
        """Estimate the unit's prompt, few-shot `examples` included, against the context limit (None:
        no limit known, no check)."""
        from pipeline.guards import check_unit, estimate_text_tokens

        if self.context_limit is None:
            return None
        m = self.job.model
        count = getattr(self.engine, "count_text_tokens", None)
        text_tokens = estimate_text_tokens(self._prompt(unit, task), count,
                                           tuple((ex.prompt, ex.answer) for ex in examples))
        is_clip = unit["unit_kind"] == "clip"
        sizes = None
        if examples or unit.get("frame_sizes"):
            sizes = [(im.shape[1], im.shape[0]) for ex in examples for im in ex.images] + _frame_sizes(unit)
        # Re-slicing needs an engine that takes max_slice_nums per request (vLLM's `minicpmv` does not).
        reslice = self.job.engine.reslice_on_overflow and bool(
            getattr(self.engine, "per_request_slices", True))
        try:
            return check_unit(
                self.ctx.family, unit["unit_kind"], unit["width"], unit["height"], len(unit["pixels"] or []),
                text_tokens, task.max_new_tokens, self.context_limit,
                max_slice_nums=None if is_clip else m.max_slice_nums,
                downsample_mode=m.downsample_mode, use_image_id=None if is_clip else m.use_image_id,
                reslice=reslice, stack_units=self._stack_units(unit), sizes=sizes,
            )
        except ValueError as err:  # a family or setting slicing.py does not model: let the engine decide
            log.debug("no prompt estimate for %s: %s", unit["source_uri"], err)
            return None

    def _stack_units(self, unit: dict[str, Any]) -> list[int] | None:
        """The visual units of a clip sampled for 4.6's stack_frames (None for anything else)."""
        layout = unit_layout(unit, self.job.video.max_frames_per_clip)
        return layout.units() if layout is not None else None

    def _split(self, batch: "pa.Table", now: datetime) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], ResolvedTask, Request]]]:
        """Rows that need no engine (error units, usable text layers, prompts too long) and the requests that do."""
        out: list[dict[str, Any]] = []
        todo: list[tuple[dict[str, Any], ResolvedTask, Request]] = []
        for unit in batch.to_pylist():
            if unit["unit_kind"] == MARKER_KIND:  # a source's end: passed on for the driver to count
                out.append(self._marker_row(unit, now))
                continue
            for name in unit["tasks"]:
                task = self.ctx.tasks[name]
                if unit["error_type"] is not None:
                    status = "skipped" if unit["error_type"] == "task_not_applicable" else "error"
                    out.append(self._row(unit, task, now, status=status))
                elif task.text_layer == "use" and self._text_layer_usable(unit):
                    if unit["tile_index"] in (None, 0):  # one row for the whole page, not one per tile
                        out.append(self._row(unit, task, now, status="ok", text=unit["text_layer"],
                                             output_source="text_layer", tile_index=None, num_tiles=None))
                    else:  # no row of its own, but the driver counts every (unit, task) pair
                        out.append(self._row(unit, task, now, status=NO_ROW_KIND, unit_kind=NO_ROW_KIND))
                else:
                    try:
                        examples = self.examples.get(task.name, task.prompt) if task.examples else []
                    except Exception as exc:  # noqa: BLE001 - the task's examples failed to load: its rows say so
                        from pipeline.examples import EXAMPLES_UNREADABLE

                        out.append(self._row(unit, task, now, status="error", error_type=EXAMPLES_UNREADABLE,
                                             error_message=str(exc)[:2000]))
                        continue
                    verdict = self._guard(unit, task, examples)
                    if verdict is not None and not verdict.ok:
                        out.append(self._row(unit, task, now, status="error", error_type=PROMPT_TOO_LONG,
                                             error_message=verdict.error_message))
                        continue
                    try:
                        request = self._request(unit, task)
                        request.examples = list(examples)
                    except Exception as exc:  # noqa: BLE001 - a unit whose pixels cannot be read fails alone
                        from pipeline.media.base import describe

                        out.append(self._row(unit, task, now, status="error", error_type="unit_unreadable",
                                             error_message=("the unit could not be made into a model request "
                                                            f"({type(exc).__name__}): {describe(exc)}")[:2000]))
                        continue
                    if verdict is not None and verdict.flag:
                        request.processor_kwargs["max_slice_nums"] = verdict.max_slice_nums
                        unit = {**unit, "flags": [*(unit["flags"] or []), verdict.flag]}
                    todo.append((unit, task, request))
        return out, todo

    def _text_layer_usable(self, unit: dict[str, Any]) -> bool:
        from pipeline.media.textlayer import usable

        pdf = self.job.pdf
        return unit["unit_kind"] == "page" and usable(unit["text_layer"], pdf.text_layer_min_chars,
                                                      pdf.text_layer_min_quality)

    def _request(self, unit: dict[str, Any], task: ResolvedTask) -> Request:
        import numpy as np

        # bytearray: a writable copy (torch warns on read-only buffers and may write in place)
        frames = [np.frombuffer(bytearray(b), dtype=np.uint8).reshape(h, w, 3)
                  for b, (w, h) in zip(unit["pixels"], _frame_sizes(unit), strict=True)]
        m = self.job.model
        opts = {} if unit["unit_kind"] == "clip" else {
            k: v for k, v in (("max_slice_nums", m.max_slice_nums), ("use_image_id", m.use_image_id),
                              ("downsample_mode", m.downsample_mode)) if v is not None
        }
        stack = None
        if unit_layout(unit, self.job.video.max_frames_per_clip) is not None:
            stack = VideoStack(n=unit["stack_frames"], duration_s=unit["end_s"] - unit["start_s"],
                               max_num_frames=self.job.video.max_frames_per_clip)
        return Request(
            prompt=self._prompt(unit, task), images=frames, is_video=unit["unit_kind"] == "clip",
            max_new_tokens=task.max_new_tokens, temperature=task.temperature, processor_kwargs=opts, stack=stack,
            json_schema=task.json_schema, choices=task.choices, thinking=task.thinking,
        )

    @staticmethod
    def _prompt(unit: dict[str, Any], task: ResolvedTask) -> str:
        """The unit's prompt: its source's per-row prompt (input.prompt_column) or the task's, with the
        text-layer hint when the task asks for one."""
        import dataclasses

        # A tile shows part of a page: the whole page's text layer would mislead it, so no hint.
        hint = unit["text_layer"] if unit["tile_index"] is None else None
        if unit.get("prompt"):
            return dataclasses.replace(task, prompt=unit["prompt"]).prompt_for(hint)
        return task.prompt_for(hint)

    def _generate(self, requests: list[Request]) -> list[Reply]:
        """Run a batch; if the batch raises, retry each request alone so one bad unit fails alone.

        An engine that died (it says so with a true `dead` attribute, as VLLMEngine does) is rebuilt
        in this actor, at most MAX_ENGINE_REBUILDS times per actor, before the retries.
        """
        try:
            replies = self._call_engine(requests)
            if len(replies) != len(requests):
                raise RuntimeError(f"engine returned {len(replies)} replies for {len(requests)} requests")
            return replies
        except Exception as err:  # noqa: BLE001
            self._revive(err)
            if len(requests) == 1 and self.job.engine.max_retries == 0:
                return [Reply(error_type="engine_error", error_message=_engine_message(err))]
            log.warning("engine batch of %d failed (%s); retrying one at a time", len(requests), err)
        return [self._one(r) for r in requests]

    def _one(self, request: Request) -> Reply:
        err: Exception | None = None
        for _ in range(self.job.engine.max_retries + 1):
            if self._engine_dead():
                break  # no rebuild left: fail fast instead of waiting on a dead engine
            try:
                (reply,) = self._call_engine([request])
                return reply
            except Exception as e:  # noqa: BLE001
                err = e
                self._revive(e)
        if err is None:
            return Reply(error_type="engine_error", error_message="engine died and could not be rebuilt")
        return Reply(error_type="engine_error", error_message=_engine_message(err))

    def _call_engine(self, requests: list[Request]) -> list[Reply]:
        _count_calls(requests)
        return self.engine.generate(requests)

    def _engine_dead(self) -> bool:
        return bool(getattr(self.engine, "dead", False))

    def _revive(self, err: BaseException) -> None:
        """Rebuild a dead engine in place (bounded); a live engine is left alone."""
        from pipeline.engines.factory import make_engine

        if not self._engine_dead() or self.rebuilds_left <= 0:
            return
        self.rebuilds_left -= 1
        log.warning("engine died (%s); rebuilding it (%d rebuild(s) left in this actor)", err, self.rebuilds_left)
        try:
            self.engine.close()
        except Exception as close_err:  # noqa: BLE001 - a dead engine may not close cleanly
            log.warning("closing the dead engine failed: %s", close_err)
        try:
            self.engine = make_engine(self.job, self._model_dir, self.ctx.family, self.ctx.engine)
        except Exception as build_err:  # noqa: BLE001
            log.error("rebuilding the engine failed: %s", build_err)
            self.rebuilds_left = 0

    def _reply_row(self, unit: dict[str, Any], task: ResolvedTask, outcome: "Attempts", ms: float,
                   now: datetime, latency_ms: float | None = None, batch_units: int | None = None) -> dict[str, Any]:
        """The row of a unit's last reply: ok when it passed the checks; else the page's text layer
        (OCR of a page, `checks.text_layer_fallback`) or an error row `reply_*` that keeps the reply.

        `ms`: the unit's share of engine time (infer_ms); `latency_ms`: from handing it to the engine
        to its last reply; `batch_units`: the requests handed over together (schemas/records.py).
        """
        from pipeline.checks import ERROR_TYPES

        reply, verdict = outcome.reply, outcome.verdict
        assert reply is not None
        tries = {"attempts": outcome.count, "retry_reasons": outcome.reasons,
                 "infer_ms": ms, "latency_ms": latency_ms, "batch_units": batch_units}
        if reply.error_type:
            return self._row(unit, task, now, status="error", error_type=reply.error_type,
                             error_message=reply.error_message, **tries)
        assert verdict is not None
        model = {"finish_reason": reply.finish_reason, "prompt_tokens": reply.prompt_tokens,
                 "completion_tokens": reply.completion_tokens, "reasoning": verdict.reasoning,
                 "validation_error": verdict.validation_error, **tries}
        if verdict.ok:
            # A label is the text too: servers constrained by an enum schema answer `"label"` (JSON).
            label = verdict.parsed if task.choices else None
            return self._row(unit, task, now, status="ok", text=label or verdict.text, output_source="model",
                             tables=verdict.tables, label=label, **model)
        if self._falls_back(unit, task):
            return self._row(unit, task, now, status="ok", text=unit["text_layer"],
                             output_source="text_layer_fallback", **model)
        return self._row(unit, task, now, status="error", error_type=ERROR_TYPES[verdict.reason or "invalid"],
                         error_message=f"after {outcome.count} attempt(s) at temperatures "
                         f"{', '.join(f'{t:g}' for t in outcome.temperatures)}: {verdict.message}"[:2000],
                         text=verdict.text, output_source="model", tables=verdict.tables, **model)

    def _falls_back(self, unit: dict[str, Any], task: ResolvedTask) -> bool:
        """OCR of a whole page (not a tile: the layer covers the page) with a usable text layer."""
        return (self.job.checks.text_layer_fallback and task.name == "ocr" and unit["tile_index"] is None
                and task.json_schema is None and self._text_layer_usable(unit))  # a text layer is no JSON

    def _marker_row(self, unit: dict[str, Any], now: datetime) -> dict[str, Any]:
        """A source's end marker in the results stream (schemas.records.STREAM_SCHEMA); never written."""
        from schemas.records import EXPECTED_ROWS, SCHEMA_VERSION

        return {"schema_version": SCHEMA_VERSION, "run_id": self.ctx.run_id, "source_uri": unit["source_uri"],
                "source_id": unit["source_id"], "unit_index": -1, "unit_kind": MARKER_KIND, "task": "",
                "status": MARKER_KIND, "model": self.ctx.model_id, "prompt_version": "", "fingerprint": "",
                "created_at": now, EXPECTED_ROWS: unit[EXPECTED_ROWS], "dedup_of": unit.get("dedup_of")}

    def _row(self, unit: dict[str, Any], task: ResolvedTask, now: datetime, status: str, **extra: Any) -> dict[str, Any]:
        from pipeline.rowdata import row_fingerprint, row_prompt_version
        from schemas.records import SCHEMA_VERSION

        c = self.ctx
        row = {
            "schema_version": SCHEMA_VERSION, "run_id": c.run_id,
            "source_uri": unit["source_uri"], "source_id": unit["source_id"], "media_type": unit["media_type"],
            "unit_index": unit["unit_index"], "unit_kind": unit["unit_kind"], "tile_index": unit["tile_index"],
            "num_tiles": unit["num_tiles"], "task": task.name, "status": status,
            "error_type": unit["error_type"], "error_message": unit["error_message"],
            "width": unit["width"], "height": unit["height"], "num_frames": unit["num_frames"],
            "start_s": unit["start_s"], "end_s": unit["end_s"],
            "text_layer_chars": len(unit["text_layer"]) if unit["text_layer"] is not None else None,
            "text_layer_quality": unit["text_layer_quality"],
            "flags": unit["flags"], "preprocess_ms": unit["preprocess_ms"],
            "model": c.model_id, "model_family": c.family, "engine": c.engine,
            "prompt_version": row_prompt_version(task.prompt_version, unit.get("prompt")),
            "fingerprint": row_fingerprint(c.fingerprints[task.name], unit.get("prompt")), "created_at": now,
            # the text the engine was given, where a per-row prompt made it (pipeline/rowdata.py)
            "prompt": self._prompt(unit, task) if unit.get("prompt") else None,
            "content_hash": unit.get("content_hash"),
            "pages": unit.get("pages"),
        }
        row.update(extra)
        return row


def _frame_sizes(unit: dict[str, Any]) -> list[tuple[int, int]]:
    """(width, height) of each of a unit row's frames: `frame_sizes` where the frames differ in size
    (a page window), else width x height for all of them."""
    if unit.get("frame_sizes"):
        return [(int(w), int(h)) for w, h in unit["frame_sizes"]]
    return [(unit["width"], unit["height"])] * len(unit["pixels"] or [])


#: Test and benchmark hook: a file to which every engine call appends one line per request (one
#: O_APPEND write, atomic across actors), so resume tests can count the engine's work.
CALL_LOG_ENV = "CPMV_ENGINE_CALL_LOG"


def _count_calls(requests: list[Request]) -> None:
    import os

    path = os.environ.get(CALL_LOG_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()}\n".encode() * len(requests))
        finally:
            os.close(fd)


def _context_limit(job: JobConfig, engine: str, model_dir: "Path | None") -> int | None:
    """The context length prompts must fit: vLLM's max_model_len, else the checkpoint's
    max_position_embeddings where its config.json says (None: unknown, no guard)."""
    import json

    from pipeline.guards import context_limit_from_config

    if engine == "vllm":
        return job.engine.vllm.max_model_len
    if model_dir is None:
        return None
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    return context_limit_from_config(config)


def _engine_message(err: BaseException) -> str:
    """A stable message for an engine failure: what failed, the exception's class and its own text
    without per-run noise (object addresses; pipeline/media/base.py `describe`)."""
    from pipeline.media.base import describe

    return f"the engine failed on this unit ({type(err).__name__}): {describe(err)}"[:2000]

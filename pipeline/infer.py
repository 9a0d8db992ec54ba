"""Stage 2 (engine actor pool): units in, one result row per unit and task out.

The stage owns what every engine needs and none should re-implement: turning unit rows into
requests, passing error units through as error rows, retrying a failed batch one request at a time
(bounded), and casting every output batch to the results schema (so an all-error batch still writes
typed columns).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pipeline.config import JobConfig
from pipeline.engines.base import Engine, Reply, Request
from pipeline.tasks import ResolvedTask

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)


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
        self.engine: Engine = make_engine(job, model_dir, ctx.family, ctx.engine)

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        from schemas.records import RESULTS_SCHEMA, to_table

        now = datetime.now(timezone.utc)
        out: list[dict[str, Any]] = []
        todo: list[tuple[dict[str, Any], ResolvedTask, Request]] = []
        for unit in batch.to_pylist():
            for name in unit["tasks"]:
                task = self.ctx.tasks[name]
                if unit["error_type"] is not None:
                    status = "skipped" if unit["error_type"] == "task_not_applicable" else "error"
                    out.append(self._row(unit, task, now, status=status))
                elif task.text_layer == "use" and self._text_layer_usable(unit):
                    if unit["tile_index"] in (None, 0):  # one row for the whole page, not one per tile
                        out.append(self._row(unit, task, now, status="ok", text=unit["text_layer"],
                                             output_source="text_layer", tile_index=None, num_tiles=None))
                else:
                    todo.append((unit, task, self._request(unit, task)))
        if todo:
            t0 = time.perf_counter()
            replies = self._generate([r for _, _, r in todo])
            per_ms = (time.perf_counter() - t0) * 1000.0 / len(todo)
            for (unit, task, _), reply in zip(todo, replies, strict=True):
                out.append(self._reply_row(unit, task, reply, per_ms, now))
        return to_table(out, RESULTS_SCHEMA)

    def _text_layer_usable(self, unit: dict[str, Any]) -> bool:
        from pipeline.media.textlayer import usable

        pdf = self.job.pdf
        return unit["unit_kind"] == "page" and usable(unit["text_layer"], pdf.text_layer_min_chars,
                                                      pdf.text_layer_min_quality)

    def _request(self, unit: dict[str, Any], task: ResolvedTask) -> Request:
        import numpy as np

        h, w = unit["height"], unit["width"]
        # bytearray: a writable copy (torch warns on read-only buffers and may write in place)
        frames = [np.frombuffer(bytearray(b), dtype=np.uint8).reshape(h, w, 3) for b in unit["pixels"]]
        m = self.job.model
        opts = {} if unit["unit_kind"] == "clip" else {
            k: v for k, v in (("max_slice_nums", m.max_slice_nums), ("use_image_id", m.use_image_id),
                              ("downsample_mode", m.downsample_mode)) if v is not None
        }
        # A tile shows part of a page: the whole page's text layer would mislead it, so no hint.
        hint = unit["text_layer"] if unit["tile_index"] is None else None
        return Request(
            prompt=task.prompt_for(hint), images=frames, is_video=unit["unit_kind"] == "clip",
            max_new_tokens=task.max_new_tokens, temperature=task.temperature, processor_kwargs=opts,
        )

    def _generate(self, requests: list[Request]) -> list[Reply]:
        """Run a batch; if the batch raises, retry each request alone so one bad unit fails alone."""
        try:
            replies = self.engine.generate(requests)
            if len(replies) != len(requests):
                raise RuntimeError(f"engine returned {len(replies)} replies for {len(requests)} requests")
            return replies
        except Exception as err:  # noqa: BLE001
            if len(requests) == 1 and self.job.engine.max_retries == 0:
                return [Reply(error_type="engine_error", error_message=f"{type(err).__name__}: {err}")]
            log.warning("engine batch of %d failed (%s); retrying one at a time", len(requests), err)
        return [self._one(r) for r in requests]

    def _one(self, request: Request) -> Reply:
        err: Exception | None = None
        for _ in range(self.job.engine.max_retries + 1):
            try:
                (reply,) = self.engine.generate([request])
                return reply
            except Exception as e:  # noqa: BLE001
                err = e
        return Reply(error_type="engine_error", error_message=f"{type(err).__name__}: {err}")

    def _reply_row(self, unit: dict[str, Any], task: ResolvedTask, reply: Reply, ms: float, now: datetime) -> dict[str, Any]:
        if reply.error_type:
            return self._row(unit, task, now, status="error", error_type=reply.error_type,
                             error_message=reply.error_message, infer_ms=ms)
        return self._row(
            unit, task, now, status="ok", text=reply.text, output_source="model",
            finish_reason=reply.finish_reason, prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens, infer_ms=ms,
        )

    def _row(self, unit: dict[str, Any], task: ResolvedTask, now: datetime, status: str, **extra: Any) -> dict[str, Any]:
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
            "prompt_version": task.prompt_version, "fingerprint": c.fingerprints[task.name], "created_at": now,
        }
        row.update(extra)
        return row

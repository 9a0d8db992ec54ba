"""The engine stage's error handling, with a real tiny MiniCPM-V 4.6 engine underneath.

`FlakyEngine` is fault injection at the engine boundary (a GPU engine crashing or returning garbage
cannot be produced on demand here): it wraps the real engine and raises on chosen calls.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import load_job_data
from pipeline.engines.base import Engine
from pipeline.infer import InferStage, RunContext
from pipeline.tasks import fingerprint, resolve_task
from schemas.records import STREAM_SCHEMA, UNITS_SCHEMA, to_table


class FlakyEngine(Engine):
    """Fault injection: raises on the calls listed in `fail_calls`, or on any call containing `poison`."""

    name = "transformers"

    def __init__(self, real: Engine, fail_calls=(), poison: str | None = None):
        self.real, self.fail_calls, self.poison, self.calls = real, set(fail_calls), poison, 0

    def generate(self, requests):
        self.calls += 1
        if self.calls in self.fail_calls:
            raise RuntimeError(f"injected engine crash on call {self.calls}")
        if self.poison and any(r.prompt == self.poison for r in requests):
            raise RuntimeError("injected failure for the poisoned request")
        return self.real.generate(requests)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    job = load_job_data({"input": {"uris": ["x"]}, "output": {"uri": "o"},
                         "model": {"name": "tiny", "cache_dir": str(cache), "max_slice_nums": 2},
                         "tasks": [{"name": "ocr", "max_new_tokens": 3}, {"name": "caption", "max_new_tokens": 2}],
                         "engine": {"max_retries": 1},
                         # engine faults are tested here, not reply quality: tiny random replies run to the cap
                         "checks": {"enabled": False}})
    tasks = {t.name: resolve_task(t) for t in job.tasks}
    ctx = RunContext("run-1", "tiny:minicpmv4_6", "minicpmv4_6", "transformers", tasks,
                     {n: fingerprint(t, job.model, "tiny:minicpmv4_6") for n, t in tasks.items()})
    st = InferStage(job, ctx)
    st.real_engine = st.engine
    return st


def _unit(i, *, error=None, w=64, h=48):
    rng = np.random.default_rng(i)
    pixels = [] if error else [rng.integers(0, 255, (h, w, 3), dtype=np.uint8).tobytes()]
    return {"source_uri": f"/in/{i}.png", "source_id": f"s{i}", "size_bytes": 10, "media_type": "image",
            "tasks": ["ocr", "caption"], "unit_index": -1 if error else 0, "unit_kind": "source" if error else "image",
            "pixels": pixels, "width": None if error else w, "height": None if error else h,
            "num_frames": 0 if error else 1, "text_layer": None, "start_s": None, "end_s": None, "flags": [],
            "error_type": error, "error_message": error and "boom", "preprocess_ms": 1.0}


def _batch(units) -> pa.Table:
    return to_table(units, UNITS_SCHEMA)


def test_ok_and_error_units_become_typed_rows(stage):
    stage.engine = stage.real_engine
    out = stage(_batch([_unit(1), _unit(2, error="empty_file"), _unit(3, w=500, h=300)]))
    assert out.schema.equals(STREAM_SCHEMA)  # results columns + the end-marker count
    rows = out.to_pylist()
    assert len(rows) == 6  # 3 units x 2 tasks
    by = {(r["source_id"], r["task"]): r for r in rows}
    assert by[("s2", "ocr")]["status"] == "error" and by[("s2", "ocr")]["error_type"] == "empty_file"
    for sid in ("s1", "s3"):
        for task in ("ocr", "caption"):
            r = by[(sid, task)]
            assert r["status"] == "ok" and r["completion_tokens"] >= 1 and r["prompt_tokens"] > 10
            assert r["fingerprint"] == stage.ctx.fingerprints[task] and r["prompt_version"].startswith(task)


def test_all_error_batch_keeps_column_types(stage):
    """An all-error batch must not produce null-typed columns (the Ray Data LLM Parquet trap)."""
    out = stage(_batch([_unit(1, error="image_decode_failed")]))
    assert out.schema.equals(STREAM_SCHEMA)  # results columns + the end-marker count
    assert out.column("prompt_tokens").type == pa.int32() and out.column("text").type == pa.string()


def test_crashed_batch_is_retried_one_request_at_a_time(stage):
    stage.engine = FlakyEngine(stage.real_engine, fail_calls={1})
    out = stage(_batch([_unit(1), _unit(3)])).to_pylist()
    assert [r["status"] for r in out] == ["ok"] * 4
    assert stage.engine.calls == 1 + 4  # the failed batch, then each request alone


def test_a_poisoned_request_fails_alone(stage):
    poison = stage.ctx.tasks["caption"].prompt
    stage.engine = FlakyEngine(stage.real_engine, poison=poison)
    out = stage(_batch([_unit(1), _unit(3)])).to_pylist()
    status = {(r["source_id"], r["task"]): (r["status"], r["error_type"]) for r in out}
    assert status[("s1", "ocr")] == ("ok", None) and status[("s3", "ocr")] == ("ok", None)
    assert status[("s1", "caption")] == ("error", "engine_error")
    err = next(r for r in out if r["status"] == "error")
    assert "injected failure" in err["error_message"]
    # bounded: one batch call, then per request 1 try (ok) or 1 + max_retries tries (poisoned)
    assert stage.engine.calls == 1 + 2 + 2 * 2


def test_latency_columns_say_what_they_mean(stage):
    """One engine call answers the batch: every row waited the whole call (latency_ms, the same for
    all) and costs its share of it (infer_ms = latency_ms / batch_units); rows that never reached
    the engine have none of the three."""
    stage.engine = stage.real_engine
    rows = stage(_batch([_unit(1), _unit(2, error="empty_file"), _unit(3)])).to_pylist()
    engine_rows = [r for r in rows if r["status"] == "ok"]
    assert {r["batch_units"] for r in engine_rows} == {4}  # 2 units x 2 tasks went to the engine
    assert len({r["latency_ms"] for r in engine_rows}) == 1
    for r in engine_rows:
        assert r["latency_ms"] > 0 and r["infer_ms"] == pytest.approx(r["latency_ms"] / 4)
    for r in rows:
        if r["status"] == "error":
            assert r["latency_ms"] is None and r["batch_units"] is None and r["infer_ms"] is None

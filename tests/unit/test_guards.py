"""Guards before the engine (pipeline/guards.py) and the stage's handling of a dead engine.

The stage tests use a scripted engine (no model): a guard must stop a unit before any engine call,
and a dead engine must be rebuilt in the actor, boundedly, instead of failing the rest of the corpus.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline import guards
from pipeline.config import load_job_data
from pipeline.engines.base import Engine, Reply
from pipeline.guards import PROMPT_TOO_LONG, check_unit, context_limit_from_config, estimate_text_tokens
from pipeline.media.slicing import plan_image, plan_video
from schemas.records import UNITS_SCHEMA, to_table

FAMILY = "minicpmv4_6"


def test_estimate_text_tokens_prefers_the_engine_count():
    assert estimate_text_tokens("hello world", lambda t: 7) == 7
    # An engine that cannot tell (None) falls back to a generous character estimate.
    fallback = estimate_text_tokens("x" * 300, lambda t: None)
    assert fallback == estimate_text_tokens("x" * 300) >= 300 // 4


def test_visual_tokens_follow_the_slicing_plan():
    page = guards.visual_tokens(FAMILY, "page", 1000, 1400, 1, max_slice_nums=4)
    assert page == plan_image(FAMILY, 1000, 1400, max_slice_nums=4).placeholder_tokens
    clip = guards.visual_tokens(FAMILY, "clip", 320, 240, 3)
    assert clip == plan_video(FAMILY, 320, 240, 3).placeholder_tokens
    assert guards.visual_tokens(FAMILY, "image", None, None, 0) == 0


def test_fits_when_under_the_limit():
    v = check_unit(FAMILY, "image", 300, 200, 1, text_tokens=20, max_new_tokens=10, limit=100_000)
    assert v.ok and v.flag is None and v.max_slice_nums is None
    assert v.estimate.total == 20 + 10 + plan_image(FAMILY, 300, 200).placeholder_tokens


def test_no_limit_means_no_check():
    assert check_unit(FAMILY, "page", 4000, 6000, 1, 10**6, 10, limit=None).ok


def test_overflow_reslices_with_halved_slices():
    full = plan_image(FAMILY, 2000, 2800, max_slice_nums=8).placeholder_tokens
    two = plan_image(FAMILY, 2000, 2800, max_slice_nums=2).placeholder_tokens
    four = plan_image(FAMILY, 2000, 2800, max_slice_nums=4).placeholder_tokens
    assert two < four < full
    limit = 50 + 16 + two  # fits with 2 slices, not with 4
    v = check_unit(FAMILY, "page", 2000, 2800, 1, 50, 16, limit, max_slice_nums=8)
    assert v.ok and v.max_slice_nums == 2 and v.flag == "resliced_2" and v.estimate.total <= limit


def test_overflow_without_reslice_is_an_error_with_the_numbers():
    full = plan_image(FAMILY, 2000, 2800, max_slice_nums=8).placeholder_tokens
    v = check_unit(FAMILY, "page", 2000, 2800, 1, 50, 16, limit=full, max_slice_nums=8, reslice=False)
    assert not v.ok
    assert f"estimated prompt {50 + 16 + full} tokens" in v.error_message
    assert f"visual {full}" in v.error_message and f"max_model_len {full}" in v.error_message


def test_overflow_even_with_one_slice_is_an_error():
    v = check_unit(FAMILY, "page", 2000, 2800, 1, 50, 16, limit=60, max_slice_nums=8)
    assert not v.ok and "still" in v.error_message and "max_slice_nums=1" in v.error_message


def test_clips_are_never_resliced():
    v = check_unit(FAMILY, "clip", 320, 240, 4, 20, 8, limit=30)
    assert not v.ok and v.flag is None


def test_legacy_family_default_slices():
    # vLLM's minicpmv generations: fixed 64 tokens per slice, 9 slices by default.
    v = check_unit("minicpmv4_5", "image", 1800, 1800, 1, 10, 10, limit=10 + 10 + 2 * 64 + 64, max_slice_nums=None)
    assert v.ok and v.flag is not None and v.max_slice_nums is not None and v.max_slice_nums < 9


def test_context_limit_from_config():
    assert context_limit_from_config({"text_config": {"max_position_embeddings": 4096}}) == 4096
    assert context_limit_from_config({"max_position_embeddings": 2048}) == 2048
    assert context_limit_from_config({}) is None and context_limit_from_config(None) is None


# -- the stage -------------------------------------------------------------------------------------


class ScriptedEngine(Engine):
    """No model: answers every request, dies on chosen calls (like VLLMEngine after a crash)."""

    name = "vllm"

    def __init__(self, die_on=(), per_request_slices=True):
        self.die_on, self.calls, self.dead, self.seen = set(die_on), 0, False, []
        self.per_request_slices = per_request_slices
        self.closed = False

    def generate(self, requests):
        if self.dead:
            raise RuntimeError("engine failed earlier and must be restarted")
        self.calls += 1
        if self.calls in self.die_on:
            self.dead = True
            raise RuntimeError(f"injected engine death on call {self.calls}")
        self.seen.extend(requests)
        return [Reply(text="ok", prompt_tokens=100, completion_tokens=1, finish_reason="stop") for _ in requests]

    def count_text_tokens(self, text):
        return 20

    def close(self):
        self.closed = True


def _stage(monkeypatch, engine, *, limit=None, builds=None, reslice=True, max_slice_nums=8):
    from pipeline import infer
    from pipeline.infer import InferStage, RunContext
    from pipeline.tasks import fingerprint, resolve_task

    job = load_job_data({"input": {"uris": ["x"]}, "output": {"uri": "o"},
                         "model": {"name": "tiny", "max_slice_nums": max_slice_nums},
                         "tasks": [{"name": "ocr", "max_new_tokens": 16}],
                         "engine": {"kind": "vllm", "max_retries": 1, "reslice_on_overflow": reslice}})
    tasks = {t.name: resolve_task(t) for t in job.tasks}
    ctx = RunContext("r", "tiny:" + FAMILY, FAMILY, "vllm", tasks,
                     {n: fingerprint(t, job.model, "tiny") for n, t in tasks.items()})
    replacements = list(builds or [])
    monkeypatch.setattr("pipeline.engines.factory.make_engine", lambda *a, **k: replacements.pop(0))
    st = InferStage.__new__(InferStage)
    st.job, st.ctx, st.engine, st._model_dir = job, ctx, engine, None
    st.rebuilds_left = infer.MAX_ENGINE_REBUILDS
    st.context_limit = infer._context_limit(job, "vllm", None)  # engine.vllm.max_model_len
    if limit is not None:
        st.context_limit = limit  # below what the config allows (>= 256): tiny images, tiny limits
    return st


def _unit(i, w=64, h=48):
    pixels = [np.zeros((h, w, 3), dtype=np.uint8).tobytes()]
    return {"source_uri": f"/in/{i}.png", "source_id": f"s{i}", "size_bytes": 10, "media_type": "image",
            "tasks": ["ocr"], "unit_index": 0, "unit_kind": "image", "pixels": pixels, "width": w, "height": h,
            "num_frames": 1, "text_layer": None, "start_s": None, "end_s": None, "flags": [],
            "error_type": None, "error_message": None, "preprocess_ms": 1.0}


def _run(stage, units) -> list[dict]:
    return stage(to_table(units, UNITS_SCHEMA)).to_pylist()


def test_overlong_unit_is_an_error_row_and_never_reaches_the_engine(monkeypatch):
    eng = ScriptedEngine()
    small_cost = 20 + 16 + plan_image(FAMILY, 64, 48, max_slice_nums=8).placeholder_tokens
    st = _stage(monkeypatch, eng, limit=small_cost, reslice=False)
    rows = _run(st, [_unit(1), _unit(2, w=2000, h=2800)])
    by = {r["source_id"]: r for r in rows}
    assert by["s1"]["status"] == "ok"
    assert by["s2"]["status"] == "error" and by["s2"]["error_type"] == PROMPT_TOO_LONG
    assert "max_model_len" in by["s2"]["error_message"]
    assert len(eng.seen) == 1  # only the small unit was sent


def test_overlong_unit_is_resliced_and_flagged(monkeypatch):
    eng = ScriptedEngine()
    limit = 20 + 16 + plan_image(FAMILY, 2000, 2800, max_slice_nums=2).placeholder_tokens
    st = _stage(monkeypatch, eng, limit=limit)
    (row,) = _run(st, [_unit(2, w=2000, h=2800)])
    assert row["status"] == "ok" and "resliced_2" in row["flags"]
    assert eng.seen[0].processor_kwargs["max_slice_nums"] == 2


def test_no_reslice_where_the_engine_fixes_slices_per_engine(monkeypatch):
    eng = ScriptedEngine(per_request_slices=False)
    limit = 20 + 16 + plan_image(FAMILY, 2000, 2800, max_slice_nums=2).placeholder_tokens
    st = _stage(monkeypatch, eng, limit=limit)
    (row,) = _run(st, [_unit(2, w=2000, h=2800)])
    assert row["error_type"] == PROMPT_TOO_LONG and not eng.seen


def test_dead_engine_is_rebuilt_and_inflight_units_retried(monkeypatch):
    first, second = ScriptedEngine(die_on={1}), ScriptedEngine()
    st = _stage(monkeypatch, first, builds=[second])
    rows = _run(st, [_unit(i) for i in range(4)])
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert first.closed and st.engine is second and st.rebuilds_left == 1
    assert len(second.seen) == 4  # retried one at a time on the new engine
    # Later batches run on the rebuilt engine.
    assert [r["status"] for r in _run(st, [_unit(9)])] == ["ok"]


def test_rebuilds_are_bounded_then_units_are_engine_errors(monkeypatch):
    # Every engine dies on its first call: 2 rebuilds, then error rows, and the stage returns.
    engines = [ScriptedEngine(die_on={1}) for _ in range(3)]
    st = _stage(monkeypatch, engines[0], builds=engines[1:])
    rows = _run(st, [_unit(i) for i in range(3)])
    assert len(rows) == 3 and all(r["status"] == "error" and r["error_type"] == "engine_error" for r in rows)
    assert st.rebuilds_left == 0
    # The next batch fails fast (no engine call hangs on a dead engine) and still yields its rows.
    again = _run(st, [_unit(7)])
    assert again[0]["error_type"] == "engine_error"


def test_guard_off_for_unknown_limits(monkeypatch):
    eng = ScriptedEngine()
    st = _stage(monkeypatch, eng)
    assert st.context_limit == 8192
    st.context_limit = None
    assert _run(st, [_unit(1, w=4000, h=6000)])[0]["status"] == "ok"


def test_results_table_is_typed():
    assert isinstance(to_table([], UNITS_SCHEMA), pa.Table)


@pytest.mark.parametrize("kind", ["transformers", "openai"])
def test_context_limit_per_engine(tmp_path, kind):
    import json

    from pipeline.infer import _context_limit

    job = load_job_data({"input": {"uris": ["x"]}, "output": {"uri": "o"}, "tasks": [{"name": "ocr"}],
                         "model": {"name": "tiny"}})
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 1234}}))
    expected = 1234 if kind == "transformers" else None
    assert _context_limit(job, kind, tmp_path if kind == "transformers" else None) == expected

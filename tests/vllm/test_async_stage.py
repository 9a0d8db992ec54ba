"""The streaming engine stage (pipeline/infer_async.py) on a real vLLM engine, tiny MiniCPM-V 4.5.

Runs in the vLLM environment: `.venv-vllm/bin/python -m pytest tests/vllm/test_async_stage.py`.
Real engine, real processor, random weights (`load_format="dummy"`): text is meaningless, token
accounting and request handling are real. The stage is driven directly (its coroutine, several
batches at once, as Ray Data's async actor runs it) and once through Ray Data with `stage_kwargs`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("vllm")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from pipeline.config import load_job_data  # noqa: E402
from pipeline.infer import RunContext  # noqa: E402
from pipeline.infer_async import AsyncInferStage, stage_kwargs  # noqa: E402
from pipeline.tasks import fingerprint, resolve_task  # noqa: E402
from schemas.records import STREAM_SCHEMA, UNITS_SCHEMA, to_table  # noqa: E402

FAMILY = "minicpmv4_5"
MAX_MODEL_LEN = 512  # 64 visual tokens per image (1 slice) + a short prompt fit; a long text-layer hint does not


def _job_ctx(cache: Path):
    job = load_job_data({
        "input": {"uris": ["x"]}, "output": {"uri": "o"},
        "model": {"name": "tiny", "family": FAMILY, "cache_dir": str(cache), "trust_remote_code": True,
                  "max_slice_nums": 1},
        "tasks": [{"name": "ocr", "max_new_tokens": 4, "text_layer": "hint"}, {"name": "caption", "max_new_tokens": 3}],
        "checks": {"enabled": False},  # tiny random replies run to the cap: the stage's plumbing is tested here
        "engine": {"kind": "vllm", "batch_size": 4, "max_retries": 1,
                   "vllm": {"load_format": "dummy", "enforce_eager": True, "max_model_len": MAX_MODEL_LEN,
                            "cpu_kvcache_space_gib": 1}},
    })
    tasks = {t.name: resolve_task(t) for t in job.tasks}
    model_id = f"tiny:{FAMILY}"
    ctx = RunContext("run-async", model_id, FAMILY, "vllm", tasks,
                     {n: fingerprint(t, job.model, model_id) for n, t in tasks.items()})
    return job, ctx


@pytest.fixture(scope="module")
def job_ctx(tmp_path_factory: pytest.TempPathFactory):
    return _job_ctx(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def stage(job_ctx) -> Iterator[AsyncInferStage]:
    job, ctx = job_ctx
    st = AsyncInferStage(job, ctx)
    assert st.driver is not None, "a vLLM engine must be driven by the streaming driver"
    yield st
    st.driver.close()
    st.engine.close()


def _unit(i: int, *, error: str | None = None, text_layer: str | None = None, w: int = 96, h: int = 64) -> dict:
    rng = np.random.default_rng(i)
    pixels = [] if error else [rng.integers(0, 255, (h, w, 3), dtype=np.uint8).tobytes()]
    return {"source_uri": f"/in/{i}.png", "source_id": f"s{i}", "size_bytes": 10, "media_type": "image",
            "tasks": ["ocr", "caption"], "unit_index": -1 if error else 0, "unit_kind": "source" if error else "image",
            "tile_index": None, "num_tiles": None, "pixels": pixels, "width": None if error else w,
            "height": None if error else h, "num_frames": 0 if error else 1, "text_layer": text_layer,
            "text_layer_quality": None, "start_s": None, "end_s": None, "flags": [], "error_type": error,
            "error_message": error and "boom", "preprocess_ms": 1.0}


async def _collect(stage: AsyncInferStage, batch: pa.Table) -> list[pa.Table]:
    return [t async for t in stage(batch)]


def _rows(tables: list[pa.Table]) -> list[dict]:
    for t in tables:
        assert t.schema.equals(STREAM_SCHEMA), t.schema  # results columns + the end-marker count
    return [r for t in tables for r in t.to_pylist()]


def test_one_row_per_unit_and_task_with_error_units_passed_through(stage: AsyncInferStage) -> None:
    units = [_unit(1), _unit(2, error="empty_file"), _unit(3, w=300, h=200), _unit(4)]
    rows = _rows(asyncio.run(_collect(stage, to_table(units, UNITS_SCHEMA))))
    keys = sorted((r["source_id"], r["task"]) for r in rows)
    assert keys == sorted((f"s{i}", t) for i in (1, 2, 3, 4) for t in ("ocr", "caption"))  # any order, no dupes
    by = {(r["source_id"], r["task"]): r for r in rows}
    for task in ("ocr", "caption"):
        err = by[("s2", task)]
        assert err["status"] == "error" and err["error_type"] == "empty_file" and err["error_message"] == "boom"
        assert err["text"] is None and err["engine"] == "vllm"
        for sid in ("s1", "s3", "s4"):
            r = by[(sid, task)]
            assert r["status"] == "ok", r["error_message"]
            assert r["output_source"] == "model" and r["error_type"] is None
            assert 1 <= r["completion_tokens"] <= (4 if task == "ocr" else 3)
            assert r["prompt_tokens"] >= 64  # the image's visual tokens reached the engine
            assert r["fingerprint"] == stage.ctx.fingerprints[task] and r["infer_ms"] > 0


@pytest.mark.parametrize("guard", ["off", "on"])
def test_overlong_prompt_becomes_an_error_row_and_the_rest_succeed(stage: AsyncInferStage, guard: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """guard off: vLLM itself rejects the request (at enqueue); on: the stage's length guard stops it first."""
    if guard == "off":
        monkeypatch.setattr(stage, "_guard", lambda unit, task, examples=(): None, raising=False)
    elif not hasattr(stage, "_guard"):
        pytest.skip("this InferStage has no prompt-length guard")
    long_text = " ".join(f"word{i}" for i in range(3000))  # hint of 4000 chars: far over MAX_MODEL_LEN tokens
    units = [_unit(5), _unit(6, text_layer=long_text), _unit(7)]
    rows = _rows(asyncio.run(_collect(stage, to_table(units, UNITS_SCHEMA))))
    assert len(rows) == 6
    by = {(r["source_id"], r["task"]): r for r in rows}
    bad = by[("s6", "ocr")]  # only the ocr task carries the hint
    assert bad["status"] == "error" and bad["text"] is None and bad["completion_tokens"] is None
    if guard == "off":
        assert bad["error_type"] != "prompt_too_long" and "maximum context length" in bad["error_message"]
    else:
        assert bad["error_type"] == "prompt_too_long"
    for key, r in by.items():
        if key != ("s6", "ocr"):
            assert r["status"] == "ok", (key, r["error_message"])
    # The engine is still healthy: a later batch runs.
    again = _rows(asyncio.run(_collect(stage, to_table([_unit(8)], UNITS_SCHEMA))))
    assert [r["status"] for r in again] == ["ok", "ok"]


def test_all_error_batch_still_writes_typed_columns(stage: AsyncInferStage) -> None:
    tables = asyncio.run(_collect(stage, to_table([_unit(9, error="decode_error")], UNITS_SCHEMA)))
    rows = _rows(tables)
    assert [r["status"] for r in rows] == ["error", "error"]
    assert tables[0].schema.field("text").type == pa.string()  # not the null type


def test_concurrent_batches_share_the_engine(stage: AsyncInferStage) -> None:
    """Three batches submitted together overlap inside one engine (what max_concurrency buys)."""
    start = len(stage.driver.trace)

    async def three() -> list[list[pa.Table]]:
        batches = [to_table([_unit(10 + 2 * b), _unit(11 + 2 * b)], UNITS_SCHEMA) for b in range(3)]
        return await asyncio.gather(*(_collect(stage, b) for b in batches))

    results = asyncio.run(three())
    rows = [r for tables in results for r in _rows(tables)]
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)
    trace = stage.driver.trace[start:]
    # Some moment had requests of more than one batch (4 requests each) in flight at once.
    events = sorted([(a, 1) for a, _ in trace] + [(b, -1) for _, b in trace])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak > 4, peak


def _kill_engine_on_next_step(stage: AsyncInferStage) -> None:
    """Fault injection: the engine's next step raises, as a crashed vLLM engine core does."""
    core = stage.engine.llm.llm_engine

    def boom():
        raise RuntimeError("injected engine crash")

    core.step = boom


def test_dead_engine_is_rebuilt_and_its_requests_retried(stage: AsyncInferStage) -> None:
    before = stage._rebuilds
    old_driver = stage.driver
    _kill_engine_on_next_step(stage)
    rows = _rows(asyncio.run(_collect(stage, to_table([_unit(50), _unit(51)], UNITS_SCHEMA))))
    assert sorted((r["source_id"], r["task"]) for r in rows) == sorted((f"s{i}", t) for i in (50, 51)
                                                                      for t in ("ocr", "caption"))
    assert all(r["status"] == "ok" for r in rows), [r["error_message"] for r in rows]
    assert stage._rebuilds == before - 1 and stage.driver is not old_driver


def test_dead_engine_without_rebuilds_left_gives_error_rows(stage: AsyncInferStage) -> None:
    stage._rebuilds = 0
    _kill_engine_on_next_step(stage)
    rows = _rows(asyncio.run(_collect(stage, to_table([_unit(60), _unit(61, error="empty_file")], UNITS_SCHEMA))))
    assert len(rows) == 4
    by = {(r["source_id"], r["task"]): r for r in rows}
    for task in ("ocr", "caption"):
        assert by[("s60", task)]["status"] == "error" and by[("s60", task)]["error_type"] == "engine_error"
        assert by[("s61", task)]["error_type"] == "empty_file"


def test_through_ray_data(job_ctx, tmp_path: Path) -> None:
    """The real wiring: Ray Data map_batches with stage_kwargs (async actor, batches in flight)."""
    ray = pytest.importorskip("ray")
    job, ctx = job_ctx
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
                                       "VLLM_CPU_KVCACHE_SPACE": "1"}})
    try:
        units = [_unit(20 + i) for i in range(10)] + [_unit(40, error="empty_file")]
        table = to_table(units, UNITS_SCHEMA)
        ds = ray.data.from_arrow([table.slice(i, 2) for i in range(0, table.num_rows, 2)])
        out = ds.map_batches(AsyncInferStage, fn_constructor_kwargs={"job": job, "ctx": ctx},
                             batch_format="pyarrow", num_cpus=1, **stage_kwargs(1, 2, concurrent_batches=3))
        out.write_parquet(str(tmp_path / "results"))
        result = pq.read_table(str(tmp_path / "results"))
        keys = sorted(zip(result.column("source_id").to_pylist(), result.column("task").to_pylist(), strict=True))
        assert keys == sorted((u["source_id"], t) for u in units for t in ("ocr", "caption"))
        statuses = dict(zip(keys, [None] * len(keys), strict=True))
        for sid, task, status in zip(result.column("source_id").to_pylist(), result.column("task").to_pylist(),
                                     result.column("status").to_pylist(), strict=True):
            statuses[(sid, task)] = status
        assert all(s == ("error" if sid == "s40" else "ok") for (sid, _), s in statuses.items())
    finally:
        ray.shutdown()



def test_reply_checks_retry_each_request_on_its_own_through_the_driver(job_ctx) -> None:
    """Dummy weights run to the token cap by themselves: a real `reply_truncated` on the streaming path,
    each failed request sent again at the schedule's temperatures and the larger cap (recorded at submit).
    Its own stage: the module's stage may have had its engine killed by the fault tests above."""
    job, ctx = job_ctx
    checked = load_job_data({**job.model_dump(mode="json"), "checks": {"enabled": True},
                             "tasks": [{"name": "caption", "max_new_tokens": 3, "retries": 2,
                                        # near-greedy: a sampled stop token from a random model would
                                        # end a reply early by chance, and vLLM's sampling is not seeded here
                                        "retry_temperatures": [0.01, 0.02], "retry_max_new_tokens": 5}]})
    tasks = {t.name: resolve_task(t) for t in checked.tasks}
    st = AsyncInferStage(checked, RunContext(ctx.run_id, ctx.model_id, ctx.family, ctx.engine, tasks,
                                             {"caption": "fp-caption"}))
    sent: list[tuple[float, int]] = []
    real_submit = st.driver.submit

    def recording_submit(request):  # instrumentation only: the request goes to the real engine
        sent.append((request.temperature, request.max_new_tokens))
        return real_submit(request)

    st.driver.submit = recording_submit
    try:
        units = [{**_unit(i), "tasks": ["caption"]} for i in (5, 6)]
        rows = _rows(asyncio.run(_collect(st, to_table(units, UNITS_SCHEMA))))
    finally:
        st.driver.close()
        st.engine.close()
    assert len(rows) == 2
    for r in rows:
        assert r["status"] == "error" and r["error_type"] == "reply_truncated", (r["error_type"], r["error_message"])
        assert r["attempts"] == 3 and r["retry_reasons"] == ["truncated"] * 3
        assert r["finish_reason"] == "length" and r["completion_tokens"] == 5 and r["text"] is not None
    assert sorted(sent) == sorted([(0.0, 3), (0.01, 5), (0.02, 5)] * 2)

"""RunStats (pipeline/runstats.py) and the progress line (pipeline/progress.py), fed real Collector output."""

from __future__ import annotations

import pyarrow as pa

from pipeline.collect import Collector, SourceWork
from pipeline.progress import ProgressLog, ProgressOptions
from pipeline.runstats import MAX_BUCKETS, RunStats
from schemas.records import EXPECTED_ROWS, MARKER_KIND, STREAM_SCHEMA


class Clock:
    """A settable clock (the stats' time source), so bucket placement is exact."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def row(sid, unit, task, status="ok", tile=None, kind="page", infer_ms=100.0, pre_ms=40.0, out=10, err=None):
    return {"schema_version": "1.2", "run_id": "r", "source_uri": f"s3://b/{sid}.pdf", "source_id": sid,
            "media_type": "pdf", "unit_index": unit, "unit_kind": kind, "tile_index": tile, "task": task,
            "status": status, "error_type": err, "error_message": "boom" if err else None,
            "output_source": "model" if status == "ok" else None, "prompt_tokens": 50 if status == "ok" else None,
            "completion_tokens": out if status == "ok" else None, "num_frames": 4 if kind == "clip" else None,
            "preprocess_ms": pre_ms, "infer_ms": infer_ms, "model": "m", "prompt_version": "v", "fingerprint": "f",
            "created_at": 0}


def marker(sid, n):
    return {"schema_version": "1.2", "run_id": "r", "source_uri": f"s3://b/{sid}.pdf", "source_id": sid,
            "unit_index": -1, "unit_kind": MARKER_KIND, "task": "", "status": MARKER_KIND, "model": "m",
            "prompt_version": "", "fingerprint": "", "created_at": 0, EXPECTED_ROWS: n}


def block(rows):
    return pa.Table.from_pylist(rows, schema=STREAM_SCHEMA)


def test_counts_units_once_across_tasks_blocks_and_duplicates():
    clock = Clock()
    stats = RunStats(clock)
    work = {s: SourceWork(f"s3://b/{s}.pdf", s, 1, ("ocr", "caption")) for s in ("a", "b")}
    col = Collector(work, observe=stats.rows)
    stats.start(2, {"preprocess": 1, "infer": 1})
    clock.t = 2.5
    # unit 0 of a: its two task rows come in different blocks (vLLM's stage), one row is re-sent
    col.add(block([row("a", 0, "ocr")]))
    clock.t = 3.5
    done = col.add(block([row("a", 0, "ocr"), row("a", 0, "caption"), row("a", 1, "ocr", "error", infer_ms=None,
                                                                          err="decode_error"),
                          row("a", 1, "caption", "error", infer_ms=None, err="decode_error"), marker("a", 4)]))
    stats.sources_done(done)
    clock.t = 5.0
    done = col.add(block([row("b", 0, "ocr", tile=0, infer_ms=300.0), row("b", 0, "ocr", tile=1, infer_ms=300.0),
                          marker("b", 2)]))
    stats.sources_done(done)
    assert col.duplicates == 1
    t = stats.totals
    # units: a/0, a/1, b/0 tile 0, b/0 tile 1; pages: a/0, a/1, b/0 (a tiled page counts once)
    assert (t["units"], t["pages"], t["rows"], t["errors"], t["sources_done"]) == (4, 3, 6, 2, 2)
    assert t["completion_tokens"] == 40 and t["prompt_tokens"] == 200
    assert stats.errors == {"decode_error": 2}
    assert stats.errors_by_stage == {("preprocess", "decode_error"): 2}
    rep = stats.report(wall_s=10.0, discover_s=1.0, retried={}, counts={})
    assert rep["throughput"]["units_per_s"] == 0.4 and rep["throughput"]["completion_tokens_per_s"] == 4.0
    assert rep["results_by_status"] == {"ok": 4, "error": 2}
    # engine busy: 2 ok rows x 100 ms + 2 x 300 ms; preprocess once per unit: 4 x 40 ms
    assert abs(rep["stages"]["infer"]["busy_s"] - 0.8) < 1e-9 and abs(rep["stages"]["preprocess"]["busy_s"] - 0.16) < 1e-9
    ts = rep["timeseries"]
    assert ts["bucket_s"] == 1.0 and ts["units"][2:6] == [1, 1, 0, 2]
    assert abs(sum(ts["engine_busy_s"]) - 0.8) < 1e-9 and sum(ts["sources_done"]) == 2
    assert rep["error_types"][0]["examples"][0]["message"] == "boom"
    assert [s["source_uri"] for s in rep["slowest_sources"]] == ["s3://b/b.pdf", "s3://b/a.pdf"]
    assert rep["distributions"]["completion_tokens"]["count"] == 4


def test_series_stay_bounded_and_keep_their_sums():
    clock = Clock()
    stats = RunStats(clock)
    stats.start(1, {})
    for i in range(3 * MAX_BUCKETS):
        clock.t = float(i)
        stats.rows([row("a", i, "ocr", infer_ms=500.0)], [True])
    rep = stats.report(wall_s=3 * MAX_BUCKETS, discover_s=0, retried={}, counts={})
    ts = rep["timeseries"]
    assert len(ts["units"]) <= MAX_BUCKETS and ts["bucket_s"] == 4.0
    assert sum(ts["units"]) == 3 * MAX_BUCKETS
    assert abs(sum(ts["engine_busy_s"]) - 0.5 * 3 * MAX_BUCKETS) < 1e-6
    # one 0.5 s request a second on one replica: half busy
    assert 0.45 < ts["engine_occupancy"][len(ts["units"]) // 2] <= 0.55


def test_progress_line_rates_errors_and_eta(caplog):
    clock = Clock()
    stats = RunStats(clock)
    stats.start(4, {})
    meter = ProgressLog(stats, ProgressOptions("log", every_s=10))
    clock.t = 5
    assert meter.tick() is None  # not due yet
    stats.rows([row("a", 0, "ocr", out=100), row("a", 1, "ocr", "error", err="engine_error")], [True, True])
    stats.totals["sources_done"] += 1
    clock.t = 10
    with caplog.at_level("INFO", logger="pipeline.progress"):
        line = meter.tick()
    assert line in caplog.text
    assert "sources 1/4 (25%)" in line and "units 2 (0.20/s)" in line and "pages 0.20/s" in line
    assert "tokens 10/s out" in line and "error rows engine_error 1" in line and "ETA 30s" in line
    assert ProgressLog(stats, ProgressOptions("off")).tick(force=True) is None


def test_bad_progress_options_fail_fast():
    import pytest

    with pytest.raises(ValueError, match="--progress"):
        ProgressOptions("loud").resolved()
    with pytest.raises(ValueError, match="--progress-every"):
        ProgressOptions("log", 0).resolved()

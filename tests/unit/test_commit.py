"""The commit protocol: windows, re-publication, and a driver killed at every step (local disk).

Each kill is a real process death (`os._exit` at the step, through the CPMV_FAULT_COMMIT test
hook) of a subprocess running the protocol; the rerun then runs in this process. The same matrix
runs against the S3 server in tests/integration/test_commit_s3.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import commit, sink
from pipeline.config import StorageConfig
from tests.commit_driver import FPS, UNITS, publish_run

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["staged", "decided", "applied-results", "applied", "forgotten"]
N = 10


def killed_run(root: str, attempt: str, step: str, fail_every: int = 0, env: dict | None = None) -> None:
    """Run the protocol in a subprocess that dies at `step` of its first commit window."""
    full = {**os.environ, **(env or {}), commit.FAULT_ENV: step, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.commit_driver", root, attempt, str(N), str(fail_every)],
                          env=full, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 137, (proc.returncode, proc.stdout, proc.stderr[-2000:])


def readers_view(read_dir) -> tuple[list[dict], list[dict]]:
    results = read_dir("results")
    documents = read_dir("documents")
    return results, documents


def assert_exactly_once(results: list[dict], documents: list[dict], n: int = N) -> None:
    keys = Counter((r["source_id"], r["unit_index"], r["tile_index"], r["task"]) for r in results)
    assert max(keys.values()) == 1, [k for k, v in keys.items() if v > 1][:5]
    assert len(keys) == n * UNITS * len(FPS)
    per_source = Counter(d["source_id"] for d in documents)
    assert len(per_source) == n and max(per_source.values()) == 1


def local_reader(root: Path):
    def read(table: str) -> list[dict]:
        d = root / table
        return pq.read_table(d).to_pylist() if d.exists() and any(d.iterdir()) else []
    return read


def test_windows_are_published_as_they_go(tmp_path):
    out = tmp_path / "out"
    stats = publish_run(str(out), "a1", N, window=4)
    assert stats == {"published": N, "windows": 3}
    assert sorted(p.name for p in (out / "results").iterdir()) == [f"a1-w0000{i}.parquet" for i in (1, 2, 3)]
    assert_exactly_once(*readers_view(local_reader(out)))
    assert not (out / "_commits").exists() or not list((out / "_commits").iterdir())
    assert publish_run(str(out), "a2", N)["published"] == 0  # everything committed


def test_transient_failures_are_republished_once(tmp_path):
    out = tmp_path / "out"
    publish_run(str(out), "a1", N, fail_every=3)  # sources 0, 3, 6, 9 fail their ocr
    results, docs = readers_view(local_reader(out))
    assert sum(r["status"] == "error" for r in results) == 4 * UNITS
    second = publish_run(str(out), "a2", N)
    assert second["published"] == 4
    results, docs = readers_view(local_reader(out))
    assert_exactly_once(results, docs)
    assert all(r["status"] == "ok" for r in results)
    by_sid = {d["source_id"]: d for d in docs}
    moved = [d for d in docs if d["attempt"] == "a2"]
    assert len(moved) == 4 and all(d["status"] == "ok" and d["results_ok"] == UNITS * 2 for d in moved)
    # the caption rows of a re-run source moved with it; its old files no longer hold it
    for d in moved:
        mine = [r for r in results if r["source_id"] == d["source_id"]]
        assert {r["run_id"] for r in mine if r["task"] == "caption"} == {"a1"}
        assert {r["run_id"] for r in mine if r["task"] == "ocr"} == {"a2"}
    assert by_sid  # one row each, checked above


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_commit_step_then_rerun_is_exactly_once(tmp_path, step):
    out = tmp_path / "out"
    killed_run(str(out), "dead", step)
    staged = list((out / "_staging").glob("dead/*")) if (out / "_staging").exists() else []
    intents = list((out / "_commits").glob("*.json")) if (out / "_commits").exists() else []
    assert bool(intents) == (step in ("decided", "applied-results", "applied")), intents
    assert staged or step == "forgotten"
    second = publish_run(str(out), "next", N)
    # a decided window is rolled forward, not redone
    assert second["published"] == (N if step == "staged" else N - 4)
    assert_exactly_once(*readers_view(local_reader(out)))
    assert not list((out / "_commits").glob("*.json"))
    assert not (out / "_staging").exists() or not list((out / "_staging").iterdir())


@pytest.mark.parametrize("step", STEPS)
def test_kill_while_republishing_then_rerun_is_exactly_once(tmp_path, step):
    out = tmp_path / "out"
    publish_run(str(out), "first", N, fail_every=3)
    killed_run(str(out), "dead", step)  # re-publishes sources 0, 3, 6, 9 and dies in that window
    publish_run(str(out), "next", N)
    results, docs = readers_view(local_reader(out))
    assert_exactly_once(results, docs)
    assert all(r["status"] == "ok" for r in results)
    assert publish_run(str(out), "idle", N)["published"] == 0


def test_recover_and_discard_are_idempotent(tmp_path):
    out = tmp_path / "out"
    killed_run(str(out), "dead", "applied-results")
    layout = sink.Layout(str(out), StorageConfig())
    assert len(commit.recover(layout)) == 1
    assert commit.recover(layout) == []
    assert commit.discard_staging(layout, keep="x") == ["dead"]
    assert commit.discard_staging(layout, keep="x") == []


def test_a_window_that_failed_while_applying_is_finished_not_published_twice(tmp_path, monkeypatch):
    """MOCK at the store boundary: the second move of a window raises, as an S3 outage would."""
    from pipeline import storage
    from tests.commit_driver import rows_for, source_id
    from pipeline.collect import Complete, SourceWork

    out = tmp_path / "out"
    layout = sink.Layout(str(out), StorageConfig())
    pub = commit.Publisher(layout, "a1", "a1", FPS)
    window = [Complete(SourceWork(f"/in/{i}", source_id(i), 1, ("ocr", "caption")),
                       rows_for(source_id(i), ("ocr", "caption"), "a1", False), UNITS) for i in range(N)]
    real_move, moves = storage.move, []

    def failing_move(src, dst, st):
        moves.append(dst)
        if len(moves) == 2:
            raise ConnectionError("endpoint down")
        real_move(src, dst, st)

    monkeypatch.setattr(storage, "move", failing_move)
    with pytest.raises(ConnectionError):
        pub.publish(window)
    assert len(list((out / "_commits").glob("*.json"))) == 1  # decided, half applied
    stats = pub.publish(window)  # the driver's retry
    assert stats.stem == "a1-w00001" and pub.window == 1
    assert not list((out / "_commits").glob("*.json"))
    assert_exactly_once(*readers_view(local_reader(out)))


def test_a_later_job_with_another_task_on_the_same_prefix(tmp_path):
    """A job adds a task to a prefix another job filled: the new task's rows join each source's
    window with its old rows, and documents keeps one row per source committing both tasks."""
    out = tmp_path / "out"
    publish_run(str(out), "ocr-only", N, fps={"ocr": "fp-ocr"})
    second = publish_run(str(out), "both", N)
    assert second["published"] == N
    results, docs = readers_view(local_reader(out))
    assert_exactly_once(results, docs)
    assert {r["run_id"] for r in results if r["task"] == "ocr"} == {"ocr-only"}  # not redone
    assert all({c["task"] for c in d["committed"]} == {"ocr", "caption"} for d in docs)
    assert sorted(p.name for p in (out / "results").iterdir()) == ["both-w00001.parquet", "both-w00002.parquet",
                                                                    "both-w00003.parquet"]

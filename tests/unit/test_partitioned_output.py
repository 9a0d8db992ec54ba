"""Data-lake outputs (issue 15, item 5): hive partitions (`output.partition_by`) and file sets that
grow to `output.min_rows_per_file` by atomic appends, through the real commit protocol on local disk.

Readers are the real ones, one line each from a table directory: pandas, pyarrow (hive discovery),
pyarrow.dataset and DuckDB. Kills are real process deaths (`os._exit` through CPMV_FAULT_COMMIT) of
a subprocess running the protocol (tests/commit_driver.py); the S3 matrix is in
tests/integration/test_commit_s3.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline import commit, sink
from pipeline.config import ConfigError, JobConfig, StorageConfig, load_job
from tests.commit_driver import FPS, UNITS, publish_run
from tests.unit.test_commit import STEPS, assert_exactly_once

ROOT = Path(__file__).resolve().parents[2]
N = 10
KEYS = ("task", "status")


def read(out: Path, table: str, how: str = "pandas") -> list[dict]:
    """One table directory as a plain reader sees it (no manifest, no knowledge of the protocol)."""
    d = out / table
    if not d.exists() or not list(d.rglob("*.parquet")):
        return []
    if how == "pandas":
        df = pd.read_parquet(d)
        return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
                for r in df.astype(object).to_dict("records")]
    if how == "pyarrow":
        return pq.read_table(d).to_pylist()
    if how == "dataset":
        return ds.dataset(d, format="parquet", partitioning="hive").to_table().to_pylist()
    if how == "duckdb":
        rel = duckdb.sql(f"select * from read_parquet('{d}/**/*.parquet', hive_partitioning=true)")
        return [dict(zip(rel.columns, row)) for row in rel.fetchall()]
    raise ValueError(how)


def killed_run(out: Path, attempt: str, step: str, keys: tuple[str, ...], min_rows: int, n: int = N,
               fail_every: int = 0) -> None:
    env = {**os.environ, commit.FAULT_ENV: step, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.commit_driver", str(out), attempt, str(n), str(fail_every),
                           ",".join(keys) or "-", str(min_rows)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 137, (proc.returncode, proc.stdout, proc.stderr[-2000:])


def data_files(out: Path, table: str) -> list[str]:
    return sorted(str(p.relative_to(out / table)) for p in (out / table).rglob("*.parquet"))


@pytest.mark.parametrize("how", ["pandas", "pyarrow", "dataset", "duckdb"])
def test_partitioned_tables_read_in_one_line_by_every_reader(tmp_path, how):
    out = tmp_path / "out"
    publish_run(str(out), "a1", N, fail_every=3, partition_by=KEYS)  # sources 0, 3, 6, 9: ocr errors
    results, docs = read(out, "results", how), read(out, "documents", how)
    assert_exactly_once(results, docs)
    # the partition columns come back from the paths with the rows' values
    assert Counter((r["task"], r["status"]) for r in results) == {
        ("ocr", "ok"): 6 * UNITS, ("ocr", "error"): 4 * UNITS, ("caption", "ok"): N * UNITS}
    assert Counter(d["status"] for d in docs) == {"ok": 6, "error": 4}  # documents: no `task`, so status only
    assert all(r["text"] == f"{r['source_id']}/{r['unit_index']}/{r['task']}" for r in results if r["status"] == "ok")


def test_partition_columns_live_in_the_paths_not_the_files(tmp_path):
    out = tmp_path / "out"
    publish_run(str(out), "a1", N, fail_every=3, window=4, partition_by=KEYS)
    assert data_files(out, "results")[:3] == ["task=caption/status=ok/a1-w00001.parquet",
                                              "task=caption/status=ok/a1-w00002.parquet",
                                              "task=caption/status=ok/a1-w00003.parquet"]
    assert "task=ocr/status=error/a1-w00001.parquet" in data_files(out, "results")
    assert data_files(out, "documents")[0] == "status=error/a1-w00001.parquet"
    one = pq.read_schema(out / "results/task=ocr/status=ok/a1-w00001.parquet").names
    assert "task" not in one and "status" not in one and "source_id" in one and "created_at" in one


def test_date_partition_is_the_utc_day_of_created_at(tmp_path):
    out = tmp_path / "out"
    publish_run(str(out), "a1", 3, partition_by=("date",))
    (day,) = {p.parent.name for p in (out / "results").rglob("*.parquet")}
    rows = read(out, "results", "duckdb")
    assert day.startswith("date=") and {str(r["date"]) for r in rows} == {day[5:]}
    assert {r["created_at"].strftime("%Y-%m-%d") for r in rows} == {day[5:]}  # rows keep created_at


def test_republished_sources_move_between_partitions_exactly_once(tmp_path):
    out = tmp_path / "out"
    publish_run(str(out), "first", N, fail_every=3, partition_by=KEYS)
    second = publish_run(str(out), "second", N, partition_by=KEYS)
    assert second["published"] == 4
    results, docs = read(out, "results"), read(out, "documents")
    assert_exactly_once(results, docs)
    assert all(r["status"] == "ok" for r in results) and all(d["status"] == "ok" for d in docs)
    # every error partition file held only re-published sources: deleted, not left empty
    assert not [f for f in data_files(out, "results") if "status=error" in f]
    moved = {d["source_id"] for d in docs if d["attempt"] == "second"}
    assert {r["run_id"] for r in results if r["source_id"] in moved and r["task"] == "caption"} == {"first"}
    # resume finds the work in partitioned files: nothing left to do
    assert publish_run(str(out), "third", N, partition_by=KEYS)["published"] == 0


def test_a_prefix_keeps_its_partitioning(tmp_path):
    out = tmp_path / "out"
    publish_run(str(out), "a1", 2)
    with pytest.raises(ConfigError, match=r"output.partition_by \['task'\] does not match .*partitioned by \[\]"):
        publish_run(str(out), "a2", 2, partition_by=("task",))
    assert publish_run(str(out), "a3", 2)["published"] == 0  # the same layout goes on


def test_config_names_the_field(tmp_path):
    base = {"input": {"uris": ["x/"]}, "tasks": [{"name": "ocr"}]}
    with pytest.raises(ValueError, match="partition_by"):
        JobConfig.model_validate({**base, "output": {"uri": "o", "partition_by": ["source_uri"]}})
    with pytest.raises(ValueError, match="names a column twice"):
        JobConfig.model_validate({**base, "output": {"uri": "o", "partition_by": ["task", "task"]}})
    with pytest.raises(ValueError, match="min_rows_per_file .* above output.rows_per_file"):
        JobConfig.model_validate({**base, "output": {"uri": "o", "min_rows_per_file": 10, "rows_per_file": 5}})
    job = tmp_path / "job.yaml"
    job.write_text("input: {uris: [x/]}\ntasks: [{name: ocr}]\noutput: {uri: o, partition_by: [tsk]}\n")
    with pytest.raises(ConfigError, match=r"output.partition_by"):
        load_job(job)


# ---------------------------------------------------------------------------------------------
# Minimum rows per file


@pytest.mark.parametrize("keys", [(), KEYS])
def test_min_rows_per_file_appends_windows_to_one_file_set(tmp_path, keys):
    out = tmp_path / "out"
    stats = publish_run(str(out), "a1", N, window=2, partition_by=keys, min_rows_per_file=1000)
    assert stats["windows"] == 5
    stems = {Path(f).name for f in data_files(out, "results")}
    assert stems == {"a1-w00001.parquet"}  # five windows, one file per partition
    assert_exactly_once(read(out, "results"), read(out, "documents"))
    marker = json.loads((out / "_tail.json").read_text())
    assert marker["stem"] == "a1-w00001" and marker["rows"] == N * UNITS * len(FPS)
    # the next run continues the open set, and finds what the first one committed
    more = publish_run(str(out), "a2", N + 4, window=2, partition_by=keys, min_rows_per_file=1000)
    assert more["published"] == 4
    assert {Path(f).name for f in data_files(out, "results")} == {"a1-w00001.parquet"}
    assert_exactly_once(read(out, "results"), read(out, "documents"), n=N + 4)


def test_a_set_is_closed_at_min_rows_and_never_exceeds_rows_per_file(tmp_path):
    out = tmp_path / "out"
    # 4 sources a window = 24 result rows: w1 opens a set (24 < 30), w2 fits (48 <= 50), w3 opens a new one
    publish_run(str(out), "a1", N, window=4, min_rows_per_file=30, rows_per_file=50)
    files = {f: pq.read_metadata(out / "results" / f).num_rows for f in data_files(out, "results")}
    assert files == {"a1-w00001.parquet": 48, "a1-w00003.parquet": 12}
    assert_exactly_once(read(out, "results"), read(out, "documents"))


def test_appending_and_republishing_the_open_set_in_one_window(tmp_path):
    """A rerun re-publishes failed sources that live in the set it appends to: one file, both changes."""
    out = tmp_path / "out"
    publish_run(str(out), "first", N, fail_every=3, partition_by=KEYS, min_rows_per_file=1000)
    publish_run(str(out), "second", N, partition_by=KEYS, min_rows_per_file=1000)
    results, docs = read(out, "results"), read(out, "documents")
    assert_exactly_once(results, docs)
    assert all(r["status"] == "ok" for r in results)
    assert {Path(f).name for f in data_files(out, "results")} == {"first-w00001.parquet"}


@pytest.mark.parametrize("step", STEPS)
def test_kill_while_appending_then_rerun_is_exactly_once(tmp_path, step):
    """Killed in the second window, the first that appends to the open set. Before the rerun, a
    plain reader sees no row twice and every row of the first window (what was committed)."""
    out = tmp_path / "out"
    killed_run(out, "dead", f"{step}:2", KEYS, min_rows=1000)
    results, docs = read(out, "results"), read(out, "documents")
    keys = Counter((r["source_id"], r["unit_index"], r["tile_index"], r["task"]) for r in results)
    assert max(keys.values()) == 1
    assert {k[0] for k in keys} >= {f"{i:032x}" for i in range(4)} and len(Counter(d["source_id"] for d in docs)) >= 4
    second = publish_run(str(out), "next", N, partition_by=KEYS, min_rows_per_file=1000)
    assert second["published"] == (N - 4 if step == "staged" else N - 8)  # a decided window is rolled forward
    assert_exactly_once(read(out, "results"), read(out, "documents"))
    assert {Path(f).name for f in data_files(out, "results")} == {"dead-w00001.parquet"}
    assert not list((out / "_commits").glob("*.json"))
    assert not (out / "_staging").exists() or not list((out / "_staging").iterdir())


@pytest.mark.parametrize("step", ["decided", "applied-results"])
def test_kill_while_republishing_into_partitions_then_rerun(tmp_path, step):
    out = tmp_path / "out"
    publish_run(str(out), "first", N, fail_every=3, partition_by=KEYS, min_rows_per_file=1000)
    killed_run(out, "dead", step, KEYS, min_rows=1000)  # re-publishes sources 0, 3, 6, 9 and dies
    publish_run(str(out), "next", N, partition_by=KEYS, min_rows_per_file=1000)
    results, docs = read(out, "results"), read(out, "documents")
    assert_exactly_once(results, docs)
    assert all(r["status"] == "ok" for r in results)


def test_recover_rolls_the_marker_forward_with_the_window(tmp_path):
    out = tmp_path / "out"
    killed_run(out, "dead", "applied-results:2", (), min_rows=1000)
    assert json.loads((out / "_tail.json").read_text())["rows"] == 4 * UNITS * len(FPS)  # window 1's
    layout = sink.Layout(str(out), StorageConfig())
    assert len(commit.recover(layout)) == 1
    assert json.loads((out / "_tail.json").read_text())["rows"] == 8 * UNITS * len(FPS)

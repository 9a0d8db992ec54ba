"""The output root as data-lake readers see it (issue 15, item 5): run records live under `_runs/`,
which pyarrow, pandas and DuckDB skip, and a run still finds the records older runs left in `runs/`."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.run import RunSummary, _take_over
from pipeline.sink import Layout
from schemas.records import RESULTS_SCHEMA


def test_run_record_is_hidden_from_readers(tmp_path):
    layout = Layout(str(tmp_path), StorageConfig())
    assert layout.run_record("a-1").startswith(str(tmp_path / "_runs"))
    storage.write_bytes(layout.run_record("a-1"), b'{"status": "complete"}', layout.storage)
    (tmp_path / "results").mkdir()
    pq.write_table(pa.table({"task": ["ocr", "caption"], "status": ["ok", "error"]}),
                   tmp_path / "results" / "a-1-w00001.parquet")
    # One line each, from the output root and from the table directory.
    assert len(pd.read_parquet(tmp_path)) == 2
    assert pq.read_table(tmp_path).num_rows == 2
    assert duckdb.sql(f"select count(*) from '{tmp_path}/results/*.parquet'").fetchall() == [(2,)]
    assert len(pd.read_parquet(tmp_path / "results")) == 2


def test_take_over_marks_a_legacy_record(tmp_path):
    layout = Layout(str(tmp_path), StorageConfig())
    legacy = Path(layout.legacy_run_record("old-1"))
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"attempt": "old-1", "status": "running"}))
    Path(layout.staging("old-1", "x")).mkdir(parents=True)  # the dead run's staging
    summary = RunSummary("new", str(tmp_path), "new-1")
    _take_over(layout, "new-1", summary)
    rec = json.loads(legacy.read_text())
    assert rec["status"] == "abandoned" and rec["abandoned_by"] == "new-1"
    assert summary.counts["dead_runs_cleaned"] == 1
    assert RESULTS_SCHEMA.names[0] == "schema_version"

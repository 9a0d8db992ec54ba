"""`cpmv run` on real local Ray (tiny MiniCPM-V 4.6) writing a partitioned output whose windows are
appended to one file set (output.partition_by, output.min_rows_per_file): what pandas, pyarrow and
DuckDB read from the table directories, resume, a SIGKILL mid-run, and a prefix that refuses another
partitioning.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.faults.test_durable_runs import make_corpus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
N_PDFS, PAGES = 6, 2

JOB = """
name: lake
input: {{uris: ["{corpus}/"]}}
output: {{uri: "{out}", commit_every_units: 2, commit_every_s: 600, partition_by: {keys}, min_rows_per_file: 1000}}
model: {{name: tiny, max_slice_nums: 1, cache_dir: "{cache}"}}
tasks:
  - {{name: ocr, max_new_tokens: 8}}
  - {{name: caption, max_new_tokens: 8}}
engine: {{batch_size: 2}}
ray: {{num_cpus: 2}}
checks: {{enabled: false}}  # plumbing test: tiny random replies run to the cap
"""


@pytest.fixture
def lake(tmp_path):
    make_corpus(tmp_path / "corpus", N_PDFS)
    ray_tmp = tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return tmp_path, env


def job(tmp: Path, keys: str = "[task, status]") -> Path:
    p = tmp / "job.yaml"
    p.write_text(JOB.format(corpus=tmp / "corpus", out=tmp / "out", cache=tmp / "cache", keys=keys))
    return p


def cpmv(tmp: Path, env: dict, keys: str = "[task, status]") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job(tmp, keys))], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=600)


def records(tmp: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (tmp / "out" / "_runs").glob("*.json")),
                  key=lambda r: r["started_at"])


def assert_tables(out: Path) -> None:
    """Every reader, one line from each table directory: each (source, unit, task) once."""
    want = N_PDFS * PAGES * 2
    res = pd.read_parquet(out / "results")
    assert len(res) == want and set(res["task"]) == {"ocr", "caption"} and set(res["status"]) <= {"ok", "error"}
    assert not res.duplicated(["source_id", "unit_index", "task"]).any()
    assert pq.read_table(out / "results").num_rows == want
    n, tasks = duckdb.sql(f"select count(*), count(distinct task) from read_parquet('{out}/results/**/*.parquet', "
                          "hive_partitioning=true)").fetchall()[0]
    assert (n, tasks) == (want, 2)
    docs = pd.read_parquet(out / "documents")
    assert len(docs) == docs["source_id"].nunique() == N_PDFS


def test_partitioned_run_is_read_in_one_line_and_resumes(lake):
    tmp, env = lake
    first = cpmv(tmp, env)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp / "out"
    assert_tables(out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet") if not p.name.startswith("_"))
    # several windows, one file set: one file per partition and table
    assert records(tmp)[-1]["counts"]["windows"] >= 3
    assert len({Path(f).name for f in files}) == 1, files
    assert all(f.startswith(("results/task=", "documents/status=")) for f in files), files
    again = cpmv(tmp, env)
    assert again.returncode == 0, again.stderr[-3000:]
    counts = records(tmp)[-1]["counts"]
    assert counts["processed"] == 0 and counts["skipped_committed"] == N_PDFS
    other = cpmv(tmp, env, keys="[task]")
    assert other.returncode == 2 and "cpmv: " in other.stderr and "output.partition_by" in other.stderr
    assert "Traceback" not in other.stderr


def test_sigkill_while_appending_then_rerun_is_exactly_once(lake):
    tmp, env = lake
    log = open(tmp / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job(tmp))], env=env, cwd=tmp,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tail = tmp / "out" / "_tail.json"
    deadline = time.monotonic() + 400
    while not (tail.exists() and json.loads(tail.read_text())["rows"] > 0):  # a window is committed
        assert proc.poll() is None and time.monotonic() < deadline, (tmp / "killed.log").read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    res = pd.read_parquet(tmp / "out" / "results")
    assert not res.duplicated(["source_id", "unit_index", "task"]).any()  # what readers saw at the kill
    done = Counter(pd.read_parquet(tmp / "out" / "documents")["source_id"])
    assert 0 < len(done) < N_PDFS, "the kill came too late to test a rerun"
    again = cpmv(tmp, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_tables(tmp / "out")
    counts = records(tmp)[-1]["counts"]
    # a window decided at the kill is rolled forward, not redone; nothing published is redone
    assert counts["processed"] <= N_PDFS - len(done)
    assert counts["processed"] + counts["skipped_committed"] == N_PDFS


S3_JOB = """
name: lake
input: {{uris: ["s3://{bucket}/corpus/"]}}
output: {{uri: "s3://{bucket}/out", commit_every_units: 2, commit_every_s: 600, partition_by: [task, media_type],
          min_rows_per_file: 1000}}
storage: {{s3: {{endpoint_url: "${{AWS_ENDPOINT_URL}}"}}}}
model: {{name: tiny, max_slice_nums: 1, cache_dir: "{cache}"}}
tasks:
  - {{name: ocr, max_new_tokens: 8}}
  - {{name: caption, max_new_tokens: 8}}
engine: {{batch_size: 2}}
ray: {{num_cpus: 2}}
checks: {{enabled: false}}  # plumbing test: tiny random replies run to the cap
"""


def test_partitioned_run_on_s3_is_read_by_pandas_and_pyarrow_and_resumes(lake, s3_server, s3_bucket):
    """The same on the S3 server: partition directories are key prefixes, appends are PUT/copy."""
    tmp, env = lake
    env = {**env, **s3_server.env()}
    fs = s3_server.client()
    for p in sorted((tmp / "corpus").glob("*.pdf")):
        fs.put(str(p), f"{s3_bucket}/corpus/{p.name}")
    job_path = tmp / "s3job.yaml"
    job_path.write_text(S3_JOB.format(bucket=s3_bucket, cache=tmp / "cache"))
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job_path)], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    keys = sorted(k for k, i in fs.find(f"{s3_bucket}/out/results/", detail=True).items() if i["type"] == "file")
    assert {k.split("/out/results/")[1].rsplit("/", 1)[0] for k in keys} == {"task=caption/media_type=pdf",
                                                                              "task=ocr/media_type=pdf"}
    assert len({k.rsplit("/", 1)[1] for k in keys}) == 1  # one file set for all windows
    opts = {"key": s3_server.access_key, "secret": s3_server.secret_key,
            "client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    res = pd.read_parquet(f"s3://{s3_bucket}/out/results", storage_options=opts)
    assert len(res) == N_PDFS * PAGES * 2 and not res.duplicated(["source_id", "unit_index", "task"]).any()
    assert set(res["media_type"]) == {"pdf"} and set(res["task"]) == {"ocr", "caption"}
    assert pq.read_table(f"{s3_bucket}/out/documents", filesystem=fs).num_rows == N_PDFS
    recs = sorted((json.loads(fs.cat(k)) for k in fs.find(f"{s3_bucket}/out/_runs/") if k.endswith(".json")),
                  key=lambda r: r["started_at"])
    assert recs[-1]["counts"]["processed"] == 0 and recs[-1]["counts"]["skipped_committed"] == N_PDFS

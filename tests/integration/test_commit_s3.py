"""The commit protocol's kill-point matrix on a real S3 server (SeaweedFS on 127.0.0.1).

On S3 a move is a copy then a delete and there are no directories: the roll-forward must still
leave every key exactly once. Same driver and checks as tests/unit/test_commit.py.
"""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from pipeline import storage
from tests.commit_driver import publish_run
from tests.unit.test_commit import STEPS, assert_exactly_once, killed_run


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    storage.clear_cache()
    yield s3_server.env()
    storage.clear_cache()


def s3_reader(fs, prefix: str):
    def read(table: str) -> list[dict]:
        rows = []
        found = fs.find(f"{prefix}/{table}/", detail=True)
        for key in sorted(k for k, i in found.items() if i["type"] == "file"):
            rows += pq.read_table(io.BytesIO(fs.cat(key))).to_pylist()
        return rows
    return read


@pytest.mark.parametrize("step", STEPS)
def test_s3_kill_at_each_commit_step_then_rerun_is_exactly_once(s3_server, s3_bucket, s3_env, step):
    root = f"s3://{s3_bucket}/out"
    killed_run(root, "dead", step, fail_every=3, env=s3_env)
    publish_run(root, "next", 10)
    fs = s3_server.client()
    results, docs = s3_reader(fs, f"{s3_bucket}/out")("results"), s3_reader(fs, f"{s3_bucket}/out")("documents")
    assert_exactly_once(results, docs)
    for left in ("_commits", "_staging"):  # SeaweedFS may keep an empty folder entry: no files, then
        found = fs.find(f"{s3_bucket}/out/{left}/", detail=True)
        assert not [k for k, i in found.items() if i["type"] == "file"], found
    # the failed sources of the dead run are retried and superseded by the rerun
    assert all(r["status"] == "ok" for r in results)


def test_s3_kill_while_republishing(s3_server, s3_bucket, s3_env):
    root = f"s3://{s3_bucket}/out"
    publish_run(root, "first", 10, fail_every=3)
    killed_run(root, "dead", "applied-results", env=s3_env)
    publish_run(root, "next", 10)
    fs = s3_server.client()
    read = s3_reader(fs, f"{s3_bucket}/out")
    assert_exactly_once(read("results"), read("documents"))


# ---------------------------------------------------------------------------------------------
# Partitioned output and file sets appended to (output.partition_by, output.min_rows_per_file)

KEYS = ("task", "status")


def killed_partitioned_run(root: str, attempt: str, step: str, env: dict, fail_every: int = 0) -> None:
    import os
    import subprocess
    import sys

    from pipeline import commit
    from tests.unit.test_commit import N, ROOT

    full = {**os.environ, **env, commit.FAULT_ENV: step, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.commit_driver", root, attempt, str(N), str(fail_every),
                           ",".join(KEYS), "1000"], env=full, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 137, (proc.returncode, proc.stdout, proc.stderr[-2000:])


def hive_reader(fs, prefix: str):
    """What pyarrow's hive discovery reads from a table directory on S3 (partition columns from the keys)."""
    def read(table: str) -> list[dict]:
        if not [k for k, i in fs.find(f"{prefix}/{table}/", detail=True).items() if i["type"] == "file"]:
            return []
        return pq.read_table(f"{prefix}/{table}", filesystem=fs).to_pylist()
    return read


@pytest.mark.parametrize("step", STEPS)
def test_s3_kill_while_appending_to_partitioned_files_then_rerun(s3_server, s3_bucket, s3_env, step):
    """Killed in the second window, which appends to the open file set in every partition: before the
    rerun no row is seen twice; after it, every key once, in one file per partition."""
    root = f"s3://{s3_bucket}/out"
    killed_partitioned_run(root, "dead", f"{step}:2", s3_env)
    fs = s3_server.client()
    read = hive_reader(fs, f"{s3_bucket}/out")
    before = read("results")
    assert len({(r["source_id"], r["unit_index"], r["task"]) for r in before}) == len(before) >= 4 * 3 * 2
    publish_run(root, "next", 10, partition_by=KEYS, min_rows_per_file=1000)
    results, docs = read("results"), read("documents")
    assert_exactly_once(results, docs)
    names = {k.rsplit("/", 1)[-1] for k, i in fs.find(f"{s3_bucket}/out/results/", detail=True).items()
             if i["type"] == "file"}
    assert names == {"dead-w00001.parquet"}
    for left in ("_commits", "_staging"):
        found = fs.find(f"{s3_bucket}/out/{left}/", detail=True)
        assert not [k for k, i in found.items() if i["type"] == "file"], found


def test_s3_partitioned_republish_read_by_pandas(s3_server, s3_bucket, s3_env):
    import pandas as pd

    root = f"s3://{s3_bucket}/out"
    publish_run(root, "first", 10, fail_every=3, partition_by=KEYS)
    killed_partitioned_run(root, "dead", "applied-results", s3_env)  # re-publishing sources 0, 3, 6, 9
    publish_run(root, "next", 10, partition_by=KEYS, min_rows_per_file=1000)
    opts = {"key": s3_server.access_key, "secret": s3_server.secret_key,
            "client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    results = pd.read_parquet(f"{root}/results", storage_options=opts)
    docs = pd.read_parquet(f"{root}/documents", storage_options=opts)
    assert_exactly_once(results.astype(object).where(results.notna(), None).to_dict("records"),
                        docs.to_dict("records"))
    assert set(results["status"]) == {"ok"} and set(results["task"]) == {"ocr", "caption"}

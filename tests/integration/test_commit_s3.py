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

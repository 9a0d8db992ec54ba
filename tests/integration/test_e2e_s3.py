"""End to end: corpus on a real S3 server -> `cpmv run` (real Ray, tiny MiniCPM-V 4.6) -> Parquet on S3.

Runs the console script in a subprocess, as a user would, with its own Ray temp dir; the subprocess
starts and stops its own local Ray cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.samples import make_bad_corpus, make_demo_corpus
from schemas.records import DOCUMENTS_SCHEMA, RESULTS_SCHEMA

pytestmark = pytest.mark.slow

JOB = """
name: e2e
input:
  uris: ["s3://{bucket}/corpus/"]
output:
  uri: s3://{bucket}/out
storage:
  s3:
    endpoint_url: ${{AWS_ENDPOINT_URL}}
    access_key_id: ${{AWS_ACCESS_KEY_ID}}
    secret_access_key: ${{AWS_SECRET_ACCESS_KEY}}
model:
  name: tiny
  max_slice_nums: 2
  cache_dir: {cache}
tasks:
  - {{name: ocr, max_new_tokens: 6}}
  - {{name: caption, max_new_tokens: 4}}
  - {{name: video_caption, max_new_tokens: 4}}
video: {{clip_seconds: 2, fps: 2, max_frames_per_clip: 3}}
engine: {{batch_size: 4}}
ray: {{num_cpus: 2}}
checks: {{enabled: false}}  # tiny random replies run to the cap; reply checks: tests/engines/test_reply_checks.py
"""

GOOD = {"report.pdf", "scan.pdf", "photo.jpg", "logo.png", "clip.mp4"}
BAD = {"empty.pdf": "empty_file", "notes.jpg": "unsupported_media_type", "broken.mp4": "video_decode_failed"}


def _cpmv(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"cpmv failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def e2e(s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    bucket = "e2e-corpus"
    s3_server.make_bucket(bucket)
    fs = s3fs.S3FileSystem(key=s3_server.access_key, secret=s3_server.secret_key,
                           client_kwargs={"endpoint_url": s3_server.endpoint_url})
    files = make_demo_corpus(tmp / "corpus") + make_bad_corpus(tmp / "corpus")
    for f in files:
        fs.put(str(f), f"{bucket}/corpus/{f.name}")
    job = tmp / "job.yaml"
    job.write_text(JOB.format(bucket=bucket, cache=tmp / "cache"))
    env = {**os.environ, **s3_server.env(), "RAY_TMPDIR": str(tmp / "ray"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("RAY_ADDRESS", None)
    (tmp / "ray").mkdir()
    first = _cpmv(["run", str(job)], env, tmp)
    results_after_first = sorted(fs.find(f"{bucket}/out/results/"))
    second = _cpmv(["run", str(job)], env, tmp)
    local = tmp / "download"
    fs.get(f"{bucket}/out/", str(local) + "/", recursive=True)
    return {"fs": fs, "bucket": bucket, "first": first, "second": second, "local": local,
            "results_after_first": results_after_first, "names": {f.name for f in files}}


def _results(e2e) -> pa.Table:
    return pq.read_table(e2e["local"] / "results")


def _documents(e2e) -> pa.Table:
    return pq.read_table(e2e["local"] / "documents")


def test_schemas_are_the_versioned_ones(e2e):
    for table, schema in ((_results(e2e), RESULTS_SCHEMA), (_documents(e2e), DOCUMENTS_SCHEMA)):
        assert table.schema.names == schema.names
        for f in schema:
            assert table.schema.field(f.name).type == f.type, f.name


def test_one_documents_row_per_source(e2e):
    docs = _documents(e2e).to_pylist()
    names = sorted(d["source_uri"].rsplit("/", 1)[-1] for d in docs)
    assert names == sorted(e2e["names"])
    assert len({d["source_id"] for d in docs}) == len(docs)


def test_good_inputs_ok_with_one_row_per_unit_and_task(e2e):
    rows = _results(e2e).to_pylist()
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(r["source_uri"].rsplit("/", 1)[-1], []).append(r)
    expected_units = {"report.pdf": 2, "scan.pdf": 1, "photo.jpg": 1, "logo.png": 1, "clip.mp4": 2}
    for name, n_units in expected_units.items():
        got = by_name[name]
        assert all(r["status"] == "ok" for r in got), [(r["status"], r["error_message"]) for r in got]
        tasks = {"video_caption"} if name.endswith(".mp4") else {"ocr", "caption"}
        pairs = sorted((r["unit_index"], r["task"]) for r in got)
        assert pairs == sorted((i, t) for i in range(n_units) for t in tasks), name
        for r in got:
            assert r["completion_tokens"] >= 1 and r["prompt_tokens"] > 10
            assert r["width"] > 0 and r["height"] > 0
    clips = sorted(by_name["clip.mp4"], key=lambda r: r["unit_index"])
    assert clips[0]["start_s"] == 0 and clips[1]["start_s"] == pytest.approx(2.0, abs=0.1)
    assert all(1 <= r["num_frames"] <= 3 for r in clips)
    photo = by_name["photo.jpg"][0]
    assert "exif_rotated" in photo["flags"]


def test_bad_inputs_are_explained_rows(e2e):
    rows = _results(e2e).to_pylist()
    docs = {d["source_uri"].rsplit("/", 1)[-1]: d for d in _documents(e2e).to_pylist()}
    for name, etype in BAD.items():
        mine = [r for r in rows if r["source_uri"].endswith("/" + name)]
        assert mine, name
        assert all(r["status"] == "error" and r["error_type"] == etype and r["error_message"] for r in mine), mine
        assert all(r["unit_index"] == -1 and r["unit_kind"] == "source" for r in mine)
        assert docs[name]["status"] == "error" and docs[name]["error_type"] == etype
    # a truncated PDF opens repaired: it must say so, never pass silently as a complete document
    trunc = docs["truncated.pdf"]
    assert "pdf_repaired" in trunc["flags"] or trunc["status"] == "error"


def test_provenance_columns(e2e):
    t = _results(e2e)
    record_files = [p for p in e2e["fs"].find(f"{e2e['bucket']}/out/_runs/") if p.endswith(".json")]
    first_run = json.loads(e2e["fs"].cat(sorted(record_files)[0]))
    assert set(t.column("run_id").to_pylist()) == {first_run["run_id"]}
    assert set(t.column("model").to_pylist()) == {"tiny:minicpmv4_6"}
    assert set(t.column("model_family").to_pylist()) == {"minicpmv4_6"}
    assert set(t.column("engine").to_pylist()) == {"transformers"}
    versions = dict(zip(t.column("task").to_pylist(), t.column("prompt_version").to_pylist()))
    assert versions["ocr"] == "ocr-v1" and versions["video_caption"] == "video-caption-v1"
    assert first_run["counts"]["processed"] == len(e2e["names"])
    assert "versions" in first_run and first_run["versions"]["ray"]


def test_credentials_never_reach_outputs(e2e, s3_server):
    secret = s3_server.secret_key
    for path in e2e["local"].rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in e2e["first"].stdout + e2e["first"].stderr


def test_rerun_skips_committed_sources(e2e):
    out = e2e["second"].stdout
    assert f"{len(e2e['names'])} skipped (already committed)" in out, out
    assert sorted(e2e["fs"].find(f"{e2e['bucket']}/out/results/")) == e2e["results_after_first"]
    records = [json.loads(e2e["fs"].cat(p)) for p in e2e["fs"].find(f"{e2e['bucket']}/out/_runs/") if p.endswith(".json")]
    assert sorted(r["counts"]["processed"] for r in records) == [0, len(e2e["names"])]
    assert not e2e["fs"].exists(f"{e2e['bucket']}/out/_staging/") or not e2e["fs"].find(f"{e2e['bucket']}/out/_staging/")


def test_readers_pandas_and_duckdb(e2e):
    import duckdb
    import pandas as pd

    results_dir = e2e["local"] / "results"
    df = pd.read_parquet(results_dir)
    assert len(df) == _results(e2e).num_rows and set(df["status"]) <= {"ok", "error", "skipped"}
    con = duckdb.connect()
    n_ok, n_err = con.execute(
        f"select count(*) filter (where status = 'ok'), count(*) filter (where status = 'error') "
        f"from read_parquet('{results_dir}/*.parquet')").fetchone()
    assert n_ok == int((df["status"] == "ok").sum()) and n_err == int((df["status"] == "error").sum())
    docs = con.execute(f"select count(*) from read_parquet('{e2e['local']}/documents/*.parquet')").fetchone()[0]
    assert docs == len(e2e["names"])

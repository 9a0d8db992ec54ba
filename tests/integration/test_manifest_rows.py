"""Per-row prompts, pass-through columns and content de-duplication through real runs: a real local
Ray, a tiny random MiniCPM-V 4.6 (transformers engine), real Parquet/CSV manifests on local disk and
on the SeaweedFS S3 server. Engine work is counted with the CPMV_ENGINE_CALL_LOG hook (one line per
request the engine was handed) and the run record's counts."""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.infer import CALL_LOG_ENV

pytestmark = pytest.mark.slow

TS = pa.timestamp("us", tz="UTC")
LONG = ("Name every colour you can see in this {animal} picture, one colour per line, and say for each "
        "where in the picture it appears")


@pytest.fixture
def local_ray(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp"))
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(CALL_LOG_ENV, str(tmp_path / "calls.log"))  # before Ray starts: workers inherit it
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray

    yield ray
    ray.shutdown()


def _image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def _corpus(d: Path) -> dict[str, str]:
    d.mkdir(parents=True, exist_ok=True)
    a = _image(d / "a.png", 1)
    shutil.copy(a, d / "b.png")  # the same bytes under another name
    shutil.copy(a, d / "d.png")  # the same bytes again, asked another question
    _image(d / "c.png", 2)
    _image(d / "e.png", 3)
    return {n: str(d / f"{n}.png") for n in "abcde"}


def _calls(tmp_path: Path) -> int:
    log = tmp_path / "calls.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _job(manifest: str, out: str, cache: Path, storage: dict | None = None, preprocess: int | None = None):
    from pipeline import load_job_data

    return load_job_data({
        "name": "rows", "input": {"manifest": manifest, "prompt_column": "prompt", "dedup": "content",
                                  "pass_through": ["item_id", "taken_at", "animal"]},
        "output": {"uri": out}, "storage": storage or {},
        "model": {"name": "tiny", "max_slice_nums": 1, "cache_dir": str(cache)},
        "checks": {"enabled": False},  # 3-token random replies run to the cap: plumbing, not reply quality
        "tasks": [{"name": "caption", "max_new_tokens": 3}], "ray": {"num_cpus": 2, "preprocess_concurrency": preprocess},
    })


def _manifest_table(files: dict[str, str], prompts: dict[str, str]) -> pa.Table:
    names = sorted(files)
    return pa.table({
        "uri": [files[n] for n in names],
        "item_id": pa.array([100 + i for i in range(len(names))], pa.int64()),
        "taken_at": pa.array([datetime(2026, 5, i + 1, 12, tzinfo=timezone.utc) for i in range(len(names))], TS),
        "animal": ["cat", "cat", "dog", "cat", "bird"],
        "prompt": [prompts[n] for n in names],
    })


PROMPTS = {"a": "Describe the {animal}.", "b": "Describe the {animal}.", "c": "Describe the {animal}.", "d": LONG,
           "e": "Describe the {colour}."}  # e: a field the manifest lacks -> that source's error row


def _by_name(table: pa.Table) -> dict[str, dict]:
    return {Path(r["source_uri"]).stem: r for r in table.to_pylist()}


def test_local_parquet_manifest_prompts_pass_through_dedup_and_resume(local_ray, tmp_path):
    import duckdb

    from pipeline import run_job

    files = _corpus(tmp_path / "corpus")
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(_manifest_table(files, PROMPTS), manifest)
    out = tmp_path / "out"
    job = _job(str(manifest), str(out), tmp_path / "cache")

    first = run_job(job)
    assert first.status == "complete", first.message
    # a, c and d reach the engine; b is a's bytes with a's prompt (copied); e never reaches it.
    assert _calls(tmp_path) == 3
    assert (first.counts["dedup_sources"], first.counts["dedup_units_saved"], first.counts["dedup_rows_copied"]) == (1, 1, 1)
    record = json.loads(Path(first.reports["json"]).read_text())
    assert record["counts"]["dedup_units_saved"] == 1 and record["throughput"]["units"] == 3  # inferred units only

    results = pq.read_table(out / "results")
    docs = pq.read_table(out / "documents")
    for t in (results, docs):  # pass-through columns at the end, with the manifest's types
        assert t.schema.names[-3:] == ["item_id", "taken_at", "animal"]
        assert t.schema.field("item_id").type == pa.int64() and t.schema.field("taken_at").type == TS
    r = _by_name(results)
    assert r["a"]["status"] == "ok" and r["a"]["prompt"] == "Describe the cat." and r["c"]["prompt"] == "Describe the dog."
    assert r["d"]["prompt"] == LONG.format(animal="cat")
    # The engine saw the text: d's prompt (same image as a) costs more prompt tokens than a's.
    assert r["d"]["prompt_tokens"] > r["a"]["prompt_tokens"]
    # a and b hold the same bytes and question: the first to claim the hash is inferred, the other copies
    # it (which one comes first is the plan's arrival order, not fixed).
    first, copy = ("a", "b") if r["b"]["dedup_of"] == files["a"] else ("b", "a")
    assert r[copy]["dedup_of"] == files[first] and r[first]["dedup_of"] is None
    assert r["b"]["text"] == r["a"]["text"] and r["b"]["source_id"] != r["a"]["source_id"]
    assert r["d"]["dedup_of"] is None  # d: same bytes, other question
    assert r["a"]["content_hash"] == r["b"]["content_hash"] == r["d"]["content_hash"] != r["c"]["content_hash"]
    assert r["a"]["prompt_version"] != r["d"]["prompt_version"] and r["a"]["fingerprint"] != r["d"]["fingerprint"]
    assert r["e"]["status"] == "error" and r["e"]["error_type"] == "prompt_template" and "{colour}" in r["e"]["error_message"]
    assert {n: row["item_id"] for n, row in r.items()} == {"a": 100, "b": 101, "c": 102, "d": 103, "e": 104}
    d = _by_name(docs)
    assert d[copy]["dedup_of"] == files[first] and d[copy]["status"] == "ok" and d["e"]["status"] == "error"
    assert d["c"]["taken_at"] == datetime(2026, 5, 3, 12, tzinfo=timezone.utc)

    # The README's join back to the manifest, on a pass-through key.
    joined = duckdb.sql(f"""
        SELECT m.item_id, m.animal, r.text FROM read_parquet('{manifest}') m
        JOIN read_parquet('{out}/results/*.parquet') r USING (item_id) WHERE r.status = 'ok' ORDER BY m.item_id
    """).fetchall()
    assert [row[0] for row in joined] == [100, 101, 102, 103]

    # A resumed run redoes nothing and writes nothing.
    schema = pq.read_schema(next((out / "results").iterdir()))
    again = run_job(job)
    assert again.status == "complete" and again.counts["processed"] == 0 and _calls(tmp_path) == 3

    # A changed prompt is other work: only that source is redone, and every file keeps one schema.
    pq.write_table(_manifest_table(files, {**PROMPTS, "c": "What is the {animal} doing?"}), manifest)
    third = run_job(job)
    assert third.status == "complete" and third.counts["processed"] == 1 and _calls(tmp_path) == 4
    files_now = sorted((out / "results").iterdir())
    assert len(files_now) == 2 and all(pq.read_schema(f).equals(schema) for f in files_now)
    assert all(pq.read_schema(f).equals(pq.read_schema(next((out / "documents").iterdir())))
               for f in (out / "documents").iterdir())
    r = _by_name(pq.read_table(out / "results"))
    assert len(r) == 5 and r["c"]["prompt"] == "What is the dog doing?" and r["c"]["item_id"] == 102


def test_csv_manifest_on_s3_keeps_inferred_types_and_dedups(local_ray, s3_server, tmp_path):
    from pipeline import run_job

    bucket = s3_server.make_bucket()
    fs = s3_server.client()
    files = _corpus(tmp_path / "corpus")
    uris = {}
    for n, p in files.items():
        fs.put(p, f"{bucket}/in/{n}.png")
        uris[n] = f"s3://{bucket}/in/{n}.png"
    table = _manifest_table(uris, {**PROMPTS, "e": "Describe the {animal}."})
    # CSV: pyarrow infers the types back (int64; an ISO timestamp with a zone as timestamp[s, UTC])
    csv = tmp_path / "manifest.csv"
    pacsv.write_csv(table.set_column(2, "taken_at", pa.array(
        [v.isoformat() for v in table.column("taken_at").to_pylist()])), csv)
    fs.put(str(csv), f"{bucket}/manifest.csv")
    env = s3_server.env()
    storage = {"s3": {"endpoint_url": env["AWS_ENDPOINT_URL"], "access_key_id": env["AWS_ACCESS_KEY_ID"],
                      "secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}}
    # Two preprocess actors: claims are made by different Ray workers, through the run's registry actor.
    job = _job(f"s3://{bucket}/manifest.csv", f"s3://{bucket}/out", tmp_path / "cache", storage, preprocess=2)
    summary = run_job(job)
    assert summary.status == "complete", summary.message
    record = json.loads(fs.cat(f"{bucket}/out/_runs/{summary.attempt}.json"))
    assert record["stages"]["preprocess"]["workers"] == 2
    assert _calls(tmp_path) == 4 and summary.counts["dedup_units_saved"] == 1  # a, c, d, e; b copied
    local = tmp_path / "download"
    fs.get(f"{bucket}/out/results/", str(local / "results"), recursive=True)
    fs.get(f"{bucket}/out/documents/", str(local / "documents"), recursive=True)
    inferred = pacsv.read_csv(csv)
    assert inferred.schema.field("item_id").type == pa.int64()
    assert inferred.schema.field("taken_at").type == pa.timestamp("s", tz="UTC")
    # Parquet has no seconds unit: a timestamp[s] is stored as timestamp[ms], as any Parquet writer does.
    buf = pa.BufferOutputStream()
    pq.write_table(inferred, buf)
    expected = pq.read_schema(pa.BufferReader(buf.getvalue()))
    for name in ("results", "documents"):
        t = pq.read_table(local / name)
        for col in ("item_id", "taken_at", "animal"):
            assert t.schema.field(col).type == expected.field(col).type, col
        assert _by_name(t)["c"]["taken_at"] == datetime(2026, 5, 3, 12, tzinfo=timezone.utc)
    r = _by_name(pq.read_table(local / "results"))
    # a and b hold the same bytes: whichever of the two preprocess actors claimed the hash first was
    # inferred, the other copies it (arrival order is not fixed with two actors).
    pair = {r["a"]["dedup_of"], r["b"]["dedup_of"]}
    assert pair in ({None, uris["a"]}, {None, uris["b"]}), pair
    assert r["a"]["text"] == r["b"]["text"] and r["a"]["source_id"] != r["b"]["source_id"]
    assert r["e"]["prompt"] == "Describe the bird." and r["e"]["status"] == "ok"

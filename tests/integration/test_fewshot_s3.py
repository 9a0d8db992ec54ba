"""Few-shot examples and page windows end to end: inputs and example images on a real S3 server,
`cpmv run` (real Ray, tiny MiniCPM-V 4.6, transformers engine), results on S3; then resume.

The examples' content is part of the fingerprint: a rerun skips everything, and a rerun after an
example image changed under the same URI redoes the tasks with examples only (engine calls counted
through the CPMV_ENGINE_CALL_LOG hook of pipeline/infer.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pymupdf
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

JOB = """
name: fewshot
input: {{uris: ["s3://{bucket}/in/"], manifest: "s3://{bucket}/manifest.parquet", manifest_images_column: views}}
output: {{uri: s3://{bucket}/out}}
storage:
  s3: {{endpoint_url: "${{AWS_ENDPOINT_URL}}", access_key_id: "${{AWS_ACCESS_KEY_ID}}",
        secret_access_key: "${{AWS_SECRET_ACCESS_KEY}}"}}
model: {{name: tiny, max_slice_nums: 2, cache_dir: {cache}}}
tasks:
  - {{name: ocr, max_new_tokens: 3}}
  - name: table
    max_new_tokens: 3
    examples:
      - {{image: "s3://{bucket}/examples/table.png", answer: "| a | b |\\n|---|---|\\n| 1 | 2 |"}}
  - name: caption
    max_new_tokens: 3
    examples:
      - {{image: "s3://{bucket}/examples/cat.png", answer: "A cat on a mat."}}
      - {{image: "s3://{bucket}/examples/table.png", answer: "A table of numbers."}}
pdf: {{page_window: 2}}
ray: {{num_cpus: 2}}
checks: {{enabled: false}}
"""


def _png(seed: int, h: int = 96, w: int = 128) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _pdf() -> bytes:
    doc = pymupdf.open()
    for i in range(3):
        doc.new_page(width=400, height=300).insert_text((40, 40), f"| item | price |\n| row {i} | {i}.00 |")
    return doc.tobytes()


def _run(job: Path, env: dict[str, str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"cpmv failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _calls(log: Path) -> int:
    n = len(log.read_text().splitlines()) if log.exists() else 0
    log.unlink(missing_ok=True)
    return n


def test_examples_from_s3_page_windows_and_resume(s3_server, s3_bucket, tmp_path):
    fs = s3_server.client()
    fs.pipe(f"{s3_bucket}/in/doc.pdf", _pdf())
    fs.pipe(f"{s3_bucket}/in/photo.png", _png(1, 200, 300))
    fs.pipe(f"{s3_bucket}/examples/table.png", _png(2))
    fs.pipe(f"{s3_bucket}/examples/cat.png", _png(3))
    # A multi-image manifest row: two views of one object, one unit of two images.
    fs.pipe(f"{s3_bucket}/views/front.png", _png(5, 120, 160))
    fs.pipe(f"{s3_bucket}/views/back.png", _png(6, 160, 120))
    import io

    import pyarrow as pa

    buf = io.BytesIO()
    pq.write_table(pa.table({"views": [[f"s3://{s3_bucket}/views/front.png", f"s3://{s3_bucket}/views/back.png"]]}),
                   buf)
    fs.pipe(f"{s3_bucket}/manifest.parquet", buf.getvalue())
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(bucket=s3_bucket, cache=tmp_path / "cache"))
    log = tmp_path / "calls.log"
    ray_tmp = tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp")  # short: Ray's socket paths are capped at 107 bytes
    env = {**os.environ, **s3_server.env(), "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "CPMV_ENGINE_CALL_LOG": str(log)}
    env.pop("RAY_ADDRESS", None)

    _run(job, env, tmp_path)
    # PDF: 3 ocr pages + 3 table windows + 3 caption pages; photo and the manifest row: ocr, table, caption.
    assert _calls(log) == 15
    local = tmp_path / "dl"
    fs.get(f"{s3_bucket}/out/results/", str(local) + "/", recursive=True)
    rows = pq.read_table(local).to_pylist()
    assert len(rows) == 15 and all(r["status"] == "ok" for r in rows), [r["error_message"] for r in rows]
    pdf = {(r["task"], r["unit_index"]): r for r in rows if r["source_uri"].endswith(".pdf")}
    assert [pdf[("table", i)]["pages"] for i in range(3)] == [[0, 1], [1, 2], [2]]
    assert pdf[("ocr", 0)]["pages"] is None
    # The examples' images are in the prompt (caption: two, table: one plus the window's second page).
    assert pdf[("caption", 2)]["prompt_tokens"] > pdf[("ocr", 2)]["prompt_tokens"] + 2 * 60
    assert pdf[("table", 0)]["prompt_version"] == "table-v1+fewshot1"
    views = [r for r in rows if "|" in r["source_uri"]]
    assert sorted(r["task"] for r in views) == ["caption", "ocr", "table"]
    assert views[0]["source_uri"] == f"s3://{s3_bucket}/views/front.png|s3://{s3_bucket}/views/back.png"
    photo = {r["task"]: r for r in rows if r["source_uri"].endswith("photo.png")}
    view = {r["task"]: r for r in views}
    assert view["ocr"]["num_frames"] == 2 and view["ocr"]["prompt_tokens"] > photo["ocr"]["prompt_tokens"]

    _run(job, env, tmp_path)
    assert _calls(log) == 0  # committed at these fingerprints: nothing redone

    fs.pipe(f"{s3_bucket}/examples/cat.png", _png(4))  # same URI, new content
    _run(job, env, tmp_path)
    assert _calls(log) == 5  # the caption task only (3 pages, the photo, the row); ocr and table stay

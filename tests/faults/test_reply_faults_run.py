"""Reply checks end to end: `cpmv run` (real Ray, real PDFs and PNGs) against a FAULT INJECTION
OpenAI-compatible stand-in on 127.0.0.1 that loops on red pages and answers nothing for green ones.

Asserts what a user reads: result rows (status, error_type, attempts, fallback), documents by the
`documents.max_failed_unit_share` rule, the run summary's counts, and the temperatures the server got.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.chat_standin import ChatStandIn

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GOOD = "The page says hello in plain words."
LAYER = "This page has a loop for the model but a good text layer that the pipeline can use instead of it."
LOOP = "| 12.5 " * 200

JOB = """
name: checks
input: {{uris: ["{corpus}/"]}}
output: {{uri: "{out}", commit_every_units: 100}}
model: {{name: served, family: minicpmv4_6}}
engine: {{kind: openai, batch_size: 4, openai: {{base_url: "{url}", max_retries: 0}}}}
tasks:
  - {{name: ocr, max_new_tokens: 64, retries: 1}}
documents: {{max_failed_unit_share: 0.1}}
ray: {{num_cpus: 2}}
"""


class Server(ChatStandIn):
    """FAULT INJECTION: red image -> a loop to the cap; green image -> empty content; else a good reply."""

    def __init__(self):
        self.sent: list[tuple[str, float]] = []

        def answer(body, image):
            px = np.asarray(image.convert("RGB"), float)
            r, g, b = px.reshape(-1, 3).mean(axis=0)
            kind = "red" if r > 150 > g + 50 else "green" if g > 150 > r + 50 else "plain"
            self.sent.append((kind, body["temperature"]))
            content, finish = {"red": (LOOP, "length"), "green": ("", "stop")}.get(kind, (GOOD, "stop"))
            return {"content": content}, finish, {"prompt_tokens": 10, "completion_tokens": 64}

        super().__init__(answer)


def _pdf(path: Path, pages: list[str]) -> None:
    """Pages: "text" (white, a line of text), "red" (red, no text), "red+layer" (red with a text layer)."""
    import pymupdf

    doc = pymupdf.open()
    for kind in pages:
        page = doc.new_page(width=300, height=400)
        if kind.startswith("red"):
            page.draw_rect(page.rect, color=None, fill=(1, 0, 0))
        if kind == "text":
            page.insert_text((30, 60), "an ordinary page", fontsize=14)
        if kind == "red+layer":
            for k in range(4):
                page.insert_text((10, 40 + 20 * k), LAYER[k * 25:(k + 1) * 25], fontsize=11)
    doc.save(path)


def _png(path: Path, rgb: tuple[int, int, int]) -> None:
    from PIL import Image

    Image.new("RGB", (120, 90), rgb).save(path)


def test_run_reports_reply_failures_fallback_and_document_rules(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # 10 pages, 1 failing (10%, not above 0.1) + 1 falling back to its text layer: partial
    _pdf(corpus / "ten.pdf", ["text"] * 3 + ["red"] + ["text"] + ["red+layer"] + ["text"] * 4)
    _pdf(corpus / "two.pdf", ["text", "red"])  # 1 of 2 failing (50%): error
    _png(corpus / "white.png", (250, 250, 250))  # ok
    _png(corpus / "green.png", (0, 200, 0))  # empty replies: error
    server = Server()
    (tmp_path / "job.yaml").write_text(JOB.format(corpus=corpus, out=tmp_path / "out", url=server.url))
    ray_tmp = tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "job.yaml")], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        server.httpd.shutdown()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = pq.read_table(tmp_path / "out" / "results").to_pylist()
    docs = {Path(d["source_uri"]).name: d for d in pq.read_table(tmp_path / "out" / "documents").to_pylist()}
    by = {(Path(r["source_uri"]).name, r["unit_index"]): r for r in results}
    red = by[("ten.pdf", 3)]
    assert (red["status"], red["error_type"], red["attempts"]) == ("error", "reply_repetitive", 2)
    assert red["retry_reasons"] == ["repetitive", "repetitive"] and red["text"].startswith("| 12.5")
    fell = by[("ten.pdf", 5)]
    assert (fell["status"], fell["output_source"], fell["retry_reasons"]) == ("ok", "text_layer_fallback",
                                                                              ["repetitive", "repetitive"])
    assert "good text" in fell["text"] and "instead of it" in fell["text"]
    assert by[("ten.pdf", 0)]["text"] == GOOD and by[("ten.pdf", 0)]["attempts"] == 1
    green = by[("green.png", 0)]
    assert (green["status"], green["error_type"], green["attempts"]) == ("error", "reply_empty", 2)
    assert not any(r["status"] == "ok" and r["output_source"] == "model" and r["text"] != GOOD for r in results)

    assert docs["ten.pdf"]["status"] == "partial" and docs["ten.pdf"]["units_failed"] == 1
    assert docs["two.pdf"]["status"] == "error" and "above documents.max_failed_unit_share" in \
        docs["two.pdf"]["error_message"]
    assert docs["white.png"]["status"] == "ok" and docs["green.png"]["status"] == "error"
    # the summary: documents by status, failed rows by error type
    assert "documents  error 2, ok 1, partial 1" in proc.stdout, proc.stdout
    assert "errors     reply_repetitive x2, reply_empty x1 (result rows)" in proc.stdout, proc.stdout
    # every failed reply was asked again at the schedule's next temperature
    temps = {}
    for kind, t in server.sent:
        temps.setdefault(kind, []).append(t)
    assert sorted(temps["red"]) == [0.0, 0.0, 0.0, 0.2, 0.2, 0.2] and sorted(temps["green"]) == [0.0, 0.2]
    assert set(temps["plain"]) == {0.0}

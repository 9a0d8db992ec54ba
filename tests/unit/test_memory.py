"""Process settings of the preprocess actors (pipeline/memory.py), each checked in a fresh process:
they are process-wide and cannot be undone, so they must never leak into the test runner."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


_FAULTS = """
    import json, resource, sys
    import numpy as np
    from pipeline import memory
    tuned = memory.keep_freed_buffers() if {tune} else False

    def block():  # what Ray holds before copying a block out: six ~21 MB pages, all written
        pages = [np.empty(21 * 2**20, np.uint8) for _ in range(6)]
        for page in pages:
            page.fill(255)
        return pages

    pages = block(); del pages
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        pages = block(); del pages
    print(json.dumps({{"tuned": tuned, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3}}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_page_buffers_are_reused_without_page_faults():
    tuned = _run(_FAULTS.format(tune=True))
    default = _run(_FAULTS.format(tune=False))
    pages = 6 * 21 * 2**20 // 4096
    assert tuned["tuned"] is True
    assert tuned["faults"] < 0.01 * pages  # every buffer came back from the process's own heap
    # The premise: without the setting, glibc hands the memory back and it faults in again.
    assert default["faults"] > 10 * (tuned["faults"] + 10), default


def test_only_an_actor_stage_tunes_its_process(tmp_path):
    """ExpandSource(actor=True) freezes the long-lived objects once its libraries are loaded; a stage
    in someone else's process (cpmv inspect, a notebook) leaves the process as it found it."""
    from pipeline import samples

    pdf = tmp_path / "a.pdf"
    pdf.write_bytes(samples.report_pdf_bytes())
    code = """
        import gc, json, sys
        import pyarrow as pa
        from pipeline.config import load_job_data
        from pipeline.expand import ExpandSource
        job = load_job_data({{"input": {{"uris": ["{pdf}"]}}, "output": {{"uri": "o"}}, "model": {{"name": "tiny"}}}})
        stage = ExpandSource(job, 448 * 448, {{"ocr": ["page", "image"]}}, "minicpmv4_6", actor={actor})
        src = pa.Table.from_pylist([{{"source_uri": "{pdf}", "source_id": "a", "size": None, "tasks": ["ocr"]}}])
        rows = sum(t.num_rows for t in stage(src))
        print(json.dumps({{"rows": rows, "frozen": gc.get_freeze_count(), "pymupdf": "pymupdf" in sys.modules,
                          "av": "av" in sys.modules}}))
    """
    actor = _run(code.format(pdf=pdf, actor=True))
    caller = _run(code.format(pdf=pdf, actor=False))
    assert actor["rows"] == caller["rows"] == 2
    assert actor["frozen"] > 10_000 and actor["pymupdf"]  # Ray-free here, still pyarrow's and MuPDF's objects
    assert caller["frozen"] == 0 and not caller["av"]  # nothing frozen, no decoder imported that is not needed

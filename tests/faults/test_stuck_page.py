"""A page that never finishes: the job ends, with that page as a `page_timeout` row.

Two stuck pages, both blocking in C with the GIL held, where no thread of the process can act:
- a real one, inside MuPDF: a page of nested form XObjects (`_nested_forms_pdf`, our construction)
  whose display list would take minutes and gigabytes. A preprocess process is killed on it by its
  watchdog, and the retried expansion gives the page's error row;
- under Ray Data, the test-only fault-injection hook of pipeline/media/pdf.py (`CPMV_FAULT_BLOCK_PAGE`),
  which blocks the planning of a chosen page for ever: the watchdog records the page and kills the
  actor, Ray restarts it and retries the task, and the new actor turns the page into its error row
  and goes on. Ray runs in a subprocess with its own RAY_TMPDIR, on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pymupdf
import pytest

from pipeline import samples

DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    from ray.data import ActorPoolStrategy
    from pipeline.config import load_job_data
    from pipeline.expand import ExpandSource

    args = json.loads(sys.argv[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"CPMV_FAULT_BLOCK_PAGE": args["fault"]}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    job = load_job_data({"input": {"uris": ["x"]}, "output": {"uri": "o"},
                         "model": {"name": "tiny", "max_slice_nums": 1}, "limits": {"page_timeout_s": 2}})
    ds = ray.data.from_items(args["sources"]).map_batches(
        ExpandSource, batch_size=1, batch_format="pyarrow", compute=ActorPoolStrategy(size=1),
        fn_constructor_kwargs={"job": job, "pixel_budget": 448 * 448, "task_kinds": {"ocr": ["page"]},
                               "family": "minicpmv4_6", "actor": True, "state_uri": args["state"]})
    cols = ["source_id", "unit_index", "unit_kind", "tile_index", "error_type", "error_message", "width"]
    print("ROWS " + json.dumps(ds.select_columns(cols).take_all()))
""")


def _nested_forms_pdf(depth: int = 8, fan: int = 10) -> bytes:
    """A 3-page PDF whose page 2 draws a form XObject that draws the next one `fan` times, `depth` deep:
    fan**depth form runs from ~2 KB (PDF's "billion laughs"). MuPDF interprets every run in
    page.get_displaylist, keeping the GIL, ~200k a second here: 10**8 would take about ten minutes and
    ~9 GB of display list. Pages 1 and 3 are ordinary."""
    forms = pymupdf.open()
    page = forms.new_page(width=200, height=200)
    prev = forms.get_new_xref()
    forms.update_object(prev, "<< /Type /XObject /Subtype /Form /BBox [0 0 200 200] >>")
    forms.update_stream(prev, b"q Q")
    for _ in range(depth):
        xref = forms.get_new_xref()
        forms.update_object(xref, "<< /Type /XObject /Subtype /Form /BBox [0 0 200 200] "
                                  f"/Resources << /XObject << /X {prev} 0 R >> >> >>")
        forms.update_stream(xref, b" ".join([b"/X Do"] * fan))
        prev = xref
    forms.xref_set_key(page.xref, "Resources", f"<< /XObject << /X {prev} 0 R >> >>")
    contents = forms.get_new_xref()
    forms.update_object(contents, "<< >>")
    forms.update_stream(contents, b"/X Do")
    forms.xref_set_key(page.xref, "Contents", f"{contents} 0 R")
    plain = pymupdf.open(stream=samples.multipage_pdf_bytes(2), filetype="pdf")
    doc = pymupdf.open()
    doc.insert_pdf(plain, from_page=0, to_page=0)
    doc.insert_pdf(forms)
    doc.insert_pdf(plain, from_page=1, to_page=1)
    return doc.tobytes()


EXPAND_CHILD = textwrap.dedent("""
    import json, sys
    import pyarrow as pa
    from pipeline.config import load_job_data
    from pipeline.expand import ExpandSource

    args = json.loads(sys.argv[1])
    job = load_job_data(args["job"])
    stage = ExpandSource(job, 448 * 448, {"ocr": ["page"]}, "minicpmv4_6", actor=True, state_uri=args["state"])
    for table in stage(pa.Table.from_pylist([args["source"]])):
        print(table.column("unit_index").to_pylist(), flush=True)
    print("finished")
""")


def test_a_real_page_stuck_inside_mupdf_is_recorded_then_its_row_comes_on_the_retry(tmp_path):
    path = tmp_path / "forms.pdf"
    path.write_bytes(_nested_forms_pdf())
    job = {"input": {"uris": ["x"]}, "output": {"uri": "o"}, "model": {"name": "tiny", "max_slice_nums": 1},
           # The memory limit is a safety net only: the page must be stopped for its time, long before.
           "limits": {"page_timeout_s": 2, "max_worker_memory_mb": 4096}}
    source = {"source_uri": str(path), "source_id": "forms", "size": path.stat().st_size, "tasks": ["ocr"]}
    state = tmp_path / "timeouts"
    args = {"job": job, "source": source, "state": str(state)}
    t0 = time.monotonic()
    child = subprocess.run([sys.executable, "-c", EXPAND_CHILD, json.dumps(args)], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr[-2000:]
    assert "finished" not in child.stdout and time.monotonic() - t0 < 40
    records = [json.loads(p.read_text()) for p in state.iterdir()]
    assert [(r["source_id"], r["unit_index"], r["kind"], r["value"]) for r in records] == [("forms", 1, "page_timeout", 2)]

    # The retry (a new process reading the records) gives the page's row and the other pages.
    from pipeline.config import load_job_data
    from pipeline.expand import ExpandSource

    stage = ExpandSource(load_job_data(job), 448 * 448, {"ocr": ["page"]}, "minicpmv4_6", state_uri=str(state))
    rows = [r for t in stage(pa.Table.from_pylist([source])) for r in t.to_pylist() if r["unit_kind"] == "page"]
    assert [(r["unit_index"], r["error_type"]) for r in rows] == [(0, None), (1, "page_timeout"), (2, None)]
    assert rows[0]["width"] and rows[2]["width"] and rows[1]["pixels"] == []


def _pdf(n_pages: int, title: str) -> bytes:
    doc = pymupdf.open(stream=samples.multipage_pdf_bytes(n_pages), filetype="pdf")
    doc.set_metadata({"title": title})
    return doc.tobytes()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_page_stuck_in_c_becomes_a_page_timeout_row_and_the_job_ends(tmp_path):
    pages = {"a": 3, "b": 4, "c": 2}
    sources = []
    for name, n in pages.items():
        path = tmp_path / f"{name}.pdf"
        path.write_bytes(_pdf(n, f"doc-{name}"))
        sources.append({"source_uri": str(path), "source_id": name, "size": path.stat().st_size, "tasks": ["ocr"]})
    state = tmp_path / "staging" / "timeouts"
    args = {"sources": sources, "state": str(state), "fault": "doc-b:1"}  # page 2 of b blocks
    # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep for them.
    ray_tmp = tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("RAY_ADDRESS", None)
    try:
        out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], env=env, capture_output=True,
                             text=True, timeout=110)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.split("ROWS ", 1)[1].splitlines()[0])

    # The driver deduplicates by (source_id, unit_index, tile_index, task): pages of b before the stuck
    # one may come twice (from the killed attempt and from the retry), identical.
    units = {}
    for r in rows:
        if r["unit_kind"] == "page":
            key = (r["source_id"], r["unit_index"], r["tile_index"])
            assert units.setdefault(key, r) == r
    assert sorted(units) == sorted((s, i, None) for s, n in pages.items() for i in range(n))
    stuck = [r for r in units.values() if r["error_type"] is not None]
    assert [(r["source_id"], r["unit_index"], r["error_type"]) for r in stuck] == [("b", 1, "page_timeout")]
    assert stuck[0]["error_message"] == ("page 2 did not finish planning/rendering within "
                                         "limits.page_timeout_s=2 s; the worker was stopped")
    assert all(r["width"] for r in units.values() if r["error_type"] is None)
    records = [json.loads(p.read_text()) for p in state.iterdir()]
    assert [(r["source_id"], r["unit_index"], r["kind"]) for r in records] == [("b", 1, "page_timeout")]

"""The expand stage's PDF path: pages planned a group at a time, then rendered one at a time.

The fast path (one metadata table per group, each page its slice with the pixels put in) must give
exactly the rows the general path gives (each unit through `_unit_rows` and its own table), keep
page order across groups and failures, and never keep a page's pixels alive past its table.
"""

from __future__ import annotations

import weakref

import pyarrow as pa
import pymupdf
import pytest

from pipeline import samples
from pipeline.config import load_job_data
from pipeline.expand import ExpandSource
from pipeline.media import pdf as pdf_mod

BUDGET = 4 * 448 * 448
LETTER = (612, 792)


def _mixed_pdf() -> bytes:
    """Born-digital pages, a scan, a /Rotate page, a page of sideways text, an A0 poster (tiled),
    and more pages than one group holds."""
    doc = pymupdf.open()
    doc.insert_pdf(pymupdf.open(stream=samples.report_pdf_bytes(), filetype="pdf"))
    doc.insert_pdf(pymupdf.open(stream=samples.scan_pdf_bytes(), filetype="pdf"))
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    page.insert_text((72, 100), "A page stored with /Rotate 90", fontsize=14)
    page.set_rotation(90)
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    for i in range(12):
        page.insert_text((100 + 30 * i, 720), f"Sideways row {i}: quantity, price, total", fontsize=11, rotate=90)
    poster = doc.new_page(width=2384, height=3370)
    for i in range(30):
        poster.insert_text((72, 100 + i * 100), f"Poster line {i} in small print " * 4, fontsize=9)
    doc.insert_pdf(pymupdf.open(stream=samples.multipage_pdf_bytes(4), filetype="pdf"))
    return doc.tobytes()  # 10 pages


def _stage(tmp_path, data: bytes, budget: int = BUDGET, max_slice_nums: int = 4, **pdf):
    path = tmp_path / "doc.pdf"
    path.write_bytes(data)
    job = load_job_data({"input": {"uris": [str(path)]}, "output": {"uri": "o"},
                         "model": {"name": "tiny", "max_slice_nums": max_slice_nums}, "pdf": pdf,
                         "limits": {"max_pages": 9}})
    stage = ExpandSource(job, budget, {"ocr": ["image", "page"]}, "minicpmv4_6")
    src = pa.Table.from_pylist([{"source_uri": str(path), "source_id": "d", "size": len(data), "tasks": ["ocr"]}])
    return stage, src


def _rows(stage, src) -> list[dict]:
    rows = []
    for table in stage(src):
        rows += table.to_pylist()
    for row in rows:
        assert row.pop("preprocess_ms") is not None or row["unit_index"] == -1
    return rows


@pytest.mark.parametrize("plan_ahead", [1, 3, 16])
def test_group_tables_equal_the_general_path(tmp_path, monkeypatch, plan_ahead):
    stage, src = _stage(tmp_path, _mixed_pdf(), plan_ahead_pages=plan_ahead)
    fast = _rows(stage, src)
    monkeypatch.setattr(ExpandSource, "_as_planned", lambda *a: False)  # every page through _unit_rows
    general = _rows(stage, src)
    assert fast == general
    pages = [r["unit_index"] for r in fast]
    assert pages == sorted(pages) and set(pages) == set(range(10))
    assert [r["error_type"] for r in fast if r["unit_index"] == 9] == ["page_limit"]
    poster = [r for r in fast if r["unit_index"] == 5]
    assert len(poster) > 1 and [r["tile_index"] for r in poster] == list(range(len(poster)))
    flags = {r["unit_index"]: r["flags"] for r in fast}
    assert flags[4] == ["rotated_90"] and "Pipeline Report" in fast[0]["text_layer"]


def test_the_fast_path_is_taken(tmp_path, monkeypatch):
    """Guards the test above from passing vacuously: born-digital pages do go out as group slices."""
    stage, src = _stage(tmp_path, _mixed_pdf(), plan_ahead_pages=4)
    taken = []
    original = ExpandSource._as_planned

    def spy(self, unit, size, n_flags):
        taken.append((unit.unit_index, original(self, unit, size, n_flags)))
        return taken[-1][1]

    monkeypatch.setattr(ExpandSource, "_as_planned", spy)
    _rows(stage, src)
    fast = {i for i, ok in taken if ok}
    assert {0, 1, 2, 3, 6, 7, 8}.issubset(fast) and 5 not in fast  # the poster is tiled: general path


def test_failures_while_planning_and_while_rendering_stay_in_their_place(tmp_path, monkeypatch):
    stage, src = _stage(tmp_path, samples.multipage_pdf_bytes(7), plan_ahead_pages=3)
    calls = {"plan": 0, "render": 0}
    get_displaylist, get_pixmap = pymupdf.Page.get_displaylist, pymupdf.DisplayList.get_pixmap

    def flaky_plan(self, *args, **kwargs):
        calls["plan"] += 1
        if calls["plan"] == 2:
            raise RuntimeError("simulated interpretation failure")
        return get_displaylist(self, *args, **kwargs)

    def flaky_render(self, *args, **kwargs):
        calls["render"] += 1
        if calls["render"] == 4:  # the 5th page: page 2 never reaches the render
            raise RuntimeError("simulated render failure")
        return get_pixmap(self, *args, **kwargs)

    monkeypatch.setattr(pymupdf.Page, "get_displaylist", flaky_plan)
    monkeypatch.setattr(pymupdf.DisplayList, "get_pixmap", flaky_render)
    rows = _rows(stage, src)
    assert [r["unit_index"] for r in rows] == list(range(7))
    assert [r["error_type"] for r in rows] == [None, "page_render_failed", None, None, "page_render_failed", None, None]
    assert "interpretation" in rows[1]["error_message"] and "render failure" in rows[4]["error_message"]
    assert rows[4]["pixels"] == [] and rows[4]["text_layer"] is None and rows[5]["pixels"]


def test_no_page_buffer_outlives_its_table(tmp_path, monkeypatch):
    """While a page renders, every earlier page's pixmap is gone once its table was dropped, also
    across group boundaries (the plans of a group must not hold rendered pages). Pages at a 36-slice
    budget (~20 MB) go out one per table, as in production."""
    stage, src = _stage(tmp_path, samples.multipage_pdf_bytes(7), budget=36 * 448 * 448, max_slice_nums=36,
                        plan_ahead_pages=3)
    render, alive, leaks = pdf_mod._render, [], []

    def tracked(*args, **kwargs):
        leaks.append(sum(ref() is not None for ref in alive))  # (an assert here would become an error row)
        frame, pix = render(*args, **kwargs)
        alive.append(weakref.ref(pix))
        return frame, pix

    monkeypatch.setattr(pdf_mod, "_render", tracked)
    n = 0
    for table in stage(src):
        n += table.num_rows
        del table
    assert n == 7 and len(alive) == 7 and leaks == [0] * 7

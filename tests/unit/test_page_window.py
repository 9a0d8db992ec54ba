"""`pdf.page_window`: the table task's units are windows of consecutive pages (real pymupdf PDFs)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pymupdf
import pytest

from pipeline.config import load_job_data
from pipeline.expand import ExpandSource, _PageWindows
from pipeline.media.base import MediaUnit

FAMILY = "minicpmv4_6"
BUDGET = 36 * 448 * 448
KINDS = {"ocr": ["image", "page"], "table": ["image", "page"], "caption": ["image", "page"]}


def _pdf(path: Path, sizes: list[tuple[float, float]]) -> str:
    doc = pymupdf.open()
    for i, (w, h) in enumerate(sizes):
        page = doc.new_page(width=w, height=h)
        page.insert_text((72, 72), f"| item | price |\n|---|---|\n| page {i} | {i}.00 |")
    doc.save(path)
    return str(path)


def _job(tmp_path: Path, tasks: list[str], window: int = 2, **extra):
    return load_job_data({"input": {"uris": ["x"]}, "output": {"uri": str(tmp_path / "o")},
                          "tasks": [{"name": t} for t in tasks], "pdf": {"page_window": window}, **extra})


def _rows(job, uri: str, tasks: list[str], markers: bool = False) -> list[dict]:
    ex = ExpandSource(job, BUDGET, {t: KINDS[t] for t in tasks}, FAMILY, end_markers=markers)
    src = {"source_uri": uri, "source_id": "s", "size": None, "tasks": tasks}
    out = []
    for table in ex(pa.Table.from_pylist([src])):
        out += table.to_pylist()
    return out


def test_table_units_are_a_page_and_the_next_other_tasks_one_page(tmp_path):
    uri = _pdf(tmp_path / "a.pdf", [(595, 842), (842, 595), (595, 842)])
    rows = _rows(_job(tmp_path, ["ocr", "table"]), uri, ["ocr", "table"])
    table = [r for r in rows if r["tasks"] == ["table"]]
    ocr = [r for r in rows if r["tasks"] == ["ocr"]]
    assert [r["unit_index"] for r in ocr] == [0, 1, 2] and all(r["num_frames"] == 1 and r["pages"] is None for r in ocr)
    assert [(r["unit_index"], r["pages"], r["num_frames"]) for r in table] == [(0, [0, 1], 2), (1, [1, 2], 2), (2, [2], 1)]
    # Portrait then landscape: each frame's own size travels with the unit, pixels match them.
    first = table[0]
    (w0, h0), (w1, h1) = first["frame_sizes"]
    assert (w0, h0) == (first["width"], first["height"]) and w0 < h0 and w1 > h1
    assert [len(p) for p in first["pixels"]] == [w0 * h0 * 3, w1 * h1 * 3]
    assert table[2]["frame_sizes"] is None  # one page: width x height say it all
    assert all(r["text_layer"] is None for r in table) and ocr[0]["text_layer"]


def test_window_of_three_and_a_table_only_job(tmp_path):
    uri = _pdf(tmp_path / "b.pdf", [(595, 842)] * 4)
    rows = _rows(_job(tmp_path, ["table"], window=3), uri, ["table"], markers=True)
    units = [r for r in rows if r["unit_kind"] == "page"]
    assert [r["pages"] for r in units] == [[0, 1, 2], [1, 2, 3], [2, 3], [3]]
    assert all(r["frame_sizes"] is None for r in units)  # same-size pages
    (marker,) = [r for r in rows if r["unit_kind"] == "_end"]
    assert marker["_expected_rows"] == 4  # one result row per window: what the driver waits for


def test_windows_stay_within_max_pixels(tmp_path):
    uri = _pdf(tmp_path / "c.pdf", [(595, 842)] * 3)
    job = _job(tmp_path, ["table"], limits={"max_pixels": 8_000_000})  # one page fits (~7 MP), two do not
    units = [r for r in _rows(job, uri, ["table"]) if r["unit_kind"] == "page"]
    assert [r["pages"] for r in units] == [[0], [1], [2]]
    assert all("page_window_capped" in r["flags"] for r in units[:2])


def test_a_failed_page_cuts_the_windows_before_it():
    class Stage:  # the two ExpandSource methods a window uses, over a tiny budget
        job = load_job_data({"input": {"uris": ["x"]}, "output": {"uri": "o"}, "pdf": {"page_window": 2}})

        def _fit(self, frame, video):
            return frame

        def _unit_rows(self, src, media_type, unit, ms):
            yield {"unit_index": unit.unit_index, "error_type": unit.error_type, "tasks": src["tasks"]}

    import numpy as np

    windows = _PageWindows(Stage(), {"source_uri": "u", "source_id": "s", "tasks": ["ocr", "table"]}, "pdf", 2)
    page = lambda i: MediaUnit(i, "page", frames=[np.zeros((4, 4, 3), np.uint8)])  # noqa: E731
    assert list(windows.add(page(0), 1.0)) == []
    out = list(windows.add(MediaUnit(1, "page", error_type="page_render_failed", error_message="x"), 1.0))
    assert [r["unit_index"] for r in out] == [0, 1]
    assert out[0]["pages"] == [0] and "page_window_cut" in out[0]["flags"]
    assert out[1]["error_type"] == "page_render_failed" and out[1]["tasks"] == ["table"]
    assert [r["pages"] for r in (*windows.add(page(2), 1.0), *windows.finish())] == [[2]]


def test_fingerprint_of_table_follows_the_window_and_others_do_not(tmp_path):
    from pipeline.tasks import fingerprint, resolve_task

    def fps(window: int) -> dict[str, str]:
        job = _job(tmp_path, ["ocr", "table"], window=window)
        return {t.name: fingerprint(resolve_task(t), job.model, "m", job) for t in job.tasks}

    one, two = fps(1), fps(2)
    assert one["ocr"] == two["ocr"] and one["table"] != two["table"]


def test_inspect_counts_every_page_of_a_window(tmp_path):
    from pipeline.inspect_units import inspect_units
    from pipeline.media.slicing import plan_image

    uri = _pdf(tmp_path / "d.pdf", [(595, 842), (842, 595)])
    job = _job(tmp_path, ["table"]).model_copy(update={"input": load_job_data(
        {"input": {"uris": [uri]}, "output": {"uri": "o"}}).input})
    recs = [r for r in inspect_units(job, FAMILY) if r["unit_index"] >= 0]
    first = recs[0]
    assert first["pages"] == [0, 1] and first["images"] == 2
    (w0, h0), (w1, h1) = (first["width"], first["height"]), (first["height"], first["width"])
    expected = sum(plan_image(FAMILY, w, h, use_image_id=True, image_index=k).placeholder_tokens
                   for k, (w, h) in enumerate([(w0, h0), (w1, h1)]))
    assert first["placeholder_tokens"] == expected


@pytest.mark.parametrize("window", [0, 5])
def test_page_window_bounds(tmp_path, window):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="page_window"):
        _job(tmp_path, ["table"], window=window)

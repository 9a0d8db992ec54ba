"""The expand stage under its time and memory limits, in-process: records a stopped worker left behind
(`state_uri`) turn their units into error rows, the same rows whatever the timing; a source past
limits.source_timeout_s stops between units with one row for what it did not reach.

The records here are written as the monitor writes them (`watchdog.write_record`); the kill that
makes them is tested on real processes in tests/unit/test_watchdog.py and tests/faults/test_stuck_page.py.
"""

from __future__ import annotations

import io
import time

import pyarrow as pa
import pytest
from PIL import Image

from pipeline import samples
from pipeline.config import load_job_data
from pipeline.expand import ExpandSource
from pipeline.media import pdf as pdf_mod
from pipeline.watchdog import Stuck, write_record
from schemas.records import MARKER_KIND

BUDGET = 448 * 448
KEYS = ("unit_index", "unit_kind", "tile_index", "error_type", "error_message", "width", "height", "text_layer")


def _stage(tmp_path, data: bytes, records=(), limits=None, **job):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    cfg = load_job_data({"input": {"uris": [str(path)]}, "output": {"uri": "o"},
                         "model": {"name": "tiny", "max_slice_nums": 1}, "limits": limits or {}, **job})
    state = tmp_path / "state"
    for rec in records:
        write_record(str(state), rec, cfg.storage)
    stage = ExpandSource(cfg, BUDGET, {"ocr": ["image", "page"], "video_caption": ["clip"]}, "minicpmv4_6",
                         state_uri=str(state))
    tasks = ["video_caption"] if data[4:8] == b"ftyp" else ["ocr"]
    src = pa.Table.from_pylist([{"source_uri": str(path), "source_id": "s1", "size": len(data), "tasks": tasks}])
    return stage, src


def _rows(stage, src) -> list[dict]:
    rows = [r for t in stage(src) for r in t.to_pylist() if r["unit_kind"] != MARKER_KIND]
    return [{k: r[k] for k in KEYS} for r in rows]


def _by_unit(rows) -> dict[int, dict]:
    assert len({(r["unit_index"], r["tile_index"]) for r in rows}) == len(rows)  # unique within one expansion
    return {r["unit_index"]: r for r in rows}


def test_a_recorded_page_timeout_is_that_pages_row_and_the_document_goes_on(tmp_path):
    data = samples.multipage_pdf_bytes(5)
    plain = _by_unit(_rows(*_stage(tmp_path / "a", data)))
    rows = _by_unit(_rows(*_stage(tmp_path / "b", data, [Stuck("s1", 2, "page_timeout", 60, 61.0, 70.0)])))
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert rows[2]["error_type"] == "page_timeout" and rows[2]["width"] is None and rows[2]["unit_kind"] == "page"
    assert rows[2]["error_message"] == ("page 3 did not finish planning/rendering within limits.page_timeout_s=60 s; "
                                        "the worker was stopped")
    assert all(rows[i] == plain[i] for i in (0, 1, 3, 4)) and plain[2]["error_type"] is None


def test_a_recorded_page_is_never_planned_again(tmp_path, monkeypatch):
    planned = []
    plan_page = pdf_mod._plan_page
    monkeypatch.setattr(pdf_mod, "_plan_page", lambda doc, index, *a, **k: planned.append(index) or plan_page(doc, index, *a, **k))
    _rows(*_stage(tmp_path, samples.multipage_pdf_bytes(4), [Stuck("s1", 1, "page_timeout", 60, 61.0, 70.0)]))
    assert planned == [0, 2, 3]


def test_a_recorded_memory_stop_is_that_pages_row(tmp_path):
    rows = _by_unit(_rows(*_stage(tmp_path, samples.multipage_pdf_bytes(3),
                                  [Stuck("s1", 0, "worker_memory", 8192, 9001.4, 3.0)])))
    assert [rows[i]["error_type"] for i in range(3)] == ["worker_memory", None, None]
    assert rows[0]["error_message"] == ("page 1: the preprocess worker's memory reached 9001 MiB, over "
                                        "limits.max_worker_memory_mb=8192; the worker was replaced")


@pytest.mark.parametrize("plan_ahead", [1, 2, 32])
def test_a_recorded_source_timeout_ends_the_document_at_its_page(tmp_path, plan_ahead):
    # The same rows however the pages are grouped for planning, and however long the retry takes.
    records = [Stuck("s1", 3, "source_timeout", 600, 631.0, 631.0), Stuck("s1", 1, "page_timeout", 60, 61.0, 90.0)]
    rows = _rows(*_stage(tmp_path, samples.multipage_pdf_bytes(6), records, pdf={"plan_ahead_pages": plan_ahead}))
    assert [(r["unit_index"], r["error_type"]) for r in rows] == [
        (0, None), (1, "page_timeout"), (2, None), (3, "source_timeout")]
    assert rows[3]["error_message"] == ("the source ran past limits.source_timeout_s=600 s at page 4 and the worker "
                                        "was stopped; pages 4-6 of 6 were not processed")


def test_a_record_before_the_first_unit_is_the_sources_row(tmp_path):
    rows = _rows(*_stage(tmp_path, samples.multipage_pdf_bytes(2), [Stuck("s1", -1, "source_timeout", 600, 640, 640)]))
    assert [(r["unit_index"], r["unit_kind"], r["error_type"]) for r in rows] == [(-1, "source", "source_timeout")]
    assert "limits.source_timeout_s=600 s" in rows[0]["error_message"]


def test_the_source_deadline_stops_a_slow_document_between_pages(tmp_path, monkeypatch):
    render = pdf_mod._render
    calls = []

    def slow_second_page(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(0.5)  # Python-interruptible slowness: the cooperative deadline's case, no kill
        return render(*args, **kwargs)

    monkeypatch.setattr(pdf_mod, "_render", slow_second_page)
    rows = _rows(*_stage(tmp_path, samples.multipage_pdf_bytes(5), limits={"source_timeout_s": 0.4}))
    assert [(r["unit_index"], r["error_type"]) for r in rows] == [(0, None), (1, None), (2, "source_timeout")]
    assert rows[2]["error_message"] == ("the source ran past limits.source_timeout_s=0.4 s; "
                                        "pages 3-5 of 5 were not processed")
    assert len(calls) == 2


def _gif(n: int) -> bytes:
    frames = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


def test_an_image_frame_recorded_ends_the_image_there(tmp_path):
    rows = _rows(*_stage(tmp_path, _gif(4), [Stuck("s1", 2, "page_timeout", 60, 61.0, 62.0)],
                         image={"multi_frame": "all"}))
    assert [(r["unit_index"], r["error_type"]) for r in rows] == [(0, None), (1, None), (2, "page_timeout")]
    assert rows[2]["error_message"] == ("frame 2 did not finish decoding within limits.page_timeout_s=60 s; the worker "
                                        "was stopped; the frames after it were not processed")


def test_a_video_recorded_past_its_time_keeps_the_clips_before(tmp_path):
    rows = _rows(*_stage(tmp_path, samples.clip_mp4_bytes(seconds=4.0), [Stuck("s1", 1, "source_timeout", 600, 640, 640)],
                         video={"clip_seconds": 1.0}))
    assert [(r["unit_index"], r["unit_kind"], r["error_type"]) for r in rows] == [
        (0, "clip", None), (1, "clip", "source_timeout")]
    assert rows[1]["error_message"] == ("the source ran past limits.source_timeout_s=600 s at clip 2 and the worker was "
                                        "stopped; clip 2 and the clips after it were not processed")


def test_records_of_other_sources_change_nothing(tmp_path):
    data = samples.multipage_pdf_bytes(3)
    plain = _rows(*_stage(tmp_path / "a", data))
    other = _rows(*_stage(tmp_path / "b", data, [Stuck("other", 1, "page_timeout", 60, 61, 61)]))
    assert plain == other and all(r["error_type"] is None for r in plain)

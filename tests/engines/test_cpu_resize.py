"""The expand stage's resize-on-CPU and tiling, checked against the real transformers processor."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import load_job_data
from pipeline.expand import ExpandSource
from pipeline.media.slicing import model_input_size


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoProcessor

    from pipeline.tiny import build_tiny

    return AutoProcessor.from_pretrained(build_tiny("minicpmv4_6", tmp_path_factory.mktemp("tiny")))


def _plan_of(processor, w, h, max_slice_nums):
    img = np.zeros((h, w, 3), np.uint8)
    out = processor.image_processor(img, max_slice_nums=max_slice_nums, input_data_format="channels_last",
                                    return_tensors="np")
    return out["target_sizes"].tolist(), out["grids"]


def test_resized_image_gets_the_same_processor_plan(processor):
    rng = random.Random(7)
    checked = 0
    for _ in range(60):
        w, h, m = rng.randint(500, 4000), rng.randint(500, 4000), rng.choice([1, 4, 9, 36])
        target = model_input_size("minicpmv4_6", w, h, max_slice_nums=m)
        if target is None:
            continue
        assert target[0] * target[1] < w * h
        assert _plan_of(processor, *target, m) == _plan_of(processor, w, h, m), (w, h, m, target)
        checked += 1
    assert checked >= 40  # most sizes can be shrunk exactly


def _jpeg(w, h):
    arr = np.random.default_rng(0).integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).resize((w, h)).save(buf, "JPEG", quality=70)
    return buf.getvalue()


def _expand(tmp_path, data, **job_extra):
    (tmp_path / "img.jpg").write_bytes(data)
    job = load_job_data({"input": {"uris": [str(tmp_path)]}, "output": {"uri": "o"},
                         "model": {"name": "tiny", "max_slice_nums": 1}, **job_extra})
    stage = ExpandSource(job, 448 * 448, {"ocr": ["image", "page"]}, "minicpmv4_6")
    src = pa.Table.from_pylist([{"source_uri": str(tmp_path / "img.jpg"), "source_id": "s", "size": len(data),
                                 "tasks": ["ocr"]}])
    return pa.concat_tables(list(stage(src))).to_pylist()


def test_large_photo_is_shrunk_to_the_processor_size(tmp_path):
    (row,) = _expand(tmp_path, _jpeg(900, 700))  # below the tiling threshold (4x the budget)
    assert row["tile_index"] is None and row["width"] * row["height"] <= 448 * 448 * 1.1
    assert len(row["pixels"][0]) == row["width"] * row["height"] * 3


def test_receipt_is_tiled_in_reading_order(tmp_path):
    rows = _expand(tmp_path, _jpeg(400, 6000))
    assert len(rows) > 1 and [r["tile_index"] for r in rows] == list(range(len(rows)))
    assert {r["num_tiles"] for r in rows} == {len(rows)} and {r["unit_index"] for r in rows} == {0}
    (untiled,) = _expand(tmp_path, _jpeg(400, 6000), tiling={"enabled": False})
    assert untiled["tile_index"] is None


def test_poster_page_renders_legibly_and_is_tiled(tmp_path):
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page(width=2384, height=3370)  # A0
    for i in range(40):
        page.insert_text((72, 100 + i * 80), f"Poster line {i} in small print " * 4, fontsize=9)
    (tmp_path / "poster.pdf").write_bytes(doc.tobytes())
    job = load_job_data({"input": {"uris": [str(tmp_path)]}, "output": {"uri": "o"},
                         "model": {"name": "tiny", "max_slice_nums": 4}})
    stage = ExpandSource(job, 4 * 448 * 448, {"ocr": ["image", "page"]}, "minicpmv4_6")
    src = pa.Table.from_pylist([{"source_uri": str(tmp_path / "poster.pdf"), "source_id": "p", "size": None,
                                 "tasks": ["ocr"]}])
    rows = pa.concat_tables(list(stage(src))).to_pylist()
    assert len(rows) > 4 and all("render_for_tiling" in r["flags"] for r in rows)
    assert [r["tile_index"] for r in rows] == list(range(len(rows))) and {r["unit_index"] for r in rows} == {0}


def test_letter_page_is_never_tiled_even_with_a_small_budget(tmp_path):
    from pipeline.samples import report_pdf_bytes

    (tmp_path / "r.pdf").write_bytes(report_pdf_bytes())
    job = load_job_data({"input": {"uris": [str(tmp_path)]}, "output": {"uri": "o"},
                         "model": {"name": "tiny", "max_slice_nums": 2}})
    stage = ExpandSource(job, 2 * 448 * 448, {"ocr": ["image", "page"]}, "minicpmv4_6")
    src = pa.Table.from_pylist([{"source_uri": str(tmp_path / "r.pdf"), "source_id": "r", "size": None,
                                 "tasks": ["ocr"]}])
    rows = pa.concat_tables(list(stage(src))).to_pylist()
    assert [r["tile_index"] for r in rows] == [None, None]

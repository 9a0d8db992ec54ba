"""Tiling serves legibility: captions never see tiles; OCR/table tile only past the legibility floor.

The expand stage in-process over real images (Pillow-encoded PNG/JPEG): a 4000x3000 photo and a
300-dpi A4 scan at MiniCPM-V 2.6's 9 slices (1.8 MP budget), as in the issue.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.config import load_job_data
from pipeline.expand import ExpandSource, _result_rows
from pipeline.models import FAMILIES, pixel_budget
from schemas.records import MARKER_KIND

KINDS = {"ocr": ["image", "page"], "table": ["image", "page"], "caption": ["image", "page"]}


def _jpeg(w: int, h: int) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (h // 50 + 1, w // 50 + 1, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h)).save(buf, "JPEG", quality=70)
    return buf.getvalue()


def _expand(tmp_path, data: bytes, tasks: list[str], family: str = "minicpmv2_6", **job) -> tuple[list[dict], int]:
    path = tmp_path / f"img-{'-'.join(tasks)}.jpg"
    path.write_bytes(data)
    cfg = load_job_data({"input": {"uris": [str(path)]}, "output": {"uri": "o"},
                         "tasks": [{"name": t} for t in tasks], **job})
    budget = pixel_budget(FAMILIES[family], FAMILIES[family].image_max_slice_nums)
    stage = ExpandSource(cfg, budget, {t: KINDS[t] for t in tasks}, family)
    src = pa.Table.from_pylist([{"source_uri": str(path), "source_id": "s1", "size": len(data), "tasks": tasks}])
    tables = list(stage(src))
    expected = sum(_result_rows(t) for t in tables)
    rows = [r for t in tables for r in t.to_pylist() if r["unit_kind"] != MARKER_KIND]
    return rows, expected


def test_a_caption_job_never_tiles_a_large_photo(tmp_path):
    rows, expected = _expand(tmp_path, _jpeg(4000, 3000), ["caption"])
    assert len(rows) == 1 and rows[0]["tile_index"] is None and rows[0]["tasks"] == ["caption"]
    assert rows[0]["width"] * rows[0]["height"] <= 4000 * 3000
    assert expected == 1


def test_ocr_tiles_past_the_floor_and_captions_keep_the_whole_image(tmp_path):
    """A 300-dpi A4 scan (2480x3508, 8.7 MP) at a 1.8 MP budget keeps only 45% of each side, below the
    50% legibility floor (tiling.max_factor 4): OCR reads tiles, the caption the whole page."""
    rows, expected = _expand(tmp_path, _jpeg(2480, 3508), ["ocr", "caption"])
    whole = [r for r in rows if r["tile_index"] is None]
    tiles = [r for r in rows if r["tile_index"] is not None]
    assert len(whole) == 1 and whole[0]["tasks"] == ["caption"]
    assert len(tiles) > 1 and all(r["tasks"] == ["ocr"] for r in tiles)
    assert [r["tile_index"] for r in tiles] == list(range(len(tiles)))
    assert expected == 1 + len(tiles)  # result rows the driver waits for: one per (unit, tile, task)
    assert len({(r["unit_index"], r["tile_index"]) for r in rows}) == len(rows)


def test_ocr_within_the_floor_is_not_tiled(tmp_path):
    """4.6's 36 slices (7.2 MP) keep 91% of the scan's sides: no tiles, even for OCR."""
    rows, _ = _expand(tmp_path, _jpeg(2480, 3508), ["ocr", "table"], family="minicpmv4_6")
    assert len(rows) == 1 and rows[0]["tile_index"] is None and rows[0]["tasks"] == ["ocr", "table"]


def test_reading_tasks_share_the_tiles(tmp_path):
    rows, _ = _expand(tmp_path, _jpeg(2480, 3508), ["ocr", "table"])
    assert all(r["tile_index"] is not None and r["tasks"] == ["ocr", "table"] for r in rows) and len(rows) > 1

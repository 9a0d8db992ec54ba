"""Tiling round trips: every pixel covered, tiles within budget, stable reading order."""

import numpy as np
import pytest

from pipeline.media.tiling import cut, needs_tiling, plan_tiles

BUDGET = 4 * 448 * 448


@pytest.mark.parametrize("w,h", [(9000, 12000), (800, 20000), (20000, 600), (3000, 3001), (1, 50000), (2500, 2500)])
def test_tiles_cover_every_pixel_in_reading_order(w, h):
    tiles = plan_tiles(w, h, BUDGET, overlap=0.05, max_tiles=64)
    covered = np.zeros((h, w), dtype=bool)
    for t in tiles:
        assert 0 <= t.x0 < t.x1 <= w and 0 <= t.y0 < t.y1 <= h
        covered[t.y0:t.y1, t.x0:t.x1] = True
    assert covered.all()
    assert [t.index for t in tiles] == list(range(len(tiles)))
    # reading order: by row (y0), then by column (x0)
    assert [(t.y0, t.x0) for t in tiles] == sorted((t.y0, t.x0) for t in tiles)
    assert plan_tiles(w, h, BUDGET, overlap=0.05, max_tiles=64) == tiles  # deterministic


def test_tiles_fit_the_budget_and_overlap():
    tiles = plan_tiles(9000, 12000, BUDGET, overlap=0.05, max_tiles=256)
    assert all((t.x1 - t.x0) * (t.y1 - t.y0) <= BUDGET * 1.05 for t in tiles)
    first, second = tiles[0], tiles[1]
    assert second.x0 < first.x1  # neighbours overlap, so no line of text is cut without a second look


def test_receipt_becomes_a_column():
    tiles = plan_tiles(800, 20000, BUDGET)
    assert {(t.x0, t.x1) for t in tiles} == {(0, 800)} and len(tiles) > 1


def test_max_tiles_grows_tiles_instead_of_dropping_content():
    tiles = plan_tiles(20000, 20000, BUDGET, max_tiles=4)
    assert len(tiles) <= 4
    assert max(t.x1 for t in tiles) == 20000 and max(t.y1 for t in tiles) == 20000


def test_cut_matches_rectangles():
    frame = np.arange(30 * 40 * 3, dtype=np.uint32).reshape(30, 40, 3).astype(np.uint8)
    tiles = plan_tiles(40, 30, 400, overlap=0.1)
    parts = cut(frame, tiles)
    for t, p in zip(tiles, parts):
        assert p.shape == (t.y1 - t.y0, t.x1 - t.x0, 3) and p.flags["C_CONTIGUOUS"]
        assert (p == frame[t.y0:t.y1, t.x0:t.x1]).all()


def test_needs_tiling_rule():
    assert not needs_tiling(1200, 1600, BUDGET, max_factor=4.0, max_aspect=8.0)  # a phone photo
    assert needs_tiling(9000, 12000, BUDGET, max_factor=4.0, max_aspect=8.0)  # a poster
    assert needs_tiling(800, 9000, BUDGET, max_factor=4.0, max_aspect=8.0)  # a receipt
    assert not needs_tiling(0, 10, BUDGET, 4.0, 8.0)

"""Tiling: cut images too large or too long for the model's slicer into overlapping requests.

MiniCPM-V sees an image through at most `max_slice_nums` slices of about 448x448; a poster, an
engineering drawing or a long receipt squeezed into that budget loses its small print. Such an
image is cut into a grid of overlapping tiles, each about one pixel budget, numbered in reading
order (rows top to bottom, columns left to right); results carry the tile index so outputs are
merged back in that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """A rectangle of the source image: [x0, x1) x [y0, y1), with its reading-order index."""

    index: int
    x0: int
    y0: int
    x1: int
    y1: int


def needs_tiling(width: int, height: int, pixel_budget: int, max_factor: float, max_aspect: float) -> bool:
    """True when fitting the image into one budget would shrink it by more than `max_factor` in area,
    or when it is longer than `max_aspect` (height/width or width/height), as receipts and screenshots are."""
    if width <= 0 or height <= 0:
        return False
    aspect = max(width / height, height / width)
    return width * height > max_factor * pixel_budget or aspect > max_aspect


def plan_tiles(width: int, height: int, pixel_budget: int, overlap: float = 0.05, max_tiles: int = 16) -> list[Tile]:
    """Grid of overlapping tiles covering every pixel, each at most about `pixel_budget` pixels.

    The grid follows the image's shape (a long receipt becomes a column of tiles). With more tiles
    needed than `max_tiles`, tiles grow beyond the budget (the model then downsamples each a little)
    rather than dropping any part of the image.
    """
    # Number of tiles along each side so a tile (with its overlap) holds about one budget.
    side = math.sqrt(pixel_budget)
    cols = max(1, math.ceil(width * (1 + overlap) / side))
    rows = max(1, math.ceil(height * (1 + overlap) / side))
    while cols * rows > max_tiles:
        if cols >= rows and cols > 1:
            cols -= 1
        elif rows > 1:
            rows -= 1
        else:
            break
    xs = _spans(width, cols, overlap)
    ys = _spans(height, rows, overlap)
    return [Tile(r * cols + c, x0, y0, x1, y1) for r, (y0, y1) in enumerate(ys) for c, (x0, x1) in enumerate(xs)]


def _spans(length: int, n: int, overlap: float) -> list[tuple[int, int]]:
    """n intervals covering [0, length), neighbours sharing about `overlap` of a tile."""
    if n == 1:
        return [(0, length)]
    tile = math.ceil(length / (n - (n - 1) * overlap))
    step = (length - tile) / (n - 1)
    spans = [(round(i * step), round(i * step) + tile) for i in range(n)]
    spans[-1] = (length - tile, length)  # the last tile ends exactly at the edge
    return spans


def cut(frame: np.ndarray, tiles: list[Tile]) -> list[np.ndarray]:
    """The tiles' pixels, as contiguous arrays (each travels as its own request)."""
    return [np.ascontiguousarray(frame[t.y0 : t.y1, t.x0 : t.x1]) for t in tiles]

"""Page orientation from text direction: which quarter turn makes a page's text read upright.

Pure functions, no MuPDF: the PDF expander feeds them the text layer's line directions, and the
same functions can take directions from any other source later (e.g. an OCR or image model).

Conventions (the same as PDF /Rotate and EXIF):
- coordinates are image coordinates, x to the right and y **down**;
- a rotation is in degrees **clockwise**, one of 0, 90, 180, 270;
- a line direction (dx, dy) is the unit vector along which the line's text advances: upright
  left-to-right text is (1, 0), text reading top to bottom (turned 90 degrees clockwise) is (0, 1),
  upside-down text is (-1, 0), text reading bottom to top is (0, -1).

`dominant_rotation` returns the *correction*: the clockwise rotation to apply to the image so that
the dominant text reads upright (text turned 90 degrees clockwise needs 270 more). `upright` applies
it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from PIL import Image

ROTATIONS = (0, 90, 180, 270)
MAJORITY = 0.6  # share of the characters one direction needs before a page is turned
MIN_CHARS = 20  # below this much text the direction says little about the page (a page number, a stamp)
AXIS_TOLERANCE_DEG = 20.0  # lines further than this from every axis (diagonal watermarks) vote for no turn

# PIL's transposes are counterclockwise; they turn an RGB frame 2-4x faster than numpy's rot90 + copy.
_PIL_CW = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}


def line_angle(dx: float, dy: float, tolerance_deg: float = AXIS_TOLERANCE_DEG) -> int | None:
    """Clockwise angle (0/90/180/270) by which a line with direction (dx, dy) is turned from
    upright, or None when it is more than `tolerance_deg` off every axis (or has no direction)."""
    if dx == 0 and dy == 0:
        return None
    angle = math.degrees(math.atan2(dy, dx)) % 360.0  # y down: positive angles turn clockwise
    nearest = round(angle / 90.0) % 4 * 90
    off = abs((angle - nearest + 180.0) % 360.0 - 180.0)
    return nearest if off <= tolerance_deg else None


def vertical_to_baseline(dx: float, dy: float) -> tuple[float, float]:
    """Direction of a vertical-writing line (CJK, wmode 1) as the equivalent horizontal baseline.

    Vertical text advances top to bottom on an upright page, (0, 1); turning that a quarter counterclockwise
    gives (1, 0), so vertical text on an upright page counts as upright.
    """
    return dy, -dx


def dominant_rotation(
    lines: Iterable[tuple[float, float, float]],
    base_rotation: int = 0,
    majority: float = MAJORITY,
    min_chars: float = MIN_CHARS,
) -> int:
    """Clockwise correction (0/90/180/270) that makes the dominant text direction read upright.

    `lines` are (dx, dy, n_chars): a direction and its weight (characters). `base_rotation` is a
    clockwise turn the image already has relative to the space of those directions (a PDF page's
    /Rotate: MuPDF reports text directions on the unrotated page but renders it rotated).

    Returns 0 unless one direction holds at least `majority` of all the characters (lines off every
    axis count in the total but vote for no direction) and there are at least `min_chars` of them:
    a page with a rotated table next to an upright body, or with next to no text, is left alone.
    """
    if base_rotation % 90:
        raise ValueError(f"base_rotation must be a multiple of 90, got {base_rotation}")
    votes = {angle: 0.0 for angle in ROTATIONS}
    total = 0.0
    for dx, dy, n_chars in lines:
        if n_chars <= 0:
            continue
        total += n_chars
        angle = line_angle(dx, dy)
        if angle is not None:
            votes[angle] += n_chars
    if total < min_chars or total <= 0:
        return 0
    angle, count = max(votes.items(), key=lambda item: item[1])
    if count < majority * total:
        return 0
    return (-(angle + base_rotation)) % 360


def upright(frame: np.ndarray, rotation: int) -> np.ndarray:
    """`frame` (H, W[, C]) turned `rotation` degrees clockwise, as a new C-contiguous array.

    For a 1.8-megapixel RGB page: 90/270 take ~5 ms and 180 ~2.5 ms with PIL's transpose, against
    ~8-19 ms for numpy's rot90 plus the copy (a transposed view is free but every consumer copies it).
    Where the image is rendered (PDF pages), rendering with the turn in the matrix costs nothing.
    """
    rotation %= 360
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation}")
    if rotation == 0:
        return frame
    pil_ok = frame.dtype == np.uint8 and (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (3, 4)))
    if pil_ok and frame.size:
        return np.array(Image.fromarray(np.ascontiguousarray(frame)).transpose(_PIL_CW[rotation]))
    return np.ascontiguousarray(np.rot90(frame, k=-(rotation // 90)))

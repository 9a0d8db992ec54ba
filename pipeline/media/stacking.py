"""MiniCPM-V 4.6 `stack_frames`: which times a clip samples, and how its sub-frames group into composites.

With `stack_frames = n > 1`, MiniCPM-V 4.6 (and MiniCPM-OCR 1.0, which shares its video processor)
sees a video as main frames, one per second, each followed by one composite canvas of the n - 1
sub-frames sampled inside that second (`pipeline.media.video.stack_composite` draws the canvas). The
video processor rebuilds that structure from the clip's duration alone, so the frames handed to it
must be exactly those its own `sample_frames` picks, in its order: every main frame, then every
sub-frame. This module is that arithmetic in seconds, copied from transformers
`models/minicpmv4_6/video_processing_minicpmv4_6.py` (`sample_frames` for the times, `_preprocess`
for the grouping) and checked against it in tests/unit/test_stacking.py. The sampler
(pipeline/media/video.py), the engines' request checks and the token estimates (guards, inspect)
all use it. Pure: no av, no torch.

Two quirks of the reference are kept on purpose, since the model was trained on them: a clip longer
than `max_num_frames` seconds takes its main frames from a 0.1 s grid spread over the clip while the
composites stay per second (main frame i is still paired with second i's composite), and a clip
starts sampling at t = 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

STACK_FAMILIES = ("minicpmv4_6", "minicpm_ocr")  # generations whose video processor stacks sub-frames
STACK_LINE_WIDTH = 6  # black gap between sub-frames on 4.6's canvas


def stack_grid(num_frames: int, width: int, height: int, line_width: int = STACK_LINE_WIDTH) -> tuple[int, int]:
    """(rows, cols) of 4.6's `concat_frames_as_image` canvas for `num_frames` sub-frames of width x height:
    4 make a 2x2 grid; 3 a row or a column, whichever canvas is nearer square; 2 likewise, a tie going
    to a row for landscape frames and a column for portrait ones; any other count a single row."""
    def ratio_error(rows: int, cols: int) -> float:
        canvas_w = cols * width + (cols - 1) * line_width
        canvas_h = rows * height + (rows - 1) * line_width
        return abs(canvas_w / max(1, canvas_h) - 1.0)

    if num_frames == 4:
        return 2, 2
    if num_frames == 3:
        candidates = [(1, 3), (3, 1)]
        errors = [ratio_error(r, c) for r, c in candidates]
        return candidates[errors.index(min(errors))]  # np.argmin: the first of equal errors
    if num_frames == 2:
        candidates = [(1, 2), (2, 1)]
        errors = [ratio_error(r, c) for r, c in candidates]
        if errors[0] == errors[1]:
            return (1, 2) if width / height >= 1.0 else (2, 1)
        return candidates[errors.index(min(errors))]
    return 1, num_frames


@dataclass(frozen=True)
class StackLayout:
    """One clip's stacked sampling: times (seconds from the clip start) and visual units."""

    main: list[float]  # main-frame times
    sub: list[float]  # sub-frame times, in the order the processor expects them after the main frames
    groups: list[int]  # sub-frames per second of the clip (0: that second has no composite)

    @property
    def num_frames(self) -> int:
        """Frames the processor takes: main frames then sub-frames."""
        return len(self.main) + len(self.sub)

    def units(self) -> list[int]:
        """Per visual unit the processor builds, in order: 0 for a main frame, k for a composite of k sub-frames."""
        out: list[int] = []
        for i in range(len(self.main)):
            out.append(0)
            if i < len(self.groups) and self.groups[i] > 0:
                out.append(self.groups[i])
        return out


def unit_layout(unit: Mapping[str, Any], max_num_frames: int) -> StackLayout | None:
    """The layout of a unit row (UNITS_SCHEMA) sampled for stack_frames; None for any other unit.
    `max_num_frames` is the job's video.max_frames_per_clip, which the sampling used."""
    n = unit.get("stack_frames") or 1
    if unit.get("unit_kind") != "clip" or n <= 1:
        return None
    return stack_layout(unit["end_s"] - unit["start_s"], max_num_frames, n)


def stack_layout(duration: float, max_num_frames: int, n: int) -> StackLayout:
    """The frames 4.6's video processor samples from a clip of `duration` seconds with `stack_frames = n`,
    and how it groups the sub-frames. `n == 1`: main frames only (4.6's own 1 fps sampling)."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    if max_num_frames < 1 or n < 1:
        raise ValueError(f"max_num_frames and n must be >= 1, got {max_num_frames} and {n}")
    num_seconds = math.ceil(duration)
    if duration > max_num_frames:
        # The reference's expression, float quirks included (int(3.0 / 0.1) is 29).
        main = [round(i * 0.1, 1) for i in range(int(duration / 0.1))]
        if len(main) > max_num_frames:
            main = [main[i] for i in np.linspace(0, len(main) - 1, max_num_frames, dtype=int)]
    else:
        main = [float(i) for i in range(num_seconds)]
    sub: list[float] = []
    if n > 1:
        sub = [sec + j / n for sec in range(num_seconds) for j in range(1, n) if sec + j / n < duration]
        cap = max_num_frames * (n - 1)
        if len(sub) > cap:
            sub = [sub[int(i)] for i in np.linspace(0, len(sub) - 1, cap, dtype=int)]
    groups = []
    cursor = 0
    for sec in range(num_seconds):
        start = cursor
        while cursor < len(sub) and sub[cursor] < sec + 1:
            cursor += 1
        groups.append(cursor - start)
    return StackLayout(main=[float(t) for t in main], sub=[float(t) for t in sub], groups=groups)

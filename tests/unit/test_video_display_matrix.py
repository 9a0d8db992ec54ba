"""The whole display matrix is applied, as FFmpeg's autorotate does: flips are not taken for rotations."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import LimitsConfig, VideoConfig
from pipeline.media.video import apply_display_ops, display_ops, expand_video
from tests import hostile

ORIENTATIONS = [(d, h, v) for d in (0, 90, 180, 270) for h in (False, True) for v in (False, True)]


@pytest.mark.parametrize("degrees, hflip, vflip", ORIENTATIONS)
def test_every_orientation_displays_as_the_matrix_says(degrees: int, hflip: bool, vflip: bool) -> None:
    data, coded = hostile.video_with_display(degrees, hflip, vflip)
    unit = next(expand_video(data, VideoConfig(max_side=64), LimitsConfig()))
    # PyAV's set_display_rotation: rotate counter-clockwise, then mirror.
    expected = np.rot90(coded, k=degrees // 90)
    expected = expected[:, ::-1] if hflip else expected
    expected = expected[::-1] if vflip else expected
    frame = unit.frames[0]
    assert frame.shape == expected.shape
    assert np.abs(frame.astype(int) - expected.astype(int)).max() < 40  # colour conversion only
    assert ("video_rotated" in unit.flags) == bool(display_ops_for(degrees, hflip, vflip))


def display_ops_for(degrees: int, hflip: bool, vflip: bool) -> tuple[str, ...]:
    import io

    import av

    from pipeline.media.video import display_matrix

    data, _ = hostile.video_with_display(degrees, hflip, vflip, frames=1)
    with av.open(io.BytesIO(data)) as c:
        return display_ops(display_matrix(next(c.decode(video=0))))


def test_a_horizontal_flip_is_not_a_half_turn() -> None:
    # The matrix of a plain mirror reads as a -180 degree "rotation" (what frame.rotation reports).
    ops = display_ops((-65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30))
    assert ops == ("hflip",)
    a = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert np.array_equal(apply_display_ops(a, ops), a[:, ::-1])


def test_no_matrix_and_non_quarter_turns_are_left_alone() -> None:
    assert display_ops(None) == ()
    assert display_ops((65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30)) == ()
    c, s = int(65536 * 0.7071), int(65536 * 0.7071)  # 45 degrees: FFmpeg would rotate and pad
    assert display_ops((c, -s, 0, s, c, 0, 0, 0, 1 << 30)) == ()

"""orientation: text-direction vote and quarter turns (pure functions, no MuPDF)."""

import math

import numpy as np
import pytest

from pipeline.media.orientation import (
    MIN_CHARS,
    dominant_rotation,
    line_angle,
    upright,
    vertical_to_baseline,
)

# y points down: (0, 1) is text running down the page, i.e. turned 90 degrees clockwise.
UPRIGHT, DOWN, UPSIDE_DOWN, UP = (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)


@pytest.mark.parametrize("direction,angle", [(UPRIGHT, 0), (DOWN, 90), (UPSIDE_DOWN, 180), (UP, 270)])
def test_line_angle_of_the_axes(direction, angle):
    assert line_angle(*direction) == angle


def test_line_angle_tolerates_skew_but_not_diagonals():
    skewed = (math.cos(math.radians(5)), math.sin(math.radians(5)))  # a scan's OCR layer, 5 degrees off
    assert line_angle(*skewed) == 0
    assert line_angle(math.cos(math.radians(-8)), math.sin(math.radians(-8))) == 0
    assert line_angle(math.cos(math.radians(95)), math.sin(math.radians(95))) == 90
    assert line_angle(math.sqrt(0.5), math.sqrt(0.5)) is None  # a diagonal watermark
    assert line_angle(0.0, 0.0) is None


@pytest.mark.parametrize("direction,correction", [(UPRIGHT, 0), (DOWN, 270), (UPSIDE_DOWN, 180), (UP, 90)])
def test_dominant_rotation_undoes_the_text_turn(direction, correction):
    assert dominant_rotation([(*direction, 100)]) == correction


@pytest.mark.parametrize("base", [0, 90, 180, 270])
@pytest.mark.parametrize("direction,angle", [(UPRIGHT, 0), (DOWN, 90), (UPSIDE_DOWN, 180), (UP, 270)])
def test_base_rotation_adds_to_the_text_turn(direction, angle, base):
    # A page shown with /Rotate `base` turns text at `angle` to angle + base; the correction undoes both.
    assert dominant_rotation([(*direction, 100)], base_rotation=base) == (-(angle + base)) % 360
    assert (dominant_rotation([(*direction, 100)], base_rotation=base) + angle + base) % 360 == 0


def test_cancelling_base_rotation_needs_no_turn():
    assert dominant_rotation([(*UP, 500)], base_rotation=90) == 0  # text drawn up the page, page shown turned cw


def test_majority_is_by_characters_not_lines():
    many_short_sideways = [(*DOWN, 3)] * 10  # 30 characters in 10 lines
    one_long_upright = [(*UPRIGHT, 120)]
    assert dominant_rotation(many_short_sideways + one_long_upright) == 0
    assert dominant_rotation([(*DOWN, 120)] + [(*UPRIGHT, 3)] * 10) == 270


def test_majority_threshold():
    assert dominant_rotation([(*UPSIDE_DOWN, 61), (*UPRIGHT, 39)]) == 180
    assert dominant_rotation([(*UPSIDE_DOWN, 59), (*UPRIGHT, 41)]) == 0
    assert dominant_rotation([(*UPSIDE_DOWN, 59), (*UPRIGHT, 41)], majority=0.5) == 180
    # Mixed sideways directions split the vote: no direction wins.
    assert dominant_rotation([(*DOWN, 40), (*UP, 40), (*UPRIGHT, 20)]) == 0


def test_diagonal_text_dilutes_the_vote():
    diagonal = (math.sqrt(0.5), math.sqrt(0.5))
    assert dominant_rotation([(*diagonal, 50), (*DOWN, 50)]) == 0
    assert dominant_rotation([(*diagonal, 30), (*DOWN, 70)]) == 270


def test_too_little_text_is_no_evidence():
    assert dominant_rotation([(*UPSIDE_DOWN, MIN_CHARS - 1)]) == 0
    assert dominant_rotation([(*UPSIDE_DOWN, MIN_CHARS)]) == 180
    assert dominant_rotation([]) == 0
    assert dominant_rotation([(*UPSIDE_DOWN, 0), (*UPSIDE_DOWN, -5)]) == 0


def test_bad_base_rotation():
    with pytest.raises(ValueError):
        dominant_rotation([(*UPRIGHT, 50)], base_rotation=45)


def test_vertical_writing_counts_as_upright():
    assert vertical_to_baseline(*DOWN) == UPRIGHT  # CJK vertical text on an upright page
    assert dominant_rotation([(*vertical_to_baseline(*DOWN), 100)]) == 0
    # Vertical text on a page turned a quarter clockwise runs right to left.
    assert dominant_rotation([(*vertical_to_baseline(*UPSIDE_DOWN), 100)]) == 270


def _marked(shape, dtype=np.uint8):
    frame = np.zeros(shape, dtype=dtype)
    frame[0, 0] = 255  # top-left corner marker
    frame[0, 1] = 128  # and its right-hand neighbour, so a mirror would show
    return frame


@pytest.mark.parametrize("shape", [(4, 6, 3), (4, 6, 4), (4, 6), (4, 6, 2)])
@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_upright_turns_clockwise_like_rot90(shape, rotation):
    frame = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    out = upright(frame, rotation)
    assert np.array_equal(out, np.rot90(frame, k=-(rotation // 90)))
    assert out.flags.c_contiguous and (rotation == 0 or out.flags.writeable)
    assert np.array_equal(upright(out, (360 - rotation) % 360), frame)


def test_upright_direction_is_clockwise():
    frame = _marked((4, 6, 3))
    cw = upright(frame, 90)
    assert cw.shape == (6, 4, 3)
    assert cw[0, -1].max() == 255 and cw[1, -1].max() == 128  # top-left went to top-right, going down
    assert upright(frame, 180)[-1, -1].max() == 255
    assert upright(frame, 270)[-1, 0].max() == 255
    assert upright(frame, -90)[-1, 0].max() == 255  # -90 is 270


def test_upright_other_dtypes_use_numpy():
    frame = _marked((3, 5, 3), dtype=np.float32)
    out = upright(frame, 90)
    assert out.dtype == np.float32 and np.array_equal(out, np.rot90(frame, -1))


def test_upright_zero_returns_the_frame_and_rejects_odd_angles():
    frame = _marked((3, 5, 3))
    assert upright(frame, 0) is frame
    with pytest.raises(ValueError):
        upright(frame, 45)


def test_upright_does_not_share_memory():
    frame = _marked((3, 5, 3))
    out = upright(frame, 180)
    out[...] = 7
    assert frame[0, 0, 0] == 255

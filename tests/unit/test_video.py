"""expand_video: clip cutting, sample times, caps, resizing, rotation, and broken inputs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import samples
from pipeline.config import LimitsConfig, VideoConfig
from pipeline.media import video as video_mod
from pipeline.media.base import MediaError
from pipeline.media.video import expand_video, plan_clips

LIMITS = LimitsConfig()
FRAME_STEP = 1 / 25  # the sample clips are 25 fps


@pytest.fixture(scope="module")
def clip() -> bytes:
    return samples.clip_mp4_bytes()  # 4 s, 320x240, 25 fps, H.264


def _clips(data: bytes, limits: LimitsConfig = LIMITS, **cfg: object) -> list:
    return list(expand_video(data, VideoConfig(**cfg), limits))


def _error(data: bytes, limits: LimitsConfig = LIMITS) -> str:
    with pytest.raises(MediaError) as info:
        _clips(data, limits)
    return info.value.error_type


def test_one_clip_eight_frames_at_2_fps(clip: bytes) -> None:
    (unit,) = _clips(clip, fps=2, clip_seconds=30)
    assert unit.unit_kind == "clip" and unit.unit_index == 0 and unit.error_type is None
    assert (unit.start_s, unit.end_s) == (0.0, pytest.approx(4.0))
    assert len(unit.frames) == len(unit.frame_times) == 8
    expected = [0.25 + 0.5 * i for i in range(8)]  # centres of eight half-second slices
    assert unit.frame_times == pytest.approx(expected, abs=FRAME_STEP / 2 + 1e-6)
    assert all(f.shape == (240, 320, 3) and f.dtype == np.uint8 for f in unit.frames)


def test_sampled_frames_show_the_right_moment(clip: bytes) -> None:
    (unit,) = _clips(clip, fps=2, clip_seconds=30)
    for frame, t in zip(unit.frames, unit.frame_times):
        # The white square's left edge moves linearly (see samples._clip_frame); find it in row 70.
        row = frame[70, :, :].astype(int).min(axis=1)
        left = int(np.argmax(row > 200))
        assert abs(left - int(260 * t / 4.0)) <= 4, (t, left)


def test_clip_cutting(clip: bytes) -> None:
    units = _clips(clip, fps=2, clip_seconds=1)
    assert [u.unit_index for u in units] == [0, 1, 2, 3]
    assert [(u.start_s, u.end_s) for u in units] == [(0, 1), (1, 2), (2, 3), (3, pytest.approx(4.0))]
    for u in units:
        assert len(u.frames) == 2 and all(u.start_s <= t < u.end_s for t in u.frame_times)


def test_last_clip_is_short(clip: bytes) -> None:
    units = _clips(clip, fps=1, clip_seconds=3)
    assert [(u.start_s, u.end_s) for u in units] == [(0, 3), (3, pytest.approx(4.0))]
    assert [len(u.frames) for u in units] == [3, 1]


def test_max_frames_per_clip_is_uniform(clip: bytes) -> None:
    (unit,) = _clips(clip, fps=10, clip_seconds=30, max_frames_per_clip=5)
    assert unit.frame_times == pytest.approx([0.4, 1.2, 2.0, 2.8, 3.6], abs=FRAME_STEP / 2 + 1e-6)


def test_total_frame_budget(clip: bytes) -> None:
    units = _clips(clip, LimitsConfig(max_frames=4), fps=4, clip_seconds=1)
    assert [len(u.frames) for u in units] == [1, 1, 1, 1]
    assert all("frames_capped" in u.flags for u in units)
    units = _clips(clip, LimitsConfig(max_frames=2), fps=4, clip_seconds=1)
    assert [u.error_type for u in units] == [None, None, "frame_limit", "frame_limit"]
    assert sum(len(u.frames) for u in units) == 2


def test_plan_never_exceeds_the_budget() -> None:
    for duration, budget in [(3600.0, 512), (7.3, 3), (100.0, 1)]:
        plans = plan_clips(duration, VideoConfig(fps=2, clip_seconds=10), LimitsConfig(max_frames=budget))
        assert sum(len(p.targets) for p in plans) <= budget
        assert plans[-1].end_s == pytest.approx(duration)


def test_resize_to_max_side_and_never_upscale(clip: bytes) -> None:
    (small,) = _clips(clip, fps=1, max_side=160)
    assert {f.shape for f in small.frames} == {(120, 160, 3)}
    (big,) = _clips(clip, fps=1, max_side=1000)
    assert {f.shape for f in big.frames} == {(240, 320, 3)}


def test_display_rotation_is_applied() -> None:
    data = samples.video_bytes(1.0, 10, (320, 240), rotation=90)
    (unit,) = _clips(data, fps=2)
    assert unit.frames[0].shape == (320, 240, 3) and "video_rotated" in unit.flags


def test_containers_without_duration_fall_back_to_packet_times() -> None:
    live = samples.video_bytes(4.0, 25, (160, 120), "matroska", seekable=False)
    units = _clips(live, fps=1, clip_seconds=2)
    assert [(u.start_s, u.end_s) for u in units] == [(0, 2), (2, pytest.approx(4.0, abs=0.05))]
    assert [len(u.frames) for u in units] == [2, 2]


def test_other_containers(clip: bytes) -> None:
    for fmt, codec in [("webm", "libvpx"), ("avi", "mpeg4"), ("mpegts", "libx264"), ("mov", "libx264")]:
        units = _clips(samples.video_bytes(2.0, 10, (64, 48), fmt, codec), fps=1)
        assert len(units) == 1 and len(units[0].frames) == 2, fmt
        assert units[0].frame_times == pytest.approx([0.5, 1.5], abs=0.06), fmt


def test_stream_that_ends_early_gives_error_units_for_missing_clips() -> None:
    mkv = samples.video_bytes(4.0, 25, (160, 120), "matroska")
    units = _clips(mkv[: len(mkv) // 2], fps=1, clip_seconds=1)
    assert len(units) == 4
    assert units[0].error_type is None and len(units[0].frames) == 1
    assert units[-1].error_type == "clip_decode_failed" and not units[-1].frames


def test_broken_inputs(clip: bytes) -> None:
    assert _error(b"") == "empty_file"
    assert _error(samples.broken_mp4_bytes()) == "video_decode_failed"
    assert _error(b"not a video at all" * 100) == "video_decode_failed"
    assert _error(clip, LimitsConfig(max_video_seconds=2)) == "video_too_long"
    assert _error(clip, LimitsConfig(max_pixels=1000)) == "video_too_large"
    assert _error(clip, LimitsConfig(max_bytes=100)) == "file_too_large"


def test_unknown_duration_metadata_path(clip: bytes, monkeypatch) -> None:
    monkeypatch.setattr(video_mod, "_duration", lambda container, stream: None)
    units = _clips(clip, fps=1, clip_seconds=2)
    assert [len(u.frames) for u in units] == [2, 2] and units[-1].end_s == pytest.approx(4.0)

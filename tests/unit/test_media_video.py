"""Video: one decode pass, frames sampled by fps within clips, caps, resize, timestamps, errors."""

import pytest

from pipeline.config import LimitsConfig, VideoConfig
from pipeline.media.base import MediaError
from pipeline.media.video import expand_video
from pipeline.samples import broken_mp4_bytes, clip_mp4_bytes


@pytest.fixture(scope="module")
def clip4s():
    return clip_mp4_bytes(seconds=4.0, fps=25, size=(320, 240))


def _clips(data, **cfg):
    return list(expand_video(data, VideoConfig(**cfg), LimitsConfig()))


def test_fps_sampling_in_one_clip(clip4s):
    (clip,) = _clips(clip4s, fps=2, clip_seconds=30, max_frames_per_clip=64)
    assert len(clip.frames) == 8 and clip.unit_kind == "clip"
    assert clip.start_s == 0 and clip.end_s == pytest.approx(4.0, abs=0.1)
    assert clip.frame_times == sorted(clip.frame_times)
    # one frame per 1/fps interval, taken at the interval's middle
    assert all(abs(t - (i + 0.5) * 0.5) <= 0.05 for i, t in enumerate(clip.frame_times))


def test_clips_cut_with_start_and_end(clip4s):
    clips = _clips(clip4s, fps=2, clip_seconds=1)
    assert [c.unit_index for c in clips] == [0, 1, 2, 3]
    for i, c in enumerate(clips):
        assert c.start_s == pytest.approx(i, abs=0.05) and c.end_s == pytest.approx(i + 1, abs=0.1)
        assert all(c.start_s - 0.05 <= t < c.end_s for t in c.frame_times)


def test_cap_samples_uniformly(clip4s):
    (clip,) = _clips(clip4s, fps=10, clip_seconds=30, max_frames_per_clip=4)
    assert len(clip.frames) == 4
    gaps = [b - a for a, b in zip(clip.frame_times, clip.frame_times[1:])]
    assert max(gaps) - min(gaps) < 0.2  # spread over the clip, not the first four frames
    assert clip.frame_times[-1] > 2.0


def test_frames_resized_to_max_side(clip4s):
    (clip,) = _clips(clip4s, fps=1, max_side=160)
    h, w, c = clip.frames[0].shape
    assert (w, h, c) == (160, 120, 3)


def test_total_frame_limit(clip4s):
    clips = list(expand_video(clip4s, VideoConfig(fps=4, clip_seconds=1), LimitsConfig(max_frames=6)))
    assert sum(len(c.frames) for c in clips) <= 6


def test_too_long_and_broken():
    with pytest.raises(MediaError) as err:
        list(expand_video(clip_mp4_bytes(seconds=2.0), VideoConfig(), LimitsConfig(max_video_seconds=1)))
    assert err.value.error_type == "video_too_long"
    with pytest.raises(MediaError) as err:
        _clips(broken_mp4_bytes())
    assert err.value.error_type == "video_decode_failed"
    with pytest.raises(MediaError):
        _clips(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 100)

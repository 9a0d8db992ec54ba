"""Video: one decode pass, frames sampled by fps within clips, caps, resize, timestamps, errors; keyframe
seeking, variable frame rate, long-video windows and MiniCPM-V 4.6 stack_frames composites."""

import numpy as np
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


# --------------------------------------------------------------------------------------------------
# Keyframe seeking


@pytest.fixture(scope="module")
def clip20s_gop1s():
    return clip_mp4_bytes(seconds=20.0, fps=25, size=(160, 120))  # keyframe every 25 frames


def _count_decoding(monkeypatch):
    """Count decoded frames and seeks made, by wrapping the sampler and the seeker."""
    from pipeline.media import video as video_mod

    counts = {"decoded": 0, "seekers": []}
    push = video_mod._Sampler.push

    def counting_push(self, frame, t):
        counts["decoded"] += 1
        return push(self, frame, t)

    class RecordingSeeker(video_mod._Seeker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            counts["seekers"].append(self)

    monkeypatch.setattr(video_mod._Sampler, "push", counting_push)
    monkeypatch.setattr(video_mod, "_Seeker", RecordingSeeker)
    return counts


def _same_clips(a, b):
    def key(c):
        return c.unit_index, c.start_s, c.end_s, c.flags

    assert [key(c) for c in a] == [key(c) for c in b]
    for x, y in zip(a, b):
        assert x.frame_times == y.frame_times
        assert all(np.array_equal(f, g) for f, g in zip(x.frames, y.frames))


def test_sparse_sampling_seeks_and_picks_the_same_frames(clip20s_gop1s, monkeypatch):
    from pipeline.media import video as video_mod

    cfg = dict(fps=0.2, clip_seconds=10)  # a sample every 5 s, a keyframe every 1 s
    with monkeypatch.context() as m:
        m.setattr(video_mod, "SEEK_MIN_SKIP_FRAMES", 10**9)  # sequential reference
        seq_counts = _count_decoding(m)
        sequential = _clips(clip20s_gop1s, **cfg)
    counts = _count_decoding(monkeypatch)
    seeking = _clips(clip20s_gop1s, **cfg)
    _same_clips(seeking, sequential)
    assert [len(c.frames) for c in seeking] == [2, 2]
    assert seq_counts["seekers"] == [] and seq_counts["decoded"] > 400  # decoded up to the last target
    (seeker,) = counts["seekers"]
    assert seeker.seeks == 4  # targets at 2.5, 7.5, 12.5, 17.5 s: each one jumps to the keyframe 0.5 s before
    assert counts["decoded"] < seq_counts["decoded"] / 3


def test_dense_sampling_decodes_sequentially_without_a_keyframe_scan(clip20s_gop1s, monkeypatch):
    from pipeline.media import video as video_mod

    def no_scan(data):
        raise AssertionError("dense sampling must not demux the file for keyframes")

    monkeypatch.setattr(video_mod, "scan_packets", no_scan)
    counts = _count_decoding(monkeypatch)
    clips = _clips(clip20s_gop1s, fps=4, clip_seconds=10, max_frames_per_clip=64)
    assert [len(c.frames) for c in clips] == [40, 40]
    assert counts["seekers"] == []


def test_seek_rule_is_stated_in_frames():
    from pipeline.media import video as video_mod

    limits = LimitsConfig()
    n = video_mod.SEEK_MIN_SKIP_FRAMES
    # 25 fps: a sample every (n + 1) frames is sparse, every n frames is not
    def plans(fps):
        return video_mod.plan_clips(60.0, VideoConfig(fps=fps, clip_seconds=60, max_frames_per_clip=10**4), limits)

    sparse, dense = plans(25 / (n + 1)), plans(25 / (n - 1))
    assert video_mod.sparse_sampling(sparse, 25.0)
    assert not video_mod.sparse_sampling(dense, 25.0)
    seeker = video_mod._Seeker([(0.0, 0), (10.0, 10_000)], min_skip_s=n / 25)
    assert seeker.worth_it(12.0, position=1.0)  # keyframe at 10 s is 9 s ahead
    assert not seeker.worth_it(12.0, position=10.0 - (n - 1) / 25)  # fewer than n frames to skip
    assert not seeker.worth_it(5.0, position=1.0)  # the keyframe before 5 s is behind the decoder
    seeker.last = 1  # once sought, a keyframe is never sought again (a demuxer landing short cannot loop)
    assert not seeker.worth_it(12.0, position=1.0)


def test_keyframe_scan(clip20s_gop1s):
    from pipeline.media.video import scan_packets

    scan = scan_packets(clip20s_gop1s)
    assert scan.duration == pytest.approx(20.0, abs=0.05)
    assert [round(t, 3) for t, _ in scan.keyframes] == [float(k) for k in range(20)]
    assert scan_packets(b"not a video").keyframes == []


# --------------------------------------------------------------------------------------------------
# Variable frame rate: sample by presentation time, not by frame index


def _index_pattern(i: int, size=(64, 48)) -> np.ndarray:
    """A frame whose left half says i // 16 and right half i % 16 (levels 16 apart survive H.264)."""
    w, h = size
    frame = np.empty((h, w, 3), np.uint8)
    frame[:, : w // 2] = (i // 16) * 16 + 8
    frame[:, w // 2 :] = (i % 16) * 16 + 8
    return frame


def _read_index(frame: np.ndarray) -> int:
    w = frame.shape[1]
    hi = round((float(frame[:, : w // 2 - 4].mean()) - 8) / 16)
    lo = round((float(frame[:, w // 2 + 4 :].mean()) - 8) / 16)
    return hi * 16 + lo


# 2 s at 50 fps, then 2 s at about 5 fps with jitter: the average rate (~28 fps) describes neither part
VFR_PTS_MS = [i * 20 for i in range(100)] + [2000 + i * 200 + (37 if i % 2 else 0) for i in range(10)]


def vfr_mp4_bytes(container_format: str = "mp4") -> bytes:
    import io
    from fractions import Fraction

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as container:
        options = {"crf": "18", "preset": "ultrafast", "g": "25", "threads": "1"}
        stream = container.add_stream("libx264", options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i, pts in enumerate(VFR_PTS_MS):
            frame = av.VideoFrame.from_ndarray(_index_pattern(i), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize("container_format", ["mp4", "matroska"])
def test_variable_frame_rate_samples_by_pts(container_format):
    data = vfr_mp4_bytes(container_format)
    (clip,) = _clips(data, fps=2, clip_seconds=30, max_frames_per_clip=64)
    times = [p / 1000 for p in VFR_PTS_MS]
    duration = clip.end_s
    assert duration == pytest.approx(times[-1], abs=0.25)  # last pts plus its (guessed) duration
    n = 8  # ceil(duration * 2)
    targets = [(k + 0.5) * duration / n for k in range(n)]
    nearest = [min(range(len(times)), key=lambda i: abs(times[i] - t)) for t in targets]
    assert len(clip.frames) == n
    assert clip.frame_times == pytest.approx([times[i] for i in nearest], abs=1e-6)
    assert [_read_index(f) for f in clip.frames] == nearest  # the pixels are those frames too
    # what an index-based sampler (frame = t * average rate) would have taken is different
    by_index = [min(len(times) - 1, int(t * len(times) / duration)) for t in targets]
    assert by_index != nearest


def test_variable_frame_rate_with_seeking(monkeypatch):
    from pipeline.media import video as video_mod

    data = vfr_mp4_bytes()
    counts = _count_decoding(monkeypatch)
    (clip,) = _clips(data, fps=0.5, clip_seconds=30)
    times = [p / 1000 for p in VFR_PTS_MS]
    targets = [(k + 0.5) * clip.end_s / 2 for k in range(2)]
    nearest = [min(range(len(times)), key=lambda i: abs(times[i] - t)) for t in targets]
    assert [_read_index(f) for f in clip.frames] == nearest
    assert clip.frame_times == pytest.approx([times[i] for i in nearest], abs=1e-6)
    assert len(counts["seekers"]) == 1 and isinstance(counts["seekers"][0], video_mod._Seeker)


# --------------------------------------------------------------------------------------------------
# Long videos: windows with start and end timestamps


def test_long_video_windows():
    data = clip_mp4_bytes(seconds=65.0, fps=5, size=(64, 48))
    clips = _clips(data, clip_seconds=30)
    assert [(c.unit_index, c.start_s, c.end_s) for c in clips] == [
        (0, 0.0, 30.0), (1, 30.0, 60.0), (2, 60.0, pytest.approx(65.0, abs=0.01))
    ]
    assert [len(c.frames) for c in clips] == [16, 16, 5]  # fps 1, at most 16 per clip
    for c in clips:
        assert all(c.start_s <= t < c.end_s for t in c.frame_times)
        assert c.frame_times == sorted(c.frame_times) and not c.flags and c.error_type is None
        assert c.frames[0].shape == (48, 64, 3)


# --------------------------------------------------------------------------------------------------
# MiniCPM-V 4.6 stack_frames composites


def _numbered(count, size=(64, 48)):
    w, h = size
    return [np.full((h, w, 3), 10 * (i + 1), np.uint8) for i in range(count)]


def test_stack_composite_layouts_match_stack_canvas_size():
    from pipeline.media.slicing import stack_canvas_size
    from pipeline.media.video import stack_composite

    for size in [(64, 48), (48, 64), (50, 50), (200, 20)]:
        for n in range(1, 7):
            frames = _numbered(n, size)
            (canvas,) = stack_composite(frames, n)
            assert (canvas.shape[1], canvas.shape[0]) == stack_canvas_size(n, *size) or n == 1
    (c4,) = stack_composite(_numbered(4), 4)
    assert c4.shape == (48 * 2 + 6, 64 * 2 + 6, 3)
    # row-major placement, black 6-pixel gaps
    assert c4[0, 0, 0] == 10 and c4[0, 70, 0] == 20 and c4[54, 0, 0] == 30 and c4[54, 70, 0] == 40
    assert c4[48:54].max() == 0 and c4[:, 64:70].max() == 0


def test_stack_composite_groups_and_keep_main():
    from pipeline.media.video import stack_composite

    frames = _numbered(7)
    out = stack_composite(frames, 3)
    # 3 landscape frames: a column is nearer square than a row; then the 1 frame left over
    assert [c.shape[:2] for c in out] == [(3 * 48 + 12, 64), (3 * 48 + 12, 64), (48, 64)]
    assert stack_composite(frames, 1) == frames
    mains = stack_composite(frames, 3, keep_main=True)  # [main, composite of 2] per second, then a lone main
    assert len(mains) == 5
    assert [int(m[0, 0, 0]) for m in mains[::2]] == [10, 40, 70]
    assert mains[1].shape[:2] == (2 * 48 + 6, 64) and int(mains[1][0, 0, 0]) == 20 and int(mains[1][-1, 0, 0]) == 30
    with pytest.raises(ValueError):
        stack_composite(frames, 0)
    with pytest.raises(ValueError):
        stack_composite([frames[0], np.zeros((10, 10, 3), np.uint8)], 2)


def test_stack_composite_matches_the_minicpmv46_processor():
    torch = pytest.importorskip("torch")
    mod = pytest.importorskip("transformers.models.minicpmv4_6.video_processing_minicpmv4_6")
    from pipeline.media.video import stack_composite

    rng = np.random.default_rng(0)
    for size in [(64, 48), (48, 64), (40, 40), (90, 30)]:
        for n in (2, 3, 4, 5):
            frames = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(n)]
            video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
            ref = mod.MiniCPMV4_6VideoProcessor.concat_frames_as_image(None, video)[0].permute(1, 2, 0).numpy()
            (ours,) = stack_composite(frames, n)
            assert ours.shape == ref.shape and np.array_equal(ours, ref), (size, n)


# --------------------------------------------------------------------------------------------------
# Stacked sampling (video.stack_frames): the frames 4.6's processor samples, in its order


def _indexed_cfr_mp4(seconds: float, fps: int = 25) -> bytes:
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18", "preset": "ultrafast", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(int(seconds * fps)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_index_pattern(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def test_stacked_sampling_takes_the_processors_frames_in_its_order():
    from pipeline.media.stacking import stack_layout

    data = _indexed_cfr_mp4(7.0)
    clips = _clips(data, stack_frames=3, clip_seconds=4, max_frames_per_clip=16)
    assert [(c.start_s, round(c.end_s, 2)) for c in clips] == [(0.0, 4.0), (4.0, 7.0)]
    for clip in clips:
        layout = stack_layout(clip.end_s - clip.start_s, 16, 3)
        wanted = [clip.start_s + t for t in layout.main + layout.sub]
        assert clip.stack_frames == 3 and clip.error_type is None and "unstacked" not in clip.flags
        assert len(clip.frames) == layout.num_frames
        # main frames first, then the sub-frames, each the decoded frame nearest its time (25 fps)
        assert clip.frame_times == pytest.approx(wanted, abs=0.021)
        assert [_read_index(f) for f in clip.frames] == [round(t * 25) for t in clip.frame_times]
    assert clips[0].frame_times[:4] == pytest.approx([0.0, 1.0, 2.0, 3.0], abs=0.021)


def test_stacked_clips_are_admitted_whole_within_the_frame_budget():
    data = _indexed_cfr_mp4(7.0)
    clips = list(expand_video(data, VideoConfig(stack_frames=2, clip_seconds=4), LimitsConfig(max_frames=10)))
    # clip 0 needs 4 main + 4 sub frames; clip 1 would need 6 more: it becomes an error unit, not a thinned clip
    assert clips[0].stack_frames == 2 and len(clips[0].frames) == 8
    assert clips[1].error_type == "frame_limit" and not clips[1].frames and clips[1].stack_frames is None


def test_stack_frames_needs_one_main_frame_per_second():
    with pytest.raises(ValueError, match="video.fps"):
        VideoConfig(stack_frames=2, fps=2)
    assert VideoConfig(stack_frames=1, fps=2).stack_frames == 1

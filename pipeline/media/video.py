"""Video -> clip units of sampled, resized RGB frames, decoding the stream once from start to end.

Plan first, decode second: the duration (from metadata, else from packet timestamps, which needs only
demuxing) fixes the clips and the target times of every sample. One sequential decode then picks, for
each target, the decoded frame nearest to it, and converts only those frames (converting every frame
would cost more than decoding). A clip is yielded as soon as decoding passes its end, so at most one
clip's frames are in memory, and decoding stops once the last target is served.

Sampling: a clip of length L gets n = min(max_frames_per_clip, ceil(L * fps)) frames at the centres of
n equal slices of the clip (uniform, and never the often-black first frame). When all clips together
would exceed limits.max_frames, every clip's count is scaled down (at least one frame each, flag
"frames_capped"); clips still beyond the budget become "frame_limit" error units.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import av
import numpy as np

from pipeline.config import LimitsConfig, VideoConfig
from pipeline.media.base import MediaError, MediaUnit

_EPS = 1e-6


@dataclass
class ClipPlan:
    """Where one clip lies and which times to sample in it (seconds from the start of the video)."""

    index: int
    start_s: float
    end_s: float
    targets: list[float]
    flags: list[str] = field(default_factory=list)
    error: str | None = None  # "frame_limit": no frame budget left for this clip


def expand_video(data: bytes, cfg: VideoConfig, limits: LimitsConfig) -> Iterator[MediaUnit]:
    """Yield one "clip" unit per cfg.clip_seconds of video, each with its sampled frames and their times.

    Raises MediaError: "empty_file", "file_too_large", "video_decode_failed" (not a video, no video
    stream, nothing decodable), "video_too_long", "video_too_large" (frame size over limits.max_pixels).
    """
    if not data:
        raise MediaError("empty_file", "the video has zero bytes")
    if len(data) > limits.max_bytes:
        raise MediaError("file_too_large", f"{len(data)} bytes exceeds limits.max_bytes={limits.max_bytes}")
    container = _open(data)
    try:
        stream = _video_stream(container, limits)
        duration = _duration(container, stream) or _scan_duration(data)
        if duration is None or duration <= 0:
            raise MediaError("video_decode_failed", "no timestamps: cannot tell the video's duration")
        if duration > limits.max_video_seconds:
            raise MediaError(
                "video_too_long", f"{duration:.1f} s exceeds limits.max_video_seconds={limits.max_video_seconds}"
            )
        plans = plan_clips(duration, cfg, limits)
        yield from _decode_clips(container, stream, plans, cfg)
    finally:
        container.close()


def plan_clips(duration: float, cfg: VideoConfig, limits: LimitsConfig) -> list[ClipPlan]:
    """Cut [0, duration) into clips and choose each clip's sample times (see the module docstring)."""
    n_clips = max(1, math.ceil(duration / cfg.clip_seconds - _EPS))
    plans = []
    for k in range(n_clips):
        start, end = k * cfg.clip_seconds, min((k + 1) * cfg.clip_seconds, duration)
        plans.append(ClipPlan(k, start, end, targets=[]))
    counts = [min(cfg.max_frames_per_clip, max(1, math.ceil((p.end_s - p.start_s) * cfg.fps - _EPS))) for p in plans]
    counts = _fit_total(counts, limits.max_frames, plans)
    for plan, n in zip(plans, counts):
        step = (plan.end_s - plan.start_s) / n if n else 0.0
        plan.targets = [plan.start_s + (i + 0.5) * step for i in range(n)]
    return plans


def _fit_total(counts: list[int], budget: int, plans: list[ClipPlan]) -> list[int]:
    total = sum(counts)
    if total <= budget:
        return counts
    scaled = [max(1, math.floor(c * budget / total)) for c in counts]
    out = []
    left = budget
    for plan, orig, n in zip(plans, counts, scaled):
        n = min(n, left)
        left -= n
        if n == 0:
            plan.error = "frame_limit"
        elif n < orig:
            plan.flags.append("frames_capped")
        out.append(n)
    return out


def _open(data: bytes) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, OSError, ValueError) as err:
        raise MediaError("video_decode_failed", f"FFmpeg could not open the file: {err}") from None


def _video_stream(container: av.container.InputContainer, limits: LimitsConfig) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise MediaError("video_decode_failed", "the file has no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_pixels:
        raise MediaError(
            "video_too_large", f"{width}x{height} frames exceed limits.max_pixels={limits.max_pixels}"
        )
    stream.thread_type = "AUTO"  # frame + slice threads: decoding is the CPU cost of video
    return stream


def _duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """Duration from metadata: the video stream's own, else the container's (which may include audio)."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _scan_duration(data: bytes) -> float | None:
    """No duration metadata (e.g. streamed WebM/MKV): read packet timestamps; demuxing only, no decoding."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            start, last = _start_time(stream), None
            for packet in container.demux(stream):
                if packet.pts is None or packet.time_base is None:
                    continue
                end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                last = end if last is None else max(last, end)
    except (av.FFmpegError, OSError, ValueError):
        return None
    return None if last is None else last - start


def _start_time(stream: av.video.stream.VideoStream) -> float:
    if stream.start_time is not None and stream.time_base is not None:
        return float(stream.start_time * stream.time_base)
    return 0.0


def _decode_clips(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    plans: list[ClipPlan],
    cfg: VideoConfig,
) -> Iterator[MediaUnit]:
    """One pass over the decoded frames; yields each clip's unit once decoding has passed its end."""
    sampler = _Sampler(plans, cfg.max_side, _sar(stream))
    origin = _start_time(stream)
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    decoded, error = 0, None
    try:
        for frame in container.decode(stream):
            t = frame.time - origin if frame.time is not None else decoded / rate
            decoded += 1
            yield from sampler.push(frame, t)
            if sampler.done:
                break
    except (av.FFmpegError, OSError, ValueError) as err:
        error = f"{type(err).__name__}: {err}"
    if decoded == 0:
        raise MediaError("video_decode_failed", f"no frame could be decoded{': ' + error if error else ''}")
    yield from sampler.finish(error)


class _Sampler:
    """Matches decoded frames to target times; keeps only the previous frame, converts only chosen ones."""

    def __init__(self, plans: list[ClipPlan], max_side: int, sar: float):
        self.plans = plans
        self.max_side = max_side
        self.sar = sar
        self.clip = 0  # index into plans of the clip being filled
        self.target = 0  # index into that clip's targets
        self.prev: tuple[av.VideoFrame, float] | None = None
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.rotated = False

    @property
    def done(self) -> bool:
        return self.clip >= len(self.plans)

    def push(self, frame: av.VideoFrame, t: float) -> Iterator[MediaUnit]:
        """Serve every pending target at or before `t`, picking the nearer of the previous and this frame."""
        while not self.done:
            plan = self.plans[self.clip]
            if self.target >= len(plan.targets):
                yield self._close_clip()
                continue
            goal = plan.targets[self.target]
            if t < goal:
                break
            self._take(*self._nearest(plan, goal, frame, t))
        self.prev = (frame, t)

    def _nearest(
        self, plan: ClipPlan, goal: float, frame: av.VideoFrame, t: float
    ) -> tuple[av.VideoFrame, float]:
        """The previous or the current frame, whichever is nearer `goal`, preferring frames inside the clip."""
        if self.prev is None:
            return frame, t
        inside = [c for c in (self.prev, (frame, t)) if plan.start_s - _EPS <= c[1] < plan.end_s]
        candidates = inside or [self.prev, (frame, t)]
        return min(candidates, key=lambda c: abs(c[1] - goal))

    def finish(self, error: str | None) -> Iterator[MediaUnit]:
        """End of stream: serve what is left of the current clip with the last frame, then close all clips."""
        while not self.done:
            plan = self.plans[self.clip]
            last_in_clip = self.prev is not None and plan.start_s <= self.prev[1] < plan.end_s + _EPS
            if self.target < len(plan.targets) and last_in_clip:
                self._take(*self.prev)  # type: ignore[misc]
                continue
            yield self._close_clip(error)

    def _take(self, frame: av.VideoFrame, t: float) -> None:
        self.frames.append(self._to_rgb(frame))
        self.times.append(round(t, 6))
        self.target += 1

    def _close_clip(self, error: str | None = None) -> MediaUnit:
        plan = self.plans[self.clip]
        flags = list(plan.flags) + (["video_rotated"] if self.rotated and self.frames else [])
        unit = MediaUnit(
            unit_index=plan.index, unit_kind="clip", frames=self.frames, start_s=plan.start_s, end_s=plan.end_s,
            frame_times=self.times, flags=flags,
        )
        if plan.error:
            unit.error_type, unit.error_message = plan.error, "no frame budget left (limits.max_frames)"
        elif not self.frames:
            unit.error_type = "clip_decode_failed"
            unit.error_message = f"no decodable frame in [{plan.start_s:.2f}, {plan.end_s:.2f}) s" + (
                f" ({error})" if error else ""
            )
        elif len(self.frames) < len(plan.targets):
            unit.flags.append("partial_clip")  # the stream ended or broke before the clip did
        self.clip, self.target, self.frames, self.times = self.clip + 1, 0, [], []
        return unit

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        """Resize during the pixel-format conversion (one swscale pass), then apply the display rotation."""
        width, height = display_size(frame.width, frame.height, self.sar, self.max_side)
        array = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA")
        quarter_turns = round((frame.rotation or 0) / 90) % 4
        if quarter_turns:
            self.rotated = True
            # frame.rotation is counter-clockwise degrees, like np.rot90's positive k.
            array = np.ascontiguousarray(np.rot90(array, k=quarter_turns))
        return array


def display_size(width: int, height: int, sar: float, max_side: int) -> tuple[int, int]:
    """Size to scale a stored frame to: square pixels (sample aspect applied), longest side <= max_side.

    Never upscales. A display rotation applied afterwards only swaps the axes, so the bound still holds.
    """
    display_w = width * sar
    scale = min(1.0, max_side / max(display_w, height))
    return max(1, round(display_w * scale)), max(1, round(height * scale))


def _sar(stream: av.video.stream.VideoStream) -> float:
    """Sample aspect ratio (anamorphic video stores non-square pixels); 1 when unknown."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return float(sar) if sar and sar > 0 else 1.0

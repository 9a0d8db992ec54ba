"""Video -> clip units of sampled, resized RGB frames, decoding the stream once, front to back.

Plan first, decode second: the duration (from metadata, else from packet timestamps, which needs only
demuxing) fixes the clips and the target times of every sample. One forward decode then picks, for
each target, the decoded frame nearest to it by presentation time (pts, so variable frame rate files
sample right), and converts only those frames (converting every frame would cost more than decoding).
A clip is yielded as soon as decoding passes its end, so at most one clip's frames are in memory, and
decoding stops once the last target is served. Decoding is threaded (`thread_type = "AUTO"`).

Keyframe seeking: a sequential decode touches every frame, which is waste when samples are sparse
relative to the GOP (e.g. fps 0.2 on a video with a keyframe every second). Before serving the next
target, the decoder jumps to the keyframe at or before it when that keyframe lies more than
SEEK_MIN_SKIP_FRAMES frames (at the stream's average rate) past the last decoded frame; otherwise it
decodes on. A seek saves exactly the frames it skips and costs a decoder flush (and a refill of the
frame threads), so the rule seeks only when it skips a good run of frames; with dense sampling the
keyframe before the next target is behind the decoder and it never seeks. Keyframe times come from one
demux pass (packets only, about 10 us each, nothing decoded), made only when sampling is sparse enough
for a seek to pay at all: the mean gap between sample times must exceed SEEK_MIN_SKIP_FRAMES frames.
Seeks only go forward, to a keyframe, so the frames decoded from that keyframe on are those a
sequential decode would have produced there: the frame chosen for each target is the same either way
(tests check it pixel for pixel).

Sampling: a clip of length L gets n = min(max_frames_per_clip, ceil(L * fps)) frames at the centres of
n equal slices of the clip (uniform, and never the often-black first frame). When all clips together
would exceed limits.max_frames, every clip's count is scaled down (at least one frame each, flag
"frames_capped"); clips still beyond the budget become "frame_limit" error units.

Stacked sampling (`video.stack_frames` n > 1, MiniCPM-V 4.6 and MiniCPM-OCR 1.0): each clip samples
exactly what 4.6's video processor would (pipeline/media/stacking.py): main frames at 1 per second
and n - 1 sub-frames inside each second. The unit's frames are handed over in the processor's order
(main frames, then sub-frames; `frame_times` follow) with `stack_frames` = n, and the engine's
processor draws the per-second composites itself. A clip that ends short of its samples goes out
unstacked (flag "unstacked").
"""

from __future__ import annotations

import io
import math
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import av
import numpy as np

from pipeline.config import LimitsConfig, VideoConfig
from pipeline.media.base import MediaError, MediaUnit, describe
from pipeline.media.stacking import STACK_LINE_WIDTH, stack_grid, stack_layout

_EPS = 1e-6
# Seek only when it skips more than this many frames. Measured on one core (640x480 H.264, 2.5 Mbit/s,
# keyframe every second, 60 s): a seek costs less than decoding ~6 frames; sampling at 0.5 fps decoded
# 5x faster with seeks, at 1 fps (skips of ~12 frames) 10-20% faster, and at 2 fps nothing is skipped.
# 12 keeps a 2x margin over the crossover for containers whose seeks cost more (MPEG-TS, MKV without cues).
SEEK_MIN_SKIP_FRAMES = 12


@dataclass
class ClipPlan:
    """Where one clip lies and which times to sample in it (seconds from the start of the video)."""

    index: int
    start_s: float
    end_s: float
    targets: list[float]
    flags: list[str] = field(default_factory=list)
    error: str | None = None  # "frame_limit": no frame budget left for this clip
    # Stacked clips (video.stack_frames > 1): `targets` are in time order (the decoder's), `order`
    # lists them in the processor's order (main frames, then sub-frames; see pipeline/media/stacking.py).
    stack: int | None = None
    order: list[int] | None = None


#: (width, height) of an upright frame -> the size the model's processor uses for it (None: as is).
FrameSize = Callable[[int, int], "tuple[int, int] | None"]


def expand_video(data: bytes, cfg: VideoConfig, limits: LimitsConfig,
                 frame_size: FrameSize | None = None) -> Iterator[MediaUnit]:
    """Yield one "clip" unit per cfg.clip_seconds of video, each with its sampled frames and their times.

    `frame_size(width, height)` gives the size the model's processor uses for an upright frame of
    that display size (None: keep it); frames are scaled to it in the decoder's one swscale pass, so
    they reach the engine at exactly the processor's size, resampled once. `cfg.max_side`, when set,
    caps the longest side before that.

    Raises MediaError: "empty_file", "file_too_large", "no_video_stream" (audio, with or without cover
    art), "video_decode_failed" (not a video, nothing decodable), "video_too_long", "video_too_large" (frame size over limits.max_pixels).
    """
    if not data:
        raise MediaError("empty_file", "the video has zero bytes")
    if len(data) > limits.max_bytes:
        raise MediaError("file_too_large", f"{len(data)} bytes exceeds limits.max_bytes={limits.max_bytes}")
    container = _open(data)
    try:
        stream = _video_stream(container, limits)
        scan: PacketScan | None = None
        duration = _duration(container, stream)
        if not duration:
            scan = scan_packets(data)
            duration = scan.duration
        if duration is None or duration <= 0:
            raise MediaError("video_decode_failed", "no timestamps: cannot tell the video's duration")
        if duration > limits.max_video_seconds:
            raise MediaError(
                "video_too_long", f"{duration:.1f} s exceeds limits.max_video_seconds={limits.max_video_seconds}"
            )
        plans = plan_clips(duration, cfg, limits)
        keyframes = None
        if sparse_sampling(plans, _rate(stream)):
            keyframes = (scan or scan_packets(data)).keyframes
        yield from _decode_clips(container, stream, plans, cfg, keyframes, frame_size)
    finally:
        container.close()


def plan_clips(duration: float, cfg: VideoConfig, limits: LimitsConfig) -> list[ClipPlan]:
    """Cut [0, duration) into clips and choose each clip's sample times (see the module docstring)."""
    n_clips = max(1, math.ceil(duration / cfg.clip_seconds - _EPS))
    plans = []
    for k in range(n_clips):
        start, end = k * cfg.clip_seconds, min((k + 1) * cfg.clip_seconds, duration)
        plans.append(ClipPlan(k, start, end, targets=[]))
    if cfg.stack_frames > 1:
        return _plan_stacked(plans, cfg, limits)
    counts = [min(cfg.max_frames_per_clip, max(1, math.ceil((p.end_s - p.start_s) * cfg.fps - _EPS))) for p in plans]
    counts = _fit_total(counts, limits.max_frames, plans)
    for plan, n in zip(plans, counts):
        step = (plan.end_s - plan.start_s) / n if n else 0.0
        plan.targets = [plan.start_s + (i + 0.5) * step for i in range(n)]
    return plans


def _plan_stacked(plans: list[ClipPlan], cfg: VideoConfig, limits: LimitsConfig) -> list[ClipPlan]:
    """MiniCPM-V 4.6's stacked sampling in each clip (pipeline/media/stacking.py), at its own times.

    The processor rebuilds the layout from the clip's length, so a clip's frames cannot be thinned
    to fit limits.max_frames: clips are admitted whole, in order, and the rest become "frame_limit"
    error units.
    """
    left = limits.max_frames
    for plan in plans:
        layout = stack_layout(plan.end_s - plan.start_s, cfg.max_frames_per_clip, cfg.stack_frames)
        wanted = [plan.start_s + t for t in layout.main + layout.sub]
        if len(wanted) > left:
            plan.error = "frame_limit"
            continue
        left -= len(wanted)
        by_time = sorted(range(len(wanted)), key=lambda i: wanted[i])  # stable: ties keep the processor's order
        plan.targets = [wanted[i] for i in by_time]
        position = {i: rank for rank, i in enumerate(by_time)}
        plan.order = [position[i] for i in range(len(wanted))]  # processor slot -> index in time order
        plan.stack = cfg.stack_frames
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
        raise MediaError("video_decode_failed", f"FFmpeg could not open the file as a video: {describe(err)}") from None


def _video_stream(container: av.container.InputContainer, limits: LimitsConfig) -> av.video.stream.VideoStream:
    from pipeline.media.identify import is_attached_picture

    # An attached picture (the cover art of an MP3/M4A) is a one-frame "video" stream, not video.
    streams = [s for s in container.streams.video if not is_attached_picture(s)]
    if not streams:
        what = "audio only, a cover picture is not video" if container.streams.audio else "no audio either"
        raise MediaError("no_video_stream", f"the file has no video stream ({what})")
    stream = streams[0]
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


@dataclass
class PacketScan:
    """What one demux pass (no decoding) tells: duration and keyframes, in seconds from the stream start."""

    duration: float | None = None
    keyframes: list[tuple[float, int]] = field(default_factory=list)  # (time, pts), sorted by time


def scan_packets(data: bytes) -> PacketScan:
    """Read every packet header of the video stream: the duration (for files without duration metadata,
    e.g. streamed WebM/MKV) and the keyframe times (for seeking). Demuxing only; a broken file gives what
    was read before the break."""
    scan = PacketScan()
    last = None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            from pipeline.media.identify import is_attached_picture

            stream = next(s for s in container.streams.video if not is_attached_picture(s))
            start = _start_time(stream)
            for packet in container.demux(stream):
                if packet.pts is None or packet.time_base is None:
                    continue
                t = float(packet.pts * packet.time_base)
                end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                last = end if last is None else max(last, end)
                if packet.is_keyframe:
                    scan.keyframes.append((t - start, int(packet.pts)))
    except (av.FFmpegError, OSError, ValueError, IndexError, StopIteration):
        pass
    else:
        scan.duration = None if last is None else last - start
    scan.keyframes.sort()
    return scan


def _scan_duration(data: bytes) -> float | None:
    """Duration from packet timestamps alone (see scan_packets)."""
    return scan_packets(data).duration


def _rate(stream: av.video.stream.VideoStream) -> float:
    """Average frames per second (a VFR file's mean); 25 when the container does not say."""
    return float(stream.average_rate or stream.guessed_rate or 25)


def sparse_sampling(plans: list[ClipPlan], rate: float) -> bool:
    """True when the mean gap between sample times exceeds SEEK_MIN_SKIP_FRAMES frames: then seeking may pay,
    and the keyframe index is worth its demux pass (see the module docstring)."""
    targets = [t for plan in plans for t in plan.targets]
    if not targets:
        return False
    mean_gap = targets[-1] / len(targets)  # from the start to the last target, per target
    return mean_gap * rate > SEEK_MIN_SKIP_FRAMES


def _start_time(stream: av.video.stream.VideoStream) -> float:
    if stream.start_time is not None and stream.time_base is not None:
        return float(stream.start_time * stream.time_base)
    return 0.0


def _decode_clips(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    plans: list[ClipPlan],
    cfg: VideoConfig,
    keyframes: list[tuple[float, int]] | None = None,
    frame_size: FrameSize | None = None,
) -> Iterator[MediaUnit]:
    """One forward pass over the decoded frames, jumping ahead to keyframes where that skips enough
    frames (`keyframes` given); yields each clip's unit once decoding has passed its end."""
    sampler = _Sampler(plans, cfg.max_side, _sar(stream), frame_size)
    origin = _start_time(stream)
    rate = _rate(stream)
    seeker = _Seeker(keyframes, SEEK_MIN_SKIP_FRAMES / rate) if keyframes else None
    decoded, error, position = 0, None, 0.0  # position: time of the last decoded frame
    try:
        while not sampler.done:
            if seeker is not None and not seeker.seek(container, stream, sampler.next_goal(), position):
                seeker = None  # the demuxer refused: decode on sequentially from where it is
            jumped = False
            for frame in container.decode(stream):
                t = frame.time - origin if frame.time is not None else decoded / rate
                decoded += 1
                position = max(position, t)
                yield from sampler.push(frame, t)
                if sampler.done:
                    break
                if seeker is not None and seeker.worth_it(sampler.next_goal(), position):
                    jumped = True  # leave the decode loop; the seek happens at the top
                    break
            if not jumped:
                break  # end of stream (or all targets served)
    except (av.FFmpegError, OSError, ValueError) as err:
        error = f"FFmpeg stopped decoding: {describe(err)}"
    if decoded == 0:
        raise MediaError("video_decode_failed", f"no frame could be decoded{': ' + error if error else ''}")
    yield from sampler.finish(error)


class _Seeker:
    """Decides when a jump to the keyframe before the next target beats decoding on, and makes it."""

    def __init__(self, keyframes: list[tuple[float, int]], min_skip_s: float):
        self.times = [t for t, _ in keyframes]
        self.pts = [p for _, p in keyframes]
        self.min_skip_s = min_skip_s
        self.seeks = 0
        self.last = -1  # index of the last keyframe sought: never seek to it (or before it) again

    def _keyframe(self, goal: float | None, position: float) -> int | None:
        """Index of the keyframe at or before `goal`, when it lies far enough past `position`."""
        if goal is None:
            return None
        i = bisect_right(self.times, goal + _EPS) - 1
        # Forward only: a demuxer that lands short of the keyframe must not make us seek there forever.
        if i <= self.last or self.times[i] - position <= self.min_skip_s:
            return None
        return i

    def worth_it(self, goal: float | None, position: float) -> bool:
        return self._keyframe(goal, position) is not None

    def seek(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream,
             goal: float | None, position: float) -> bool:
        """Seek when worth it; False when the demuxer cannot seek (the caller then stops trying)."""
        i = self._keyframe(goal, position)
        if i is None:
            return True
        try:
            container.seek(self.pts[i], backward=True, any_frame=False, stream=stream)
        except (av.FFmpegError, OSError, ValueError):
            return False
        self.seeks += 1
        self.last = i
        return True


class _Sampler:
    """Matches decoded frames to target times; keeps only the previous frame, converts only chosen ones."""

    def __init__(self, plans: list[ClipPlan], max_side: int | None, sar: float, frame_size: FrameSize | None = None):
        self.plans = plans
        self.max_side = max_side
        self.frame_size = frame_size
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

    def next_goal(self) -> float | None:
        """The next target time still to serve, in any clip; None when all are served."""
        for k in range(self.clip, len(self.plans)):
            targets = self.plans[k].targets
            index = self.target if k == self.clip else 0
            if index < len(targets):
                return targets[index]
        return None

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
            if plan.order is not None:
                unit.flags.append("unstacked")  # the processor's layout needs every frame: a plain clip
        elif plan.order is not None:
            unit.frames = [self.frames[i] for i in plan.order]
            unit.frame_times = [self.times[i] for i in plan.order]
            unit.stack_frames = plan.stack
        self.clip, self.target, self.frames, self.times = self.clip + 1, 0, [], []
        return unit

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        """Resize during the pixel-format conversion (one swscale pass), then apply the display matrix."""
        width, height = display_size(frame.width, frame.height, self.sar, self.max_side)
        ops = display_ops(display_matrix(frame))
        swaps = any(op in _AXIS_SWAPS for op in ops)  # the upright frame is the decoded one turned
        if self.frame_size is not None:
            # The processor sees the upright frame: ask for its size, then resize before the display ops.
            upright = (height, width) if swaps else (width, height)
            target = self.frame_size(*upright)
            if target is not None and target[0] * target[1] < width * height:  # never upscale on the CPU
                width, height = (target[1], target[0]) if swaps else target
        array = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA")
        if ops:
            self.rotated = True
            array = apply_display_ops(array, ops)
        return array


def display_matrix(frame: av.VideoFrame) -> tuple[int, ...] | None:
    """The frame's display matrix (FFmpeg's AV_FRAME_DATA_DISPLAYMATRIX: 9 int32, 16.16 fixed point
    except the last column, 2.30), or None when the file sets none."""
    for side in frame.side_data:
        if side.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            raw = bytes(side)
            if len(raw) == 36:
                return tuple(int(v) for v in np.frombuffer(raw, dtype=np.int32))
    return None


def display_ops(matrix: tuple[int, ...] | None) -> tuple[str, ...]:
    """What FFmpeg's autorotate applies for a display matrix (fftools/ffmpeg_filter.c,
    configure_input_video_filter), as a sequence of operations:
    "transpose", "clock", "cclock", "clock_flip" (the `transpose` filter's directions), "hflip",
    "vflip". Rotations that are not quarter turns are left alone (FFmpeg would rotate and pad)."""
    if matrix is None:
        return ()
    m = matrix
    scale0, scale1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if scale0 == 0 or scale1 == 0:
        return ()
    # av_display_rotation_get, negated and normalised to [0, 360) as get_rotation() does.
    theta = round(math.degrees(math.atan2(m[1] / scale1, m[0] / scale0)))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        return ("transpose",) if m[3] > 0 else ("clock",)  # "cclock_flip" is a plain transpose
    if abs(theta - 180) < 1:
        return tuple(op for op, neg in (("hflip", m[0] < 0), ("vflip", m[4] < 0)) if neg)
    if abs(theta - 270) < 1:
        return ("clock_flip",) if m[3] < 0 else ("cclock",)
    if abs(theta) < 1 and m[4] < 0:
        return ("vflip",)
    return ()


# The `transpose` filter's directions exchange width and height; flips do not.
_AXIS_SWAPS = frozenset({"transpose", "clock", "cclock", "clock_flip"})


def apply_display_ops(array: np.ndarray, ops: tuple[str, ...]) -> np.ndarray:
    """Apply `display_ops` to an (H, W, 3) frame; returns a contiguous array."""
    for op in ops:
        if op == "hflip":
            array = array[:, ::-1]
        elif op == "vflip":
            array = array[::-1]
        elif op == "transpose":
            array = array.transpose(1, 0, 2)
        elif op == "clock":
            array = np.rot90(array, k=-1)
        elif op == "cclock":
            array = np.rot90(array, k=1)
        elif op == "clock_flip":
            array = array[::-1, ::-1].transpose(1, 0, 2)
    return np.ascontiguousarray(array)


# --------------------------------------------------------------------------------------------------
# MiniCPM-V 4.6 `stack_frames` composites

def stack_composite(frames: list[np.ndarray], n: int, *, keep_main: bool = False) -> list[np.ndarray]:
    """Group consecutive frames `n` at a time, each group into one composite image, as MiniCPM-V 4.6 does.

    The layout is the 4.6 video processor's `concat_frames_as_image` (transformers
    `models/minicpmv4_6/video_processing_minicpmv4_6.py`): sub-frames on a black canvas with
    STACK_LINE_WIDTH-pixel black gaps; 4 frames make a 2x2 grid; 3 frames a row or a column, whichever
    canvas is nearer square; 2 frames likewise, a tie going to a row for landscape frames and a column
    for portrait ones; any other count a single row. The canvas size is `slicing.stack_canvas_size`.
    A last, shorter group gets the layout of its own size. `n == 1` returns the frames as they are.

    keep_main=False: every group of `n` becomes one composite (the `stack_frames` idea applied to
    consecutive samples). keep_main=True: 4.6's own video structure, for frames sampled at `n` per
    second: each group's first frame stays a full "main" frame and the other `n - 1` (the second's
    sub-frames) become its composite, giving [main_0, composite_0, main_1, composite_1, ...]; a group with
    no sub-frames gives its main frame only.

    Frames are (H, W, 3) uint8 arrays; the frames of one group must have the same size.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    out: list[np.ndarray] = []
    for start in range(0, len(frames), n):
        group = frames[start:start + n]
        if keep_main:
            out.append(group[0])
            group = group[1:]
            if not group:
                continue
        out.append(group[0] if len(group) == 1 else _concat_frames(group))  # 1 frame: the 1x1 canvas is itself
    return out


def _concat_frames(group: list[np.ndarray]) -> np.ndarray:
    height, width = group[0].shape[:2]
    if any(f.shape != group[0].shape for f in group):
        raise ValueError(f"frames of one composite must share a size, got {sorted({f.shape for f in group})}")
    rows, cols = stack_grid(len(group), width, height)
    canvas = np.zeros((rows * height + (rows - 1) * STACK_LINE_WIDTH,
                       cols * width + (cols - 1) * STACK_LINE_WIDTH) + group[0].shape[2:], dtype=np.uint8)
    for k, frame in enumerate(group):  # row-major, as the processor's video.view(rows, cols, ...)
        row, col = divmod(k, cols)
        top, left = row * (height + STACK_LINE_WIDTH), col * (width + STACK_LINE_WIDTH)
        canvas[top:top + height, left:left + width] = frame
    return canvas


def display_size(width: int, height: int, sar: float, max_side: int | None) -> tuple[int, int]:
    """Size to scale a stored frame to: square pixels (sample aspect applied), longest side <= max_side
    (None: no bound).

    Never upscales. A display rotation applied afterwards only swaps the axes, so the bound still holds.
    """
    display_w = width * sar
    scale = 1.0 if max_side is None else min(1.0, max_side / max(display_w, height))
    return max(1, round(display_w * scale)), max(1, round(height * scale))


def _sar(stream: av.video.stream.VideoStream) -> float:
    """Sample aspect ratio (anamorphic video stores non-square pixels); 1 when unknown."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return float(sar) if sar and sar > 0 else 1.0

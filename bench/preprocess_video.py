"""preprocess_video.json: sampled frames/s of `expand_video` vs a raw PyAV decode-and-sample loop, one core.

- Input: a generated 60 s 640x480 H.264 clip (25 fps, ~2.5 Mbit/s, x264's default keyframe interval
  of 250 frames), cached under the temp dir.
- Ours: `pipeline.media.video.expand_video` with fps 1, 30 s clips (60 frames, none capped), frames
  resized to max_side 448 (448x336); every clip consumed.
- Raw: the loop anyone would write: open with PyAV, threaded decode (`thread_type = "AUTO"`), walk the
  decoded frames in order, take the frame nearest each of the same target times and convert it with
  `to_ndarray(width, height, format="rgb24", interpolation="AREA")` - the same frames, the same resize.
  The benchmark checks both give identical pixels.
- `sparse` (extra): sampling at 0.2 fps on the same scene encoded with a keyframe every second, where
  ours seeks to the keyframe before each sample (see pipeline/media/video.py) and the raw loop decodes
  everything; ours is also timed with seeking switched off, to show where the difference comes from.
- The process is pinned to one core, so FFmpeg's frame threads share it: rates are per core. Rates use
  CPU time of the process (all its threads), alternating raw and ours, best of `--repeats`.

    python -m bench.preprocess_video [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import CACHE_DIR, bench_video_bytes, best_of, cached, machine, pin_one_core, timed, write_result

NAME = "preprocess_video"
GOAL_RATIO = 0.90
SECONDS, FPS_SOURCE, SIZE = 60.0, 25, (640, 480)


def clip_path(gop: int) -> Path:
    """The generated clip (cached): SECONDS long, SIZE, FPS_SOURCE fps, a keyframe every `gop` frames."""
    w, h = SIZE
    return cached(f"clip-{int(SECONDS)}s-{w}x{h}-g{gop}.mp4", lambda: bench_video_bytes(SECONDS, FPS_SOURCE, SIZE, gop))


def clip_bytes(gop: int) -> bytes:
    return clip_path(gop).read_bytes()


def video_config(fps: float):
    from pipeline.config import VideoConfig

    return VideoConfig(fps=fps, clip_seconds=30.0, max_frames_per_clip=10_000, max_side=448)


def ours(data: bytes, cfg) -> list[Any]:
    from pipeline.config import LimitsConfig
    from pipeline.media.video import expand_video

    return list(expand_video(data, cfg, LimitsConfig()))


def raw(data: bytes, targets: list[float], size: tuple[int, int]) -> list[np.ndarray]:
    """Sequential threaded decode; the nearest frame to each target; resize in the RGB conversion."""
    import av

    frames: list[np.ndarray] = []
    k = 0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        prev = None
        for frame in container.decode(stream):
            t = frame.time
            while k < len(targets) and t >= targets[k]:
                pick = frame if prev is None or abs(t - targets[k]) < abs(prev.time - targets[k]) else prev
                frames.append(pick.to_ndarray(width=size[0], height=size[1], format="rgb24", interpolation="AREA"))
                k += 1
            if k == len(targets):
                break
            prev = frame
        while k < len(targets) and prev is not None:  # targets past the last frame
            frames.append(prev.to_ndarray(width=size[0], height=size[1], format="rgb24", interpolation="AREA"))
            k += 1
    return frames


def plan_targets(data: bytes, cfg) -> tuple[list[float], tuple[int, int]]:
    """The sample times and frame size ours will use (planning only, nothing decoded)."""
    import av

    from pipeline.config import LimitsConfig
    from pipeline.media.video import _duration, display_size, plan_clips

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        duration = _duration(container, stream)
        width, height = stream.codec_context.width, stream.codec_context.height
    plans = plan_clips(duration, cfg, LimitsConfig())
    return [t for p in plans for t in p.targets], display_size(width, height, 1.0, cfg.max_side)


def compare(data: bytes, fps: float, repeats: int, seek_off_too: bool = False) -> dict[str, Any]:
    from pipeline.media import video as video_mod

    cfg = video_config(fps)
    targets, size = plan_targets(data, cfg)
    runs: dict[str, list[float]] = {"raw": [], "ours": [], "ours_no_seek": []}
    walls: dict[str, list[float]] = {"raw": [], "ours": [], "ours_no_seek": []}
    raw_frames: list[np.ndarray] = []
    clips: list[Any] = []
    for _ in range(repeats):
        raw_frames, wall, cpu = timed(lambda: raw(data, targets, size))
        runs["raw"].append(cpu)
        walls["raw"].append(wall)
        clips, wall, cpu = timed(lambda: ours(data, cfg))
        runs["ours"].append(cpu)
        walls["ours"].append(wall)
        if seek_off_too:
            saved = video_mod.SEEK_MIN_SKIP_FRAMES
            video_mod.SEEK_MIN_SKIP_FRAMES = 10**9
            try:
                _, wall, cpu = timed(lambda: ours(data, cfg))
            finally:
                video_mod.SEEK_MIN_SKIP_FRAMES = saved
            runs["ours_no_seek"].append(cpu)
            walls["ours_no_seek"].append(wall)
    ours_frames = [f for c in clips for f in c.frames]
    identical = len(ours_frames) == len(raw_frames) and all(
        np.array_equal(a, b) for a, b in zip(ours_frames, raw_frames)
    )
    n = len(ours_frames)
    out = {
        "frames": n,
        "ours_frames_per_s": round(n / best_of(runs["ours"]), 2),
        "raw_frames_per_s": round(n / best_of(runs["raw"]), 2),
        "ratio": round(best_of(runs["raw"]) / best_of(runs["ours"]), 3),
        "identical_frames": identical,
        "fps": fps,
        "frame_size": list(size),
        "ours_runs_cpu_s": [round(x, 3) for x in runs["ours"]],
        "raw_runs_cpu_s": [round(x, 3) for x in runs["raw"]],
        "ours_wall_frames_per_s": round(n / best_of(walls["ours"]), 2),
        "raw_wall_frames_per_s": round(n / best_of(walls["raw"]), 2),
    }
    if seek_off_too:
        out["ours_no_seek_frames_per_s"] = round(n / best_of(runs["ours_no_seek"]), 2)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    cpu = pin_one_core()
    t0 = time.perf_counter()
    default_gop, short_gop = clip_bytes(250), clip_bytes(FPS_SOURCE)
    gen_s = time.perf_counter() - t0
    main_case = compare(default_gop, 1.0, args.repeats)
    sparse = compare(short_gop, 0.2, args.repeats, seek_off_too=True)
    w, h = SIZE
    result = {
        "frames": main_case["frames"],
        "ours_frames_per_s": main_case["ours_frames_per_s"],
        "raw_frames_per_s": main_case["raw_frames_per_s"],
        "ratio": main_case["ratio"],
        "goal_ratio": GOAL_RATIO,
        "video": f"generated {int(SECONDS)} s {w}x{h} H.264 (x264 veryfast, crf 20, yuv420p, {FPS_SOURCE} fps, "
                 f"keyframe every 250 frames, {len(default_gop) * 8 / SECONDS / 1e6:.1f} Mbit/s): camera pan over "
                 f"a detailed scene with grain; sampled at 1 fps in 30 s clips, resized to "
                 f"{main_case['frame_size'][0]}x{main_case['frame_size'][1]}",
        "identical_frames": main_case["identical_frames"],
        "sparse": {
            **sparse,
            "video": f"the same scene with a keyframe every {FPS_SOURCE} frames (1 s), "
                     f"{len(short_gop) * 8 / SECONDS / 1e6:.1f} Mbit/s, sampled at 0.2 fps: ours seeks to the "
                     "keyframe before each sample, raw decodes every frame",
        },
        "detail": main_case,
        "method": {
            "cores": 1,
            "pinned_cpu": cpu,
            "threads": "thread_type AUTO on both sides; pinned to one CPU, so FFmpeg's threads share one core",
            "rates": "sampled frames per CPU-second of the process (all threads) = per core; wall rates in detail",
            "statistic": f"best of {args.repeats} alternating runs",
            "input_cache": str(CACHE_DIR),
            "input_generation_s": round(gen_s, 2),
        },
        "machine": machine(),
    }
    out = write_result(NAME, result)
    print(f"preprocess_video: {result['frames']} frames sampled from {result['video']}")
    print(f"  ours {result['ours_frames_per_s']} frames/s, raw PyAV {result['raw_frames_per_s']} frames/s, "
          f"ratio {result['ratio']} (goal >= {GOAL_RATIO}); identical frames: {result['identical_frames']}")
    print(f"  sparse (0.2 fps, 1 s GOP): ours {sparse['ours_frames_per_s']} frames/s (without seeking "
          f"{sparse['ours_no_seek_frames_per_s']}), raw {sparse['raw_frames_per_s']}, ratio {sparse['ratio']}; "
          f"identical frames: {sparse['identical_frames']}")
    print(f"  -> {out}")
    return result


if __name__ == "__main__":
    main()

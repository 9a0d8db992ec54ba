"""cpu_per_gpu.json: CPU cores needed per GPU to keep MiniCPM-V 4.6 fed, for PDFs, images and video.

cores per GPU = (units/s one GPU consumes) / (units/s one core of our preprocess stage produces).

Per-core rates are measured here, on one pinned core, through the whole preprocess stage
(`pipeline.expand.ExpandSource`, as `cpmv inspect` drives it; CPU time of the process):
- pdf: born-digital Letter pages (heading, paragraphs, ruled table), MiniCPM-V 4.6's pixel budget;
  scanned pages are measured too (they render several times slower);
- image: a 12 MP (4000x3000) camera-like JPEG through `expand_image` and the stage's fit/resize;
- video: the 60 s 640x480 H.264 clip of bench/preprocess_video.py sampled at 1 fps (sampled frames/s).

The GPU side is NOT measured here (no GPU on the CI machine): its rates are stated assumptions, derived
from a small cost model of one H100 running MiniCPM-V 4.6 under vLLM, with the visual token and slice
counts of the very units measured above (pipeline.media.slicing). Every constant of the model is in the
JSON under `assumptions`; replace the derived rates with measured ones via --gpu-rate when they exist.

The same rates inside Ray Data (`bench/under_ray.py`: one actor, whose output Ray buffers and copies
into the object store) are measured too, as the stage runs and without its process settings
(pipeline/memory.py), unless --no-ray.

    python -m bench.cpu_per_gpu [--gpu-rate pdf=8 image=11 video=380] [--no-ray]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from bench import (
    FAMILY,
    bench_pdf_bytes,
    best_of,
    cached,
    expand_stage,
    machine,
    photo_12mp_jpeg_bytes,
    pin_one_core,
    timed,
    write_result,
)

NAME = "cpu_per_gpu"
VIDEO_OVERRIDES = ["video.fps=1", "video.clip_seconds=30", "video.max_frames_per_clip=30"]

# --------------------------------------------------------------------------------------------------
# The engine cost model (stated assumptions; see the module docstring)

ENGINE = {
    "gpu": "one NVIDIA H100 SXM (989 TFLOP/s dense bf16 peak)",
    "engine": "vLLM, continuous batching, bf16, MiniCPM-V 4.6 (1.3B: SigLIP2 vision tower ~0.4B + Qwen3.5-0.8B)",
    "effective_tflops": 400.0,  # ~40% of peak for the vision tower and prefill: large, well-batched GEMMs
    "vision_params": 0.4e9,  # FLOPs per image patch ~= 2 x params (attention at <= 1024 patches adds ~10%, ignored)
    "lm_params": 0.8e9,  # prefill FLOPs per token ~= 2 x params
    "decode_tokens_per_s": 20_000.0,  # aggregate output tokens/s of a 0.8B LM at batch ~256 (memory-bound steps)
    "prompt_text_tokens": 50,  # instruction and chat template per unit
    "output_tokens": {"pdf": 800, "image": 150, "video_clip": 200},  # OCR markdown of a dense page; captions
    "video_frames_per_clip": 30,  # 30 s clips at 1 fps: a clip caption's tokens are shared by its frames
    "patch_size": 14,
}


def engine_seconds(kind: str, width: int, height: int) -> dict[str, Any]:
    """GPU seconds one unit costs under ENGINE, from the processor's own slicing of that unit's size."""
    from pipeline.media import slicing

    e = ENGINE
    if kind == "video":
        plan = slicing.plan_video_frame(FAMILY, width, height)
    else:
        plan = slicing.plan_image(FAMILY, width, height)  # the family default: 36 slices for 4.6
    images = [plan.overview, *plan.slices]
    patches = sum((w // e["patch_size"]) * (h // e["patch_size"]) for w, h in images)
    vision_flops = 2 * e["vision_params"] * patches
    if kind == "video":
        text_tokens = e["prompt_text_tokens"] / e["video_frames_per_clip"]
        out_tokens = e["output_tokens"]["video_clip"] / e["video_frames_per_clip"]
    else:
        text_tokens, out_tokens = e["prompt_text_tokens"], e["output_tokens"][kind]
    prefill_flops = 2 * e["lm_params"] * (plan.visual_tokens + text_tokens)
    seconds = (vision_flops + prefill_flops) / (e["effective_tflops"] * 1e12) + out_tokens / e["decode_tokens_per_s"]
    return {
        "unit_size": [width, height],
        "slices": len(plan.slices),
        "visual_tokens": plan.visual_tokens,
        "patches": patches,
        "output_tokens": round(out_tokens, 1),
        "gpu_ms_per_unit": round(seconds * 1000, 2),
        "units_per_s": round(1 / seconds, 1),
    }


# --------------------------------------------------------------------------------------------------
# Per-core rates of our stage


def _stage_rate(path: Path, repeats: int, overrides: list[str] | None = None, copies: int = 1) -> dict[str, Any]:
    """Units (or frames) per CPU-second of ExpandSource over `copies` source rows of one file."""
    import pyarrow as pa

    expander, source = expand_stage(path, overrides)
    source = pa.concat_tables([source] * copies)
    cpu_runs, size = [], None
    units = frames = 0
    for _ in range(repeats):
        def run() -> tuple[int, int, Any]:
            n_units = n_frames = 0
            first = None
            for table in expander(source):
                rows = table.drop_columns(["pixels"]).to_pylist()
                n_units += len(rows)
                n_frames += sum(r["num_frames"] or 0 for r in rows)
                bad = [r for r in rows if r["error_type"]]
                if bad:
                    raise SystemExit(f"{path.name}: {bad[0]['error_type']}: {bad[0]['error_message']}")
                first = first or (rows[0]["width"], rows[0]["height"])
                del table  # as a streaming consumer does: the stage's next page may then reuse its buffer
            return n_units, n_frames, first
        (units, frames, size), _, cpu = timed(run)
        cpu_runs.append(cpu)
    return {"units": units, "frames": frames, "cpu_s": best_of(cpu_runs), "unit_size": list(size)}


def raw_pdf_rate(path: Path, budget: int) -> float:
    """Pages per CPU-second of bare pymupdf rendering at the same DPI: what the stage could approach."""
    from bench.preprocess_pdf import raw_render

    (n, _), _, cpu = timed(lambda: raw_render(path, budget))
    return n / cpu


def measure_per_core(repeats: int) -> dict[str, Any]:
    from bench.preprocess_video import SECONDS, SIZE, clip_path

    born = cached("report-60p-born-digital.pdf", lambda: bench_pdf_bytes(60, scan_every=None))
    scans = cached("report-10p-scanned.pdf", lambda: bench_pdf_bytes(10, scan_every=1))
    photo = cached("photo-12mp.jpg", photo_12mp_jpeg_bytes)
    clip = clip_path(250)
    w, h = SIZE

    pdf = _stage_rate(born, repeats)
    scan = _stage_rate(scans, 1)
    image = _stage_rate(photo, repeats, copies=4)
    video = _stage_rate(clip, repeats, overrides=VIDEO_OVERRIDES)
    expander, _ = expand_stage(born)
    raw_pdf = max(raw_pdf_rate(born, expander.pixel_budget) for _ in range(repeats))
    return {
        "pdf_pages_per_s": round(pdf["units"] / pdf["cpu_s"], 2),
        "pdf_scanned_pages_per_s": round(scan["units"] / scan["cpu_s"], 2),
        "image_per_s": round(image["units"] / image["cpu_s"], 2),
        "video_frames_per_s": round(video["frames"] / video["cpu_s"], 2),
        "raw_pymupdf_pages_per_s": round(raw_pdf, 2),
        "unit_sizes": {"pdf": pdf["unit_size"], "image": image["unit_size"], "video": video["unit_size"]},
        "inputs": {
            "pdf": f"{pdf['units']} born-digital Letter pages (text, ruled table), MiniCPM-V 4.6 pixel budget",
            "pdf_scanned": f"{scan['units']} scanned pages (150 dpi greyscale JPEG, no text layer)",
            "image": "4000x3000 camera-like JPEG (quality 90), 4 sources",
            "video": f"{int(SECONDS)} s {w}x{h} H.264 (25 fps, keyframe every 250 frames), sampled at 1 fps: "
                     f"{video['frames']} frames",
        },
    }


def measure_under_ray() -> dict[str, Any]:
    from bench.preprocess_video import clip_path
    from bench.under_ray import measure

    return measure(
        cached("report-60p-born-digital.pdf", lambda: bench_pdf_bytes(60, scan_every=None)),
        cached("photo-12mp.jpg", photo_12mp_jpeg_bytes), clip_path(250), VIDEO_OVERRIDES,
    )


# --------------------------------------------------------------------------------------------------


def _parse_rates(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in ("pdf", "image", "video") or not value:
            raise SystemExit(f"--gpu-rate takes pdf=N image=N video=N, got {item!r}")
        out[key] = float(value)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu-rate", nargs="*", default=[], metavar="KIND=UNITS_PER_S",
                        help="measured GPU rates replacing the cost model's (pdf pages/s, image/s, video frames/s)")
    parser.add_argument("--no-ray", action="store_true", help="skip the rates under Ray Data (bench/under_ray.py)")
    args = parser.parse_args(argv)
    measured_gpu = _parse_rates(args.gpu_rate)

    cpu = pin_one_core()
    t0 = time.perf_counter()
    per_core = measure_per_core(args.repeats)
    sizes = per_core["unit_sizes"]
    model = {kind: engine_seconds(kind, *sizes[kind]) for kind in ("pdf", "image", "video")}
    gpu_rates = {kind: measured_gpu.get(kind, model[kind]["units_per_s"]) for kind in model}
    core_rate = {"pdf": per_core["pdf_pages_per_s"], "image": per_core["image_per_s"],
                 "video": per_core["video_frames_per_s"]}
    cores = {kind: round(gpu_rates[kind] / core_rate[kind], 2) for kind in model}
    under_ray = None if args.no_ray else measure_under_ray()
    result = {
        "assumptions": {
            "gpu_rates_per_gpu": {"pdf_pages_per_s": gpu_rates["pdf"], "image_per_s": gpu_rates["image"],
                                  "video_frames_per_s": gpu_rates["video"]},
            "source": {k: ("measured (--gpu-rate)" if k in measured_gpu else "cost model") for k in model},
            "basis": "GPU seconds per unit = (vision FLOPs + LM prefill FLOPs) / effective FLOP/s + output tokens / "
                     "aggregate decode tokens/s; slices, patches and visual tokens from pipeline.media.slicing "
                     "for the unit sizes our stage emits (4.6 defaults: 36 slices per page/image, 1 per video "
                     "frame, 16x token downsampling). Not measured: replace with an engine benchmark's rates.",
            "engine": ENGINE,
            "per_unit": model,
        },
        "per_core": {k: v for k, v in per_core.items() if k != "unit_sizes"} | {"unit_sizes": sizes},
        "cores_per_gpu": {
            "pdf": cores["pdf"],
            "image": cores["image"],
            "video": cores["video"],
            "pdf_scanned": round(gpu_rates["pdf"] / per_core["pdf_scanned_pages_per_s"], 2),
            "pdf_if_stage_matched_raw_pymupdf": round(gpu_rates["pdf"] / per_core["raw_pymupdf_pages_per_s"], 2),
        },
        "cores_per_gpu_rounded_up": {k: math.ceil(v) for k, v in cores.items()},
        # The same stage inside Ray Data, which also buffers and copies every block into the object store.
        "per_core_under_ray": under_ray,
        "cores_per_gpu_under_ray": None if under_ray is None else {
            "pdf": round(gpu_rates["pdf"] / under_ray["tuned"]["pdf_pages_per_s"], 2),
            "image": round(gpu_rates["image"] / under_ray["tuned"]["image_per_s"], 2),
            "video": round(gpu_rates["video"] / under_ray["tuned"]["video_frames_per_s"], 2),
        },
        "method": {
            "cores": 1,
            "pinned_cpu": cpu,
            "rates": "units per CPU-second of the pinned process (= per dedicated core), best of the repeats",
            "repeats": args.repeats,
            "elapsed_s": None,
        },
        "machine": machine(),
    }
    result["method"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
    out = write_result(NAME, result)
    print("cpu_per_gpu (MiniCPM-V 4.6 on one H100; GPU rates are", ", ".join(
        f"{k}: {v}" for k, v in result["assumptions"]["source"].items()) + ")")
    for kind, unit in (("pdf", "pages"), ("image", "images"), ("video", "frames")):
        print(f"  {kind:5s}: GPU {gpu_rates[kind]:7.1f} {unit}/s, one core {core_rate[kind]:7.2f} {unit}/s "
              f"-> {cores[kind]:6.2f} cores per GPU")
    print(f"  scanned PDF pages: {result['cores_per_gpu']['pdf_scanned']} cores per GPU; born-digital pages if the "
          f"stage ran at raw pymupdf speed: {result['cores_per_gpu']['pdf_if_stage_matched_raw_pymupdf']}")
    if under_ray is not None:
        t, u = under_ray["tuned"], under_ray["untuned"]
        c = result["cores_per_gpu_under_ray"]
        print(f"  under Ray Data (one actor): pdf {t['pdf_pages_per_s']} pages/s ({c['pdf']} cores per GPU), image "
              f"{t['image_per_s']}/s ({c['image']}), video {t['video_frames_per_s']} frames/s ({c['video']}); "
              f"without pipeline/memory.py: pdf {u['pdf_pages_per_s']}, image {u['image_per_s']}, "
              f"video {u['video_frames_per_s']}")
    print(f"  -> {out}")
    return result


if __name__ == "__main__":
    main()

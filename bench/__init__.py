"""Preprocessing benchmarks (issue 4): each module measures our stage against a raw reference in the same run.

Conventions shared by every benchmark here:
- No wall-clock assertions: a benchmark prints its figures and writes `bench/results/<name>.json`;
  goals are compared as ratios against a reference measured in the same process, so a slower or
  busier machine moves both sides.
- One core: `pin_one_core()` restricts the process (and the threads it starts, e.g. FFmpeg's) to a
  single CPU with `sched_setaffinity`, so rates are per core, the unit the scaling guide needs.
- Inputs are generated (deterministically) and cached under the temp dir, never committed.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = Path(os.environ.get("CPMV_BENCH_CACHE", Path(tempfile.gettempdir()) / "cpmv-bench"))


# --------------------------------------------------------------------------------------------------
# Process and results


def pin_one_core() -> int | None:
    """Pin this process to one CPU (the last one it may use); return it, or None where unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import av
    import numpy
    import pymupdf

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "pymupdf": pymupdf.__version__,
        "mupdf": getattr(pymupdf, "mupdf_version", None),
        "av": av.__version__,
        "numpy": numpy.__version__,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_result(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def vm_hwm_mb() -> float | None:
    """This process's own peak RSS in MiB from /proc (VmHWM), or None off Linux.

    Unlike ru_maxrss, which Linux carries across exec, it never reports the parent's peak in a child.
    """
    try:
        for line in open("/proc/self/status").read().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def best_of(runs: list[float]) -> float:
    """The fastest run: the least disturbed by other processes (we compare like with like)."""
    return min(runs)


def cached(name: str, make: Callable[[], bytes]) -> Path:
    """A generated input, written once under CACHE_DIR (the generators are deterministic)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / name
    if not path.is_file():
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(make())
        tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# Inputs (built from pipeline.samples helpers; bench-only variants live here, not in samples.py)

SCAN_EVERY = 50  # one scanned page in every 50: 10 of 500
SCAN_OFFSET = 7


def bench_pdf_bytes(n_pages: int = 500, scan_every: int | None = SCAN_EVERY) -> bytes:
    """A long born-digital report: heading, two paragraphs, a ruled 9x4 table and more text per page, with
    one scanned page (noisy greyscale JPEG, no text layer) every `scan_every` pages (the 8th of each 50)."""
    import pymupdf

    from pipeline import samples

    n_scans = n_pages // scan_every if scan_every else 0  # None: born-digital pages only
    scans = pymupdf.open(stream=_scan_pages_pdf(n_scans), filetype="pdf") if n_scans else pymupdf.open()
    doc = pymupdf.open()
    w, h = samples.LETTER
    scan_no = 0
    for i in range(n_pages):
        if scan_every and i % scan_every == SCAN_OFFSET % scan_every and scan_no < scans.page_count:
            doc.insert_pdf(scans, from_page=scan_no, to_page=scan_no)
            scan_no += 1
            continue
        page = doc.new_page(width=w, height=h)
        page.insert_text((72, 90), f"Section {i + 1}: Pipeline Report", fontsize=20, fontname="hebo")
        y = 120.0
        for para in samples._PARAGRAPHS:
            page.insert_textbox(pymupdf.Rect(72, y, w - 72, y + 80), para, fontsize=11, fontname="helv")
            y += 90
        rows = [samples._TABLE[0]] + [
            [f"Q{r}", f"{(i * 7919 + r * 104729) % 300000:,}", str((i * 31 + r * 17) % 400), f"{40 + (i + r) % 30}.{r}"]
            for r in range(1, 9)
        ]
        _table(page, pymupdf.Point(72, y + 10), rows)
        page.insert_textbox(pymupdf.Rect(72, y + 230, w - 72, h - 72), samples._PARAGRAPHS[(i + 1) % 2] * 3,
                            fontsize=10, fontname="tiro")
    scans.close()
    data = doc.tobytes(garbage=1, deflate=True, no_new_id=True)
    doc.close()
    return data


def _table(page, origin, rows: list[list[str]]) -> None:
    """samples._draw_table's ruled grid, drawn with one Shape per page (hundreds of times faster to build)."""
    import pymupdf

    col_w, row_h = 110.0, 22.0
    shape = page.new_shape()
    for r, row in enumerate(rows):
        for c in range(len(row)):
            shape.draw_rect(pymupdf.Rect(origin.x + c * col_w, origin.y + r * row_h,
                                         origin.x + (c + 1) * col_w, origin.y + (r + 1) * row_h))
            shape.finish(color=(0, 0, 0), fill=(0.85, 0.88, 0.95) if r == 0 else None, width=0.8)
    for r, row in enumerate(rows):
        for c, text in enumerate(row):
            shape.insert_text((origin.x + c * col_w + 6, origin.y + (r + 1) * row_h - 7), text, fontsize=10,
                              fontname="hebo" if r == 0 else "helv")
    shape.commit()


def _scan_pages_pdf(n: int) -> bytes:
    """`n` different scanned-looking pages (text as pixels, skewed, noisy, JPEG, no text layer)."""
    import numpy as np
    import pymupdf
    from PIL import Image, ImageFilter

    from pipeline import samples

    dpi = 150
    width, height = samples.LETTER[0] * dpi // 72, samples.LETTER[1] * dpi // 72
    rng = np.random.default_rng(samples._SEED)
    doc = pymupdf.open()
    for k in range(n):
        lines = [f"{line} ({k + 1})" if line else "" for line in samples._SCAN_LINES] * 2
        text = samples._render_text_lines(lines, width, height, dpi)
        skewed = text.rotate(0.6 + 0.2 * k, resample=Image.BICUBIC, fillcolor=245).filter(ImageFilter.GaussianBlur(0.6))
        arr = np.asarray(skewed, dtype=np.float32) + rng.normal(0, 9, (height, width))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").save(buf, format="JPEG", quality=70)
        page = doc.new_page(width=samples.LETTER[0], height=samples.LETTER[1])
        page.insert_image(page.rect, stream=buf.getvalue())
    return samples._pdf_bytes(doc)


def bench_video_bytes(
    seconds: float = 60.0, fps: int = 25, size: tuple[int, int] = (640, 480), gop: int = 250
) -> bytes:
    """An H.264/yuv420p MP4 (x264 `veryfast`, crf 20, keyframe at most every `gop` frames; 250 is x264's
    default) of a camera panning over a detailed scene, with sensor-like grain and the samples clip's moving
    square and disc: about 2.5 Mbit/s at 640x480, so decoding costs what real frames cost."""
    import av
    import numpy as np
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(7)
    tex_w = 4 * width
    coarse = rng.integers(0, 256, (height // 8, tex_w // 8, 3), dtype=np.uint8)
    fine = rng.integers(0, 48, (height, tex_w, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((tex_w, height), Image.Resampling.BICUBIC)) // 2 + fine
    grain = rng.integers(0, 24, (2 * height, 2 * width, 3), dtype=np.uint8)  # sensor noise, new every frame
    columns = np.arange(width)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(
            "libx264", rate=fps,
            options={"crf": "20", "preset": "veryfast", "g": str(gop), "flags": "+bitexact"},
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame_rgb = np.take(texture, (columns + 3 * i) % tex_w, axis=1)  # pan 3 px per frame
            gy, gx = (i * 7919) % height, (i * 104729) % width
            frame_rgb += grain[gy:gy + height, gx:gx + width]  # texture <= 174, grain <= 23: no overflow
            t = i / fps
            sx = int((width - 60) * (t / 4.0)) % (width - 60)
            frame_rgb[40:100, sx:sx + 60] = 255
            cy, cx = height * 2 // 3 + int(30 * np.sin(t * 2)), width // 2 + int(80 * np.cos(t * 2))
            frame_rgb[cy - 20:cy + 20, cx - 20:cx + 20] = (250, 200, 30)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_rgb), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def photo_12mp_jpeg_bytes(width: int = 4000, height: int = 3000, quality: int = 90) -> bytes:
    """A 12 MP camera-like JPEG (the samples photo scene with sensor-like noise), EXIF orientation 1."""
    import numpy as np
    from PIL import Image

    from pipeline.samples import photo_array

    img = photo_array(width, height).astype(np.int16)
    rng = np.random.default_rng(12)
    img += rng.integers(-12, 13, img.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Our preprocess stage, driven the way `cpmv inspect` drives it (no Ray)

FAMILY = "minicpmv4_6"


def expand_stage(path: Path, overrides: list[str] | None = None):
    """(ExpandSource, source-row table) for one local file, with the default inspect job and 4.6's budget."""
    import pyarrow as pa

    from pipeline.expand import ExpandSource
    from pipeline.inspect_units import load_inspect_job, pixel_budget
    from pipeline.sources import discover
    from pipeline.tasks import resolve_task

    job = load_inspect_job(str(path), overrides=overrides)
    tasks = {t.name: resolve_task(t) for t in job.tasks}
    args: list[Any] = [job, pixel_budget(job, FAMILY), {n: sorted(t.unit_kinds) for n, t in tasks.items()}]
    if "family" in inspect.signature(ExpandSource).parameters:  # the stage learnt the family in issue 4
        args.append(FAMILY)
    expander = ExpandSource(*args)
    (src,) = list(discover(job.input, job.storage))
    row = {"source_uri": src.uri, "source_id": src.source_id, "size": src.size, "tasks": list(tasks)}
    return expander, pa.Table.from_pylist([row])


def consume(expander, source) -> dict[str, int]:
    """Run the stage over one source row and consume every yielded table: units, frames, pixel bytes, errors.

    The accounting reads Arrow's own counters (lengths, null counts), not compute kernels: a
    kernel call costs ~30 us, and one table per page would charge ~0.1 ms a page to the stage.
    """
    units = frames = pixel_bytes = errors = 0
    for table in expander(source):
        units += table.num_rows
        frames += sum(n or 0 for n in table.column("num_frames").to_pylist())
        pixel_bytes += sum(chunk.values.total_values_length for chunk in table.column("pixels").chunks)
        errors += table.num_rows - table.column("error_type").null_count
        # Done with it, as Ray is once it has put a block into the object store: not holding it while
        # the stage renders the next page lets that page reuse the buffer (see ExpandSource.__call__).
        del table
    return {"units": units, "frames": frames, "pixel_bytes": pixel_bytes, "errors": errors}

"""hostile_bounds.json: how fast, and within how much memory, a preprocess worker turns away or bounds
a 100,000-page PDF, a 10-hour video and 1 GB images (issue 11, item 10; goal: peak RSS < 1500 MB each).

- Inputs (generated, cached under $CPMV_BENCH_CACHE): a PDF of 100,000 (empty) pages; a 10-hour MP4 (one
  32x24 frame every 10 minutes: its header says 36,000 s); a PNG whose header claims 40000x30000 pixels
  (1.2 G pixels, 3.6 GB decoded); a 1 GiB file (sparse on disk) that starts as a PNG; and, for
  contrast, the largest image the default limits accept: a 10000x10000 RGB PNG (100 M pixels,
  300 MB decoded), which is decoded, tiled and resized for the model.
- Each input runs in a fresh subprocess (peak RSS read as VmHWM: ru_maxrss would carry over the
  parent's peak across exec) through `pipeline.expand.ExpandSource`, as `cpmv inspect`
  drives it (the callable a Ray preprocess actor maps over sources), with the default job limits;
  every yielded table is consumed. The subprocess reports its peak RSS (ru_maxrss), wall and CPU time,
  the number of rows, and the error types and first message of each.
- The baseline: the same subprocess importing the stage and reading nothing (`--one idle`), so the
  figures show what the input added.

    python -m bench.hostile_bounds [--pages 100000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench import CACHE_DIR, cached, machine, peak_rss_mb, pin_one_core, timed, vm_hwm_mb, write_result

GIB = 2**30


def _pdf(pages: int) -> bytes:
    """A PDF of `pages` empty Letter pages, written directly (pymupdf takes minutes for 100,000 new_page calls)."""
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", None]
    kids = []
    for i in range(pages):
        kids.append(f"{i + 3} 0 R".encode())
        objs.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>")
    objs[1] = b"<< /Type /Pages /Count " + str(pages).encode() + b" /Kids [" + b" ".join(kids) + b"] >>"
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for n, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def _largest_accepted_png() -> bytes:
    """10000x10000 RGB (300 MB decoded): exactly limits.max_pixels, so it is decoded, tiled and resized."""
    import io

    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 10000, dtype=np.uint8)
    arr = np.empty((10000, 10000, 3), np.uint8)
    arr[..., 0] = ramp[None, :]
    arr[..., 1] = ramp[:, None]
    arr[..., 2] = 128
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def inputs(pages: int) -> dict[str, Path]:
    from tests import hostile

    paths = {
        "pdf_100k_pages": cached(f"hostile-{pages}-pages.pdf", lambda: _pdf(pages)),
        "video_10_hours": cached("hostile-10h.mp4", lambda: hostile.long_video(10.0)),
        "image_1g_pixels": cached("hostile-40000x30000-header.png", lambda: hostile.png_header_only(40000, 30000)),
    }
    paths["image_100m_pixels_accepted"] = cached("hostile-10000x10000.png", _largest_accepted_png)
    big = CACHE_DIR / "hostile-1gib.png"
    if not big.is_file() or big.stat().st_size != GIB:
        with open(big, "wb") as f:  # sparse: 1 GiB long, a few bytes on disk
            f.write(hostile.pil_bytes("PNG", (64, 64)))
            f.truncate(GIB)
    paths["image_1gib_file"] = big
    return paths


def _peak_mb() -> float:
    """This process's peak RSS in MiB: VmHWM on Linux (ru_maxrss survives exec, so a child would report
    the parent's peak from generating inputs), else ru_maxrss."""
    hwm = vm_hwm_mb()
    return peak_rss_mb() if hwm is None else hwm


def one(path: str | None) -> dict[str, Any]:
    """Run the stage over one input in this process (or import it only, for `idle`)."""
    pin_one_core()
    from bench import expand_stage

    if path is None:
        expand_stage(Path(__file__))  # imports and builds the stage; reads this file only as a listing
        return {"peak_rss_mb": round(_peak_mb(), 1)}
    expander, source = expand_stage(Path(path))
    rows: list[dict[str, Any]] = []

    def go() -> None:
        for table in expander(source):
            rows.extend(table.drop_columns(["pixels"]).select(["unit_index", "error_type", "error_message"]).to_pylist())

    _, wall, cpu = timed(go)
    types = Counter(r["error_type"] or "ok" for r in rows)
    first = {}
    for r in rows:
        first.setdefault(r["error_type"] or "ok", r["error_message"])
    return {"rows": len(rows), "error_types": dict(types), "messages": first, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "peak_rss_mb": round(_peak_mb(), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pages", type=int, default=100_000)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(one(None if args.one == "idle" else args.one)))
        return
    results: dict[str, Any] = {}
    for name, path in [("idle", None), *inputs(args.pages).items()]:
        proc = subprocess.run([sys.executable, "-m", "bench.hostile_bounds", "--one", str(path or "idle")],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        if path is not None:
            results[name]["file_bytes"] = Path(path).stat().st_size
        print(f"{name:16s} {json.dumps(results[name])}", flush=True)
    out = {"machine": machine(), "goal_peak_rss_mb": 1500, "results": results}
    print(f"written to {write_result('hostile_bounds', out)}")


if __name__ == "__main__":
    main()

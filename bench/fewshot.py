"""What few-shot examples and page windows cost (issue 10, items 3 and 5), on one core.

1. Expansion of a text PDF for `ocr` + `table`: `pdf.page_window` 1 (one page per table unit) against
   2 (each table unit a page and the next): pages/s and pixel bytes shipped to the engine per page.
2. The tiny MiniCPM-V 4.6 transformers engine (random weights, CPU): prompt tokens and seconds per
   request with 0, 1 and 2 example turns before a unit, 2 new tokens each (the prompt's cost, not
   decoding). Tiny weights make the seconds a lower bound; the token counts are what a real 4.6 sees.

`PYTHONPATH=. .venv/bin/python -m bench.fewshot [--pages 40] [--requests 6]`; writes bench/results/fewshot.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import best_of, cached, consume, expand_stage, machine, pin_one_core, write_result, bench_pdf_bytes


def expansion(pages: int) -> dict[str, Any]:
    path = cached(f"fewshot-text-{pages}.pdf", lambda: bench_pdf_bytes(pages, scan_every=None))
    out: dict[str, Any] = {}
    for window in (1, 2):
        runs, counts = [], {}
        for _ in range(3):
            expander, source = expand_stage(path, ["tasks=[{name: ocr}, {name: table}]", f"pdf.page_window={window}"])
            t0 = time.perf_counter()
            counts = consume(expander, source)
            runs.append(time.perf_counter() - t0)
        out[f"window_{window}"] = {"pages_per_s": round(pages / best_of(runs), 1), "unit_rows": counts["units"],
                                   "images": counts["frames"],
                                   "pixel_mb_per_page": round(counts["pixel_bytes"] / pages / 2**20, 2)}
    out["window_2_over_1_time"] = round(out["window_1"]["pages_per_s"] / out["window_2"]["pages_per_s"], 2)
    return out


def engine(requests: int) -> dict[str, Any]:
    from pipeline.engines.base import Example, Request
    from pipeline.engines.transformers import TransformersEngine
    from pipeline.tiny import build_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    eng = TransformersEngine(str(build_tiny("minicpmv4_6", tempfile.mkdtemp())), device="cpu")
    rng = np.random.default_rng(0)
    img = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    examples = [Example((img(600, 800),), "Describe the image.", "A photo."),
                Example((img(800, 600),), "Describe the image.", "Another photo.")]
    out: dict[str, Any] = {}
    for n in (0, 1, 2):
        batch = [Request("Describe the image.", [img(700, 900)], max_new_tokens=2, examples=examples[:n])
                 for _ in range(requests)]
        eng.generate(batch[:1])  # warm
        runs, replies = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            replies = eng.generate(batch)
            runs.append(time.perf_counter() - t0)
        out[f"examples_{n}"] = {"prompt_tokens": replies[0].prompt_tokens,
                                "s_per_request": round(best_of(runs) / requests, 3)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=40)
    parser.add_argument("--requests", type=int, default=6)
    args = parser.parse_args(argv)
    cpu = pin_one_core()
    data = {"machine": {**machine(), "cpu_pinned": cpu}, "expansion": expansion(args.pages),
            "engine_tiny_4_6": engine(args.requests)}
    path = write_result("fewshot", data)
    import json

    print(json.dumps({k: v for k, v in data.items() if k != "machine"}, indent=2))
    print(f"written to {path}")
    return data


if __name__ == "__main__":
    main()

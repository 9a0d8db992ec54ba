"""dedup.json: what `input.dedup: content` saves and costs (issue 10, item 7).

- Input: a Parquet manifest of N PNG images (64x48 random pixels) of which only D are distinct
  (each distinct image stored N/D times under other names), with a pass-through column.
- Job: the tiny MiniCPM-V 4.6 (transformers engine, one slice), one `caption` task of a few tokens,
  local Ray on 127.0.0.1 (2 CPUs), run twice in one Ray session into two output prefixes: with
  `input.dedup: none` and with `input.dedup: content`.
- Figures: engine requests of each run (the CPMV_ENGINE_CALL_LOG hook, one line per request), the
  run record's dedup counts, pipeline wall time of each run, and sha256 throughput on this machine
  (the per-source cost of hashing while reading), MB/s over a 64 MiB buffer. The first run of the
  two also pays for building the tiny model and warming the workers: compare wall times with both
  orders (`--first`).

No assertions on time: figures are printed and written to bench/results/dedup.json.

    flock /tmp/cpmv-ray.lock .venv/bin/python -m bench.dedup [--n 60] [--distinct 20] [--first content]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench import machine, write_result

NAME = "dedup"


def _corpus(root: Path, n: int, distinct: int) -> list[str]:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"img{i:04d}.png"
        if i < distinct:
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(p)
        else:
            shutil.copy(root / f"img{i % distinct:04d}.png", p)
        paths.append(str(p))
    return paths


def _sha256_mb_s() -> float:
    data = os.urandom(64 * 2**20)
    t0 = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return round(64 / (time.perf_counter() - t0), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--distinct", type=int, default=20)
    ap.add_argument("--first", choices=["none", "content"], default="content",
                    help="mode run first (the first run also starts Ray's actors and builds the tiny model)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cpmv-bench-dedup-"))
    calls = tmp / "calls.log"
    os.environ.update(RAY_TMPDIR=tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                      HF_HUB_OFFLINE="1", CPMV_ENGINE_CALL_LOG=str(calls))
    os.environ.pop("RAY_ADDRESS", None)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import load_job_data, run_job

    uris = _corpus(tmp / "corpus", args.n, args.distinct)
    manifest = tmp / "manifest.parquet"
    pq.write_table(pa.table({"uri": uris, "item_id": pa.array(range(len(uris)), pa.int64())}), manifest)
    out: dict[str, object] = {"n_sources": args.n, "distinct": args.distinct, "sha256_mb_s": _sha256_mb_s()}
    out["order"] = [args.first, "none" if args.first == "content" else "content"]
    for mode in out["order"]:
        job = load_job_data({
            "name": f"dedup-{mode}", "input": {"manifest": str(manifest), "pass_through": ["item_id"], "dedup": mode},
            "output": {"uri": str(tmp / f"out-{mode}")},
            "model": {"name": "tiny", "max_slice_nums": 1, "cache_dir": str(tmp / "cache")},
            "checks": {"enabled": False}, "tasks": [{"name": "caption", "max_new_tokens": 4}],
            "ray": {"num_cpus": 2},
        })
        before = len(calls.read_text().splitlines()) if calls.exists() else 0
        summary = run_job(job)
        after = len(calls.read_text().splitlines())
        out[mode] = {"status": summary.status, "engine_requests": after - before,
                     "pipeline_s": summary.timings.get("pipeline_s"),
                     "dedup_units_saved": summary.counts.get("dedup_units_saved", 0),
                     "dedup_sources": summary.counts.get("dedup_sources", 0),
                     "results_rows": pq.read_table(tmp / f"out-{mode}" / "results").num_rows}
        print(mode, out[mode], flush=True)
    out["machine"] = machine()
    print("written", write_result(NAME, out))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

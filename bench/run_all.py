"""Run every benchmark in turn: `python -m bench.run_all [NAME ...]` (writes bench/results/*.json).

Each benchmark runs in its own process (clean peak RSS, no state shared between them), in the
environment it needs: engine_occupancy in the vLLM one (`.venv-vllm`, or $CPMV_VLLM_PYTHON), every
other in this interpreter's. cpu_per_gpu runs after the preprocessing ones (it reuses their generated
inputs). A benchmark counts as done only when it exited 0 and wrote its JSON during this run; the
end prints each one's status and JSON path. Times on 2 cores: preprocessing ~3 min each,
commit_index ~1.5 min, resume ~5 min, scale ~10 min, file_sizes ~1.5 min, engine_occupancy (1,000
requests; raw, async and raw_capped by default) ~10 min on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ["preprocess_pdf", "preprocess_video", "cpu_per_gpu", "commit_index", "resume", "scale",
              "file_sizes", "engine_occupancy", "fewshot"]
#: Benchmarks that run in the vLLM environment.
VLLM = {"engine_occupancy"}


def python_for(name: str) -> str:
    if name in VLLM:
        return os.environ.get("CPMV_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
    return sys.executable


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {BENCHMARKS}", file=sys.stderr)
        return 2
    results = ROOT / "bench" / "results"
    status: dict[str, str] = {}
    for name in names:
        print(f"== {name}", flush=True)
        python = python_for(name)
        if not Path(python).exists():
            status[name] = f"not run: no {python} (make bench sets up the vLLM environment)"
            print(f"== {name}: {status[name]}", flush=True)
            continue
        t0 = time.time()
        rc = subprocess.call([python, "-m", f"bench.{name}"], cwd=ROOT)
        out = results / f"{name}.json"
        wrote = out.exists() and out.stat().st_mtime >= t0
        if rc == 0 and wrote:
            status[name] = f"ok in {time.time() - t0:.0f} s: {out.relative_to(ROOT)}"
        else:
            status[name] = f"failed (exit {rc}{'' if wrote else f', no new {out.name}'})"
        print(f"== {name}: {status[name]}", flush=True)
    print("\n".join(["", "benchmarks:"] + [f"  {n:<18} {s}" for n, s in status.items()]))
    failed = [n for n, s in status.items() if not s.startswith("ok")]
    if failed:
        print(f"failed or not run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Run every preprocessing benchmark in turn: `python -m bench.run_all` (writes bench/results/*.json).

Each benchmark runs in its own process (clean peak RSS, no state shared between them) and takes under
about 3 minutes on a 2-core machine once its generated inputs are cached. cpu_per_gpu runs last: it
reuses the inputs the other two generate.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = ["preprocess_pdf", "preprocess_video", "cpu_per_gpu"]


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {BENCHMARKS}", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", f"bench.{name}"], cwd=root)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
        print(f"== {name}: {status} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

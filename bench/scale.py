"""scale.json: does a run's cost per source stay flat as the corpus grows (issue 14, "Measured")?

- Input: N one-page PDFs (bench/resume.py's corpus: 300x400 pt, one line of text; one unit each),
  for N in `--sizes` (default 500, 2000, 8000), each in its own fresh output prefix.
- Job: `cpmv run` in a subprocess (own RAY_TMPDIR, local Ray, 2 CPUs), tiny MiniCPM-V 4.6 (one
  slice), OCR with `max_new_tokens` 1, commit windows of `--window-units` (default 1000) units or
  300 s. The driver runs pipeline.cli.main in-process and reports its own peak RSS (VmHWM; Ray's
  raylet, GCS and workers are other processes and are not counted).
- Figures per N: wall seconds of the whole command (Python start, discovery, Ray start, model load,
  run, commits, shutdown) and per source; the run record's timings; engine requests (from the
  CPMV_ENGINE_CALL_LOG file, sampled every 0.5 s: when the first came, when 10% and 90% had come,
  when the last came), so start-up, the steady state and the tail can be told apart; driver peak RSS.
- Across N: per-source wall at the largest N over that at the smallest (goal <= 1.2), the steady-state
  engine time per source likewise, and the driver's RSS per additional source.
- No-op rerun of the largest job on the same output prefix: engine requests (goal 0) and wall over
  the first run's (goal <= 0.10).

No wall-clock assertions: the figures are printed and written to bench/results/scale.json. The 8000
run takes ~7-10 minutes on 2 cores; the whole benchmark ~15-20 minutes (corpora generated once).

    flock /tmp/cpmv-ray.lock .venv/bin/python -m bench.scale [--sizes 500,2000,8000] [--window-units 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bench import machine, write_result
from bench.resume import Workspace, corpus_uris, loadavg, output_keys, pdf_corpus

NAME = "scale"
GOAL_PER_SOURCE_RATIO = 1.2
GOAL_NOOP_WALL_RATIO = 0.10


def _at_fraction(timeline: list[list[float]] | list[tuple[float, int]], n: int, frac: float) -> float | None:
    """Seconds since start when the engine had answered `frac` of `n` requests (first sample at or past)."""
    want = frac * n
    for t, c in timeline:
        if c >= want and c > 0:
            return t
    return None


def one_size(n: int, window_units: int, tokens: int, noop: bool, keep: bool) -> dict[str, Any]:
    corpus = pdf_corpus(n)
    ws = Workspace(f"scale{n}", corpus, window_units=window_units, tokens=tokens, keep=keep)
    try:
        load_before = loadavg()
        first = ws.run()
        load_after = loadavg()
        (rec,) = ws.records()  # the first run's (the no-op rerun comes later)
        tl = first["calls_timeline"]
        t_first, t10, t90 = _at_fraction(tl, n, 1e-9), _at_fraction(tl, n, 0.1), _at_fraction(tl, n, 0.9)
        t_last = _at_fraction(tl, n, 1.0)
        steady = (t90 - t10) / (0.8 * n) if t10 is not None and t90 is not None else None
        res: dict[str, Any] = {
            "n_sources": n,
            "wall_s": first["wall_s"],
            "per_source_wall_ms": round(1000 * first["wall_s"] / n, 3),
            "run_record_timings": rec.get("timings"),
            "windows": rec.get("counts", {}).get("windows"),
            "engine_requests": first["engine_requests"],
            "engine": {"first_request_s": t_first, "p10_s": t10, "p90_s": t90, "last_request_s": t_last,
                       "steady_ms_per_source": round(1000 * steady, 3) if steady else None,
                       "tail_after_last_request_s": round(first["wall_s"] - t_last, 2) if t_last else None},
            "driver_peak_rss_mb": first["driver_peak_rss_mb"],
            "driver_ru_maxrss_mb": first["driver_ru_maxrss_mb"],
            "driver_rss_timeline": {"columns": ["s", "engine_requests", "rss_mb", "anon_mb", "shmem_mb"],
                                    "rows": first["rss_timeline"]},
            "loadavg": {"before": load_before, "after": load_after},
        }
        if noop:
            again = ws.run()
            res["noop_rerun"] = {
                "engine_requests": again["engine_requests"], "wall_s": again["wall_s"],
                "wall_over_first": round(again["wall_s"] / first["wall_s"], 4),
                "driver_peak_rss_mb": again["driver_peak_rss_mb"], "summary": again["summary_tail"],
            }
        keys = output_keys(ws.out, corpus_uris(corpus))
        res["output"] = {k: keys[k] for k in ("result_rows", "distinct_keys", "duplicate_keys", "missing_sources",
                                               "documents_rows", "documents_duplicates", "results_by_status")}
    finally:
        ws.cleanup()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="500,2000,8000", help="comma-separated source counts (ascending)")
    ap.add_argument("--window-units", type=int, default=1000, help="output.commit_every_units")
    ap.add_argument("--tokens", type=int, default=1, help="max_new_tokens of the OCR task")
    ap.add_argument("--keep", action="store_true", help="keep the workspaces (outputs, logs) under the cache dir")
    args = ap.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    t0 = time.perf_counter()
    for n in sizes:  # generate every corpus first, so no run waits on (or shares the CPUs with) pymupdf
        pdf_corpus(n)
    runs = []
    for n in sizes:
        print(f"== N={n}", flush=True)
        r = one_size(n, args.window_units, args.tokens, noop=n == sizes[-1], keep=args.keep)
        print(json.dumps({k: r[k] for k in ("wall_s", "per_source_wall_ms", "engine_requests", "driver_peak_rss_mb",
                                            "engine")}), flush=True)
        runs.append(r)
    small, large = runs[0], runs[-1]
    res: dict[str, Any] = {
        "sizes": sizes,
        "model": "tiny (MiniCPM-V 4.6 architecture, random weights), max_slice_nums 1",
        "max_new_tokens": args.tokens,
        "window": {"commit_every_units": args.window_units, "commit_every_s": 300.0},
        "runs": runs,
    }
    if len(runs) > 1:
        d_rss = (large["driver_peak_rss_mb"] or 0) - (small["driver_peak_rss_mb"] or 0)
        s_small, s_large = small["engine"]["steady_ms_per_source"], large["engine"]["steady_ms_per_source"]
        res.update({
            "per_source_wall_ratio": round(large["per_source_wall_ms"] / small["per_source_wall_ms"], 4),
            "goal_per_source_wall_ratio": GOAL_PER_SOURCE_RATIO,
            "steady_per_source_ratio": round(s_large / s_small, 4) if s_small and s_large else None,
            "driver_rss_kb_per_added_source": round(1024 * d_rss / (large["n_sources"] - small["n_sources"]), 3),
        })
    res["driver_peak_rss_kb_per_source"] = {str(r["n_sources"]): round(1024 * r["driver_peak_rss_mb"] / r["n_sources"], 2)
                                           for r in runs if r["driver_peak_rss_mb"]}
    noop = large["noop_rerun"]
    res.update({
        "noop_rerun_engine_requests": noop["engine_requests"],
        "noop_rerun_wall_over_first": noop["wall_over_first"],
        "goal_noop_wall_over_first": GOAL_NOOP_WALL_RATIO,
    })
    res["at_goal"] = {
        "per_source_wall": res.get("per_source_wall_ratio", 0) <= GOAL_PER_SOURCE_RATIO if len(runs) > 1 else None,
        "noop_requests": noop["engine_requests"] == 0,
        "noop_wall": noop["wall_over_first"] <= GOAL_NOOP_WALL_RATIO,
        "exactly_once": all(r["output"]["duplicate_keys"] == 0 and r["output"]["missing_sources"] == 0
                            and r["output"]["distinct_keys"] == r["n_sources"] for r in runs),
    }
    res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    res["machine"] = machine()
    path = write_result(NAME, res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("runs", "machine")}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""file_sizes.json: files per run with and without output.min_rows_per_file and output.partition_by (issue 15).

- Input: `--runs` (5) nightly runs on one local prefix, each publishing `--sources` (400) new synthetic
  sources of 3 pages x 2 tasks (ocr, caption: 6 result rows a source, a `--text` (1500) character
  text per ok row, every 50th source's ocr a transient error) in commit windows of `--window` (10)
  sources, i.e. 60 result rows a window: what short `output.commit_every_s` windows make.
- Driven through the real commit protocol (`pipeline.commit.Publisher`, recover, the partitioning
  check, the committed-set lookup), as pipeline/run.py drives it, without Ray or an engine.
- Scenarios: flat and `partition_by [task, status]`, each without a minimum and with each
  `min_rows_per_file` of `--min-rows` (600 = ten windows, 5000).
- Figures per scenario: data files (results + documents) after each run and per run, result rows per
  results file (min, median), bytes uploaded (everything the protocol wrote: staged files, intents,
  markers), bytes of the final data files and their ratio (the rewrite cost of appending), seconds
  publishing, and seconds for `pd.read_parquet(OUT/results)` of the final table.

No wall-clock assertions: figures are printed and written to bench/results/file_sizes.json. No Ray.

    .venv/bin/python -m bench.file_sizes [--runs 5] [--sources 400] [--window 10] [--min-rows 600 5000]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import machine, write_result

NAME = "file_sizes"
FPS = {"ocr": "fp-ocr", "caption": "fp-caption"}
PAGES = 3
WORDS = [f"w{i}" for i in range(2000)]


def rows_for(sid: str, attempt: str, fail: bool, text_chars: int, rng: random.Random) -> list[dict[str, Any]]:
    from schemas.records import SCHEMA_VERSION

    now = datetime.now(timezone.utc)
    out = []
    for unit in range(PAGES):
        for task in FPS:
            bad = fail and task == "ocr"
            text = " ".join(rng.choices(WORDS, k=text_chars // 5))[:text_chars]
            out.append({"schema_version": SCHEMA_VERSION, "run_id": attempt, "source_uri": f"s3://in/{sid}.pdf",
                        "source_id": sid, "media_type": "pdf", "unit_index": unit, "unit_kind": "page",
                        "tile_index": None, "task": task, "status": "error" if bad else "ok",
                        "error_type": "engine_error" if bad else None, "error_message": "engine died" if bad else None,
                        "text": None if bad else text, "flags": [], "model": "m", "prompt_version": "v1",
                        "fingerprint": FPS[task], "created_at": now})
    return out


def one_run(root: Path, attempt: str, first: int, n: int, args: argparse.Namespace, keys: tuple[str, ...],
            min_rows: int, rng: random.Random) -> float:
    from pipeline import commit, sink, storage
    from pipeline.collect import Complete, SourceWork
    from pipeline.config import StorageConfig
    from pipeline.retry import RetryPolicy

    t0 = time.perf_counter()
    layout = sink.Layout(str(root), StorageConfig(), keys)
    commit.recover(layout)
    commit.discard_staging(layout, keep=attempt)
    sink.check_partitioning(layout)
    index = sink.CommittedIndex.load(layout)
    ids = [f"{i:032x}" for i in range(first, first + n)]
    states = index.lookup(ids)
    pub = commit.Publisher(layout, attempt, attempt, FPS, min_rows_per_file=min_rows)
    todo = []
    for i, sid in zip(range(first, first + n), ids):
        need = sink.tasks_to_do(states.get(sid), FPS, RetryPolicy())
        work = SourceWork(f"s3://in/{sid}.pdf", sid, 100, tuple(need), sink.prior_of(states.get(sid)))
        todo.append(Complete(work, rows_for(sid, attempt, i % 50 == 0, args.text, rng), PAGES))
    for k in range(0, len(todo), args.window):
        pub.publish(todo[k:k + args.window])
    storage.rm(layout.staging(attempt), layout.storage, recursive=True)
    return time.perf_counter() - t0


def scenario(name: str, keys: tuple[str, ...], min_rows: int, args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd
    import pyarrow.parquet as pq

    from pipeline import storage

    written = [0]
    real = storage.write_bytes

    def counting(uri: str, data: bytes, st: Any) -> None:
        written[0] += len(data)
        real(uri, data, st)

    root = Path(tempfile.mkdtemp(prefix=f"cpmv-files-{name}-"))
    rng = random.Random(0)
    storage.write_bytes = counting  # measurement hook: every byte the protocol writes goes through here
    try:
        files_after, publish_s = [], 0.0
        for r in range(args.runs):
            publish_s += one_run(root, f"r{r}", r * args.sources, args.sources, args, keys, min_rows, rng)
            files_after.append(sum(1 for t in ("results", "documents") for _ in (root / t).rglob("*.parquet")))
    finally:
        storage.write_bytes = real
    res = sorted((root / "results").rglob("*.parquet"))
    rows = [pq.read_metadata(p).num_rows for p in res]
    final_bytes = sum(p.stat().st_size for t in ("results", "documents") for p in (root / t).rglob("*.parquet"))
    t0 = time.perf_counter()
    table_rows = len(pd.read_parquet(root / "results"))
    read_s = time.perf_counter() - t0
    shutil.rmtree(root)
    out = {"partition_by": list(keys), "min_rows_per_file": min_rows, "data_files_after_run": files_after,
           "data_files_per_run": round(files_after[-1] / args.runs, 2), "results_files": len(res),
           "results_rows_per_file": {"min": min(rows), "median": statistics.median(rows), "max": max(rows)},
           "bytes_uploaded": written[0], "final_data_bytes": final_bytes,
           "upload_over_final": round(written[0] / final_bytes, 2), "publish_s": round(publish_s, 2),
           "read_results_s": round(read_s, 3), "rows_read": table_rows}
    print(f"{name:24s} files/run {out['data_files_per_run']:7.2f}  results files {len(res):4d}  rows/file median "
          f"{statistics.median(rows):7.0f}  upload/final {out['upload_over_final']:5.2f}  publish {publish_s:6.1f} s  "
          f"read {read_s:5.2f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--sources", type=int, default=400, help="new sources per run")
    p.add_argument("--window", type=int, default=10, help="sources per commit window")
    p.add_argument("--min-rows", type=int, nargs="+", default=[600, 5000],
                   help="min_rows_per_file values to measure (600: ten windows; 5000)")
    p.add_argument("--text", type=int, default=1500, help="characters of text per ok result row")
    args = p.parse_args(argv)
    keys = ("task", "status")
    plan = [("flat", (), 0), ("partitioned", keys, 0)]
    plan += [(f"{base}_min_rows_{m}", k, m) for m in args.min_rows for base, k in (("flat", ()), ("partitioned", keys))]
    runs = {name: scenario(name, k, m, args) for name, k, m in plan}
    ratios = {name: round(r["data_files_per_run"] / runs[name.split("_")[0]]["data_files_per_run"], 4)
              for name, r in runs.items() if r["min_rows_per_file"]}
    result = {"name": NAME, "machine": machine(), "params": vars(args),
              "rows_per_window": args.window * PAGES * len(FPS), "scenarios": runs,
              "files_per_run_over_no_minimum": ratios}
    print(f"wrote {write_result(NAME, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

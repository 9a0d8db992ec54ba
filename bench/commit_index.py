"""commit_index.json: the committed-set lookup of a rerun over 1,000,000 committed sources (issue 14).

- Input: an output prefix holding only `documents/`: `--files` (100) Parquet files of `--rows`
  (10,000) synthetic rows each, DOCUMENTS_SCHEMA (schemas/records.py), one source per row:
  `source_id` as pipeline.sources makes it (hash of URI, size, mtime), `committed` one (ocr,
  fingerprint) entry, `failures` empty except every 100th source (1% `engine_error`, a transient
  type a rerun redoes, and 1% `pdf_corrupt`, a permanent one it keeps), a 200-character `text`. Made
  once in a subprocess and cached under the bench cache.
- Measured in a fresh subprocess, as pipeline/run.py `_plan_work` does it: `sink.CommittedIndex.load`
  of the prefix, then `index.lookup` over the 1,000,000 source ids (in URI order, as discovery sorts
  them) in chunks of `run.LOOKUP_CHUNK` (10,000), `sink.tasks_to_do` per id and, for a source to
  redo, `sink.prior_of` and its SourceWork (what the driver keeps). Also a pass over 1,000,000 ids
  that are not committed (a new corpus on a used prefix).
- Figures: wall seconds of the load and of the lookups, the process's RSS after imports (before
  loading), after loading and after the lookups, its peak (VmHWM, and ru_maxrss as a cross-check),
  the index's Arrow bytes, and the sources it would redo. The measuring subprocess is started by a
  parent that holds no data (Linux carries ru_maxrss across exec).

No wall-clock assertions: the figures are printed and written to bench/results/commit_index.json.
No Ray is started.

    .venv/bin/python -m bench.commit_index [--files 100] [--rows 10000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import CACHE_DIR, machine, write_result

NAME = "commit_index"
FINGERPRINT = "ocr-fp-0123456789abcdef"


def _uri(k: int) -> str:
    return f"s3://corpus/pdfs/{k // 1000:04d}/doc{k:09d}.pdf"


def _size(k: int) -> int:
    return 20_000 + (k * 7919) % 5_000_000


def _sid(k: int) -> str:
    from pipeline.sources import source_id

    return source_id(_uri(k), None, _size(k), "2026-01-01T00:00:00+00:00")


def generate(root: Path, files: int, rows: int) -> None:
    """Write the synthetic documents files (one window each) under root/documents/."""
    from datetime import datetime, timezone

    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas.records import DOCUMENTS_SCHEMA, SCHEMA_VERSION

    (root / "documents").mkdir(parents=True, exist_ok=True)
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    text = ("Synthetic assembled OCR text of one page. " * 5)[:200]
    for f in range(files):
        ks = range(f * rows, (f + 1) * rows)
        fail = [k % 100 == 7 for k in ks]
        perm = [k % 100 == 57 for k in ks]
        attempt = "synthetic-20260101T000000Z-0000"
        cols: dict[str, Any] = {
            "schema_version": [SCHEMA_VERSION] * rows,
            "run_id": [attempt] * rows,
            "source_uri": [_uri(k) for k in ks],
            "source_id": [_sid(k) for k in ks],
            "media_type": ["pdf"] * rows,
            "size_bytes": [_size(k) for k in ks],
            "num_units": [1] * rows,
            "units_ok": [0 if a or b else 1 for a, b in zip(fail, perm)],
            "units_failed": [1 if a or b else 0 for a, b in zip(fail, perm)],
            "results_ok": [0 if a or b else 1 for a, b in zip(fail, perm)],
            "results_failed": [1 if a or b else 0 for a, b in zip(fail, perm)],
            "status": ["error" if a or b else "ok" for a, b in zip(fail, perm)],
            "error_type": ["engine_error" if a else "pdf_corrupt" if b else None for a, b in zip(fail, perm)],
            "error_message": ["synthetic" if a or b else None for a, b in zip(fail, perm)],
            "tasks": [["ocr"]] * rows,
            "fingerprints": [[FINGERPRINT]] * rows,
            "committed": [[{"task": "ocr", "fingerprint": FINGERPRINT}]] * rows,
            "failures": [[{"task": "ocr", "error_type": "engine_error" if a else "pdf_corrupt", "count": 1}]
                         if a or b else [] for a, b in zip(fail, perm)],
            "flags": [[]] * rows,
            "text": [None if a or b else text for a, b in zip(fail, perm)],
            "attempt": [attempt] * rows,
            "created_at": [now] * rows,
        }
        table = pa.Table.from_pydict(cols, schema=DOCUMENTS_SCHEMA)
        pq.write_table(table, root / "documents" / f"{attempt}-w{f + 1:05d}.parquet", compression="zstd")


def _status_kb(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _mb(kb: int | None) -> float | None:
    return round(kb / 1024, 1) if kb is not None else None


def measure(root: Path, n: int) -> dict[str, Any]:
    """In this (fresh) process: load the index, then look every source up as `_plan_work` does."""
    import resource

    from pipeline import sink
    from pipeline.collect import SourceWork
    from pipeline.config import StorageConfig
    from pipeline.retry import RetryPolicy
    from pipeline.run import LOOKUP_CHUNK

    fps = {"ocr": FINGERPRINT}
    retry = RetryPolicy()
    # The ids discovery would hand over, in URI order (made before the baseline: discovery's cost).
    ids = [_sid(k) for k in range(n)]
    new_ids = [_sid(n + k) for k in range(n)]
    rss_before = _status_kb("VmRSS")
    layout = sink.Layout(str(root), StorageConfig())
    t0 = time.perf_counter()
    index = sink.CommittedIndex.load(layout)
    load_s = time.perf_counter() - t0
    rss_loaded = _status_kb("VmRSS")

    def plan(source_ids: list[str]) -> tuple[float, list[float], dict[str, SourceWork]]:
        work: dict[str, SourceWork] = {}
        chunks = []
        t = time.perf_counter()
        for i in range(0, len(source_ids), LOOKUP_CHUNK):
            c0 = time.perf_counter()
            chunk = source_ids[i:i + LOOKUP_CHUNK]
            states = index.lookup(chunk)
            for sid in chunk:
                state = states.get(sid)
                need = sink.tasks_to_do(state, fps, retry)
                if need:
                    work[sid] = SourceWork(f"s3://corpus/{sid}", sid, None, tuple(need), sink.prior_of(state))
            chunks.append(time.perf_counter() - c0)
        return time.perf_counter() - t, chunks, work

    hit_s, hit_chunks, redo = plan(ids)
    rss_after_hits = _status_kb("VmRSS")
    n_redo = len(redo)
    redo_types = sum(1 for w in redo.values() if w.prior is not None)
    del redo
    miss_s, miss_chunks, fresh = plan(new_ids)
    n_fresh = len(fresh)
    del fresh
    return {
        "committed_sources": len(index),
        "index_arrow_mb": round(index.table.nbytes / 2**20, 1),
        "load_s": round(load_s, 3),
        "lookup_all_committed": {"ids": n, "wall_s": round(hit_s, 3), "chunk": LOOKUP_CHUNK,
                                 "chunk_ms_mean": round(1000 * hit_s / len(hit_chunks), 2),
                                 "chunk_ms_max": round(1000 * max(hit_chunks), 2),
                                 "us_per_id": round(1e6 * hit_s / n, 3),
                                 "to_redo": n_redo, "to_redo_with_prior": redo_types},
        "lookup_none_committed": {"ids": n, "wall_s": round(miss_s, 3),
                                  "chunk_ms_mean": round(1000 * miss_s / len(miss_chunks), 2),
                                  "us_per_id": round(1e6 * miss_s / n, 3), "to_do": n_fresh},
        "rss_mb": {"before_load": _mb(rss_before), "after_load": _mb(rss_loaded),
                   "after_lookups": _mb(rss_after_hits), "end": _mb(_status_kb("VmRSS")),
                   "peak_vm_hwm": _mb(_status_kb("VmHWM")),
                   "peak_ru_maxrss": _mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)},
        "load_rss_mb": _mb((rss_loaded or 0) - (rss_before or 0)),
        "load_bytes_per_source": round(1024 * ((rss_loaded or 0) - (rss_before or 0)) / max(1, len(index)), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100, help="documents files (commit windows)")
    ap.add_argument("--rows", type=int, default=10_000, help="sources per file")
    ap.add_argument("--_generate", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n = args.files * args.rows
    if args._generate:
        generate(Path(args._generate), args.files, args.rows)
        return 0
    if args._measure:
        print(json.dumps(measure(Path(args._measure), n)))
        return 0
    root = CACHE_DIR / f"commit-index-{args.files}x{args.rows}"
    t0 = time.perf_counter()
    if not (root / ".complete").is_file():
        subprocess.run([sys.executable, "-m", "bench.commit_index", "--files", str(args.files), "--rows",
                        str(args.rows), "--_generate", str(root)], check=True, cwd=Path(__file__).resolve().parent.parent)
        (root / ".complete").write_text(str(n))
    gen_s = time.perf_counter() - t0
    out = subprocess.run([sys.executable, "-m", "bench.commit_index", "--files", str(args.files), "--rows",
                          str(args.rows), "--_measure", str(root)], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    res = {"files": args.files, "rows_per_file": args.rows,
           "documents_bytes_on_disk_mb": round(sum(p.stat().st_size for p in (root / "documents").glob("*.parquet"))
                                               / 2**20, 1),
           **json.loads(out.stdout.strip().splitlines()[-1]), "generate_s": round(gen_s, 1)}
    res["machine"] = machine()
    path = write_result(NAME, res)
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A driver-level run of the commit protocol, without Ray: the test of every kill point.

`publish_run` does what `pipeline.run` does around the pipeline (take over from dead runs, look
up what is committed, publish the rest in windows) over synthetic sources whose rows are known, so
a test can kill it at any commit step (`CPMV_FAULT_COMMIT`) in a real subprocess, rerun it, and
check what readers see. Run as
`python -m tests.commit_driver ROOT ATTEMPT N_SOURCES FAIL_EVERY [PARTITION_BY [MIN_ROWS_PER_FILE]]`.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone

from pipeline import commit, sink, storage
from pipeline.collect import Complete, SourceWork
from pipeline.config import StorageConfig
from pipeline.retry import RetryPolicy
from schemas.records import SCHEMA_VERSION

FPS = {"ocr": "fp-ocr", "caption": "fp-caption"}
UNITS = 3  # pages per source


def source_id(i: int) -> str:
    return f"{i:032x}"


def rows_for(sid: str, tasks: tuple[str, ...], attempt: str, fail: bool, fps: dict[str, str] = FPS) -> list[dict]:
    """Rows of one source; with `fail`, its ocr rows are transient engine errors."""
    now = datetime.now(timezone.utc)
    out = []
    for unit in range(UNITS):
        for task in tasks:
            bad = fail and task == "ocr"
            out.append({
                "schema_version": SCHEMA_VERSION, "run_id": attempt, "source_uri": f"s3://in/{sid}.pdf",
                "source_id": sid, "media_type": "pdf", "unit_index": unit, "unit_kind": "page", "tile_index": None,
                "task": task, "status": "error" if bad else "ok", "error_type": "engine_error" if bad else None,
                "error_message": "engine died" if bad else None, "text": None if bad else f"{sid}/{unit}/{task}",
                "flags": [], "model": "m", "prompt_version": "v1", "fingerprint": fps[task], "created_at": now,
            })
    return out


def publish_run(root: str, attempt: str, n_sources: int, fail_every: int = 0, window: int = 4,
                store: StorageConfig | None = None, fps: dict[str, str] = FPS, partition_by: tuple[str, ...] = (),
                min_rows_per_file: int = 0, rows_per_file: int = 50_000) -> dict[str, int]:
    """One run over sources 0..n-1: every `fail_every`-th source's ocr fails (transiently)."""
    layout = sink.Layout(root, store or StorageConfig(), tuple(partition_by))
    commit.recover(layout)
    commit.discard_staging(layout, keep=attempt)
    sink.check_partitioning(layout)
    index = sink.CommittedIndex.load(layout)
    ids = [source_id(i) for i in range(n_sources)]
    states = index.lookup(ids)
    todo = []
    for i, sid in enumerate(ids):
        need = sink.tasks_to_do(states.get(sid), fps, RetryPolicy())
        if need:
            work = SourceWork(f"s3://in/{sid}.pdf", sid, 100, tuple(need), sink.prior_of(states.get(sid)))
            fail = bool(fail_every) and i % fail_every == 0
            todo.append(Complete(work, rows_for(sid, work.tasks, attempt, fail, fps), UNITS))
    pub = commit.Publisher(layout, attempt, attempt, fps, min_rows_per_file=min_rows_per_file,
                           rows_per_file=rows_per_file)
    for k in range(0, len(todo), window):
        pub.publish(todo[k:k + window])
    storage.rm(layout.staging(attempt), layout.storage, recursive=True)  # as pipeline.run does at the end
    return {"published": len(todo), "windows": pub.window}


if __name__ == "__main__":
    # optional: PARTITION_BY (comma-separated, `-` for none) MIN_ROWS_PER_FILE
    root, attempt, n, fail_every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    keys = tuple(k for k in (sys.argv[5] if len(sys.argv) > 5 else "-").split(",") if k and k != "-")
    min_rows = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    print(publish_run(root, attempt, n, fail_every, partition_by=keys, min_rows_per_file=min_rows))

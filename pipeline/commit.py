"""Publishing windows of complete sources, exactly once, whatever the crash point.

A window's commit, in order (each step may be the last one before a crash):

1. stage: write the window's `results` and `documents` files, and a rewritten copy of every earlier
   window file that held a source this window re-publishes (that source's rows left out), under
   `_staging/<attempt>/w<N>/`;
2. decide: write the intent `_commits/<stem>.json` listing every file operation (one atomic PUT or
   rename: the commit point);
3. apply: move each staged file to its final name (results first, then documents; rewrites replace
   the old file in place, which is atomic per object on S3 and per rename on local disk), delete old
   files left empty;
4. forget: delete the intent, then the window's staging directory.

Before step 2 nothing is visible and the window is redone by the next run; from step 2 on, any run
rolls the intent forward (`recover`), and every operation is idempotent: a move whose staged file is
gone was done. Between steps 3's operations a reader may briefly see a re-published source twice or
without its documents row; once the commit is applied, every (source_id, unit_index, tile_index,
task) appears exactly once. One run at a time holds the prefix (pipeline/lease.py), so at most one
intent is pending at any time.

Chosen over Delta Lake and Ray Data checkpointing: see the README ("Commits") and the issue note.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.collect import Complete
from pipeline.sink import Layout, document_row, read_table
from schemas.records import DOCUMENTS_SCHEMA, RESULTS_SCHEMA, conform, to_table

log = logging.getLogger(__name__)

#: Test hook: `CPMV_FAULT_COMMIT=<step>` kills the process (os._exit) at that step of the first
#: window's commit, to prove recovery from each kill point. Steps: staged, decided, applied-results,
#: applied, forgotten. Never set in production.
FAULT_ENV = "CPMV_FAULT_COMMIT"
SHOWN = 20


@dataclass
class WindowStats:
    stem: str
    sources: int
    rows: int
    rewritten: int


def _fault(step: str) -> None:
    import os

    if os.environ.get(FAULT_ENV) == step:
        log.error("fault injection: killing the driver at commit step %r", step)
        os._exit(137)


def _parquet_bytes(table: pa.Table, compression: str) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression=None if compression == "none" else compression)
    return buf.getvalue().to_pybytes()


class Publisher:
    """Publishes windows of complete sources for one attempt (see the module docstring)."""

    def __init__(self, layout: Layout, attempt: str, run_id: str, fingerprints: dict[str, str],
                 compression: str = "zstd", with_text: bool = True, max_failed_unit_share: float = 0.1,
                 rows: Any = None):
        """`rows`: the manifest's per-row data (pipeline/rowdata.py RowData): its pass-through columns
        are appended to every results and documents file, so every file of a prefix has one schema."""
        self.layout, self.attempt, self.run_id = layout, attempt, run_id
        self.rows = rows
        extra = rows.fields if rows is not None else []
        self.schemas = {"results": pa.schema([*RESULTS_SCHEMA, *extra], metadata=RESULTS_SCHEMA.metadata),
                        "documents": pa.schema([*DOCUMENTS_SCHEMA, *extra], metadata=DOCUMENTS_SCHEMA.metadata)}
        self.fingerprints = fingerprints
        self.compression, self.with_text = compression, with_text
        self.max_failed_unit_share = max_failed_unit_share  # documents.max_failed_unit_share
        self.window = 0  # windows published
        self._decided: tuple[dict[str, Any], WindowStats, list[dict[str, Any]]] | None = None  # staged, not applied
        self.counts: dict[str, int] = defaultdict(int)  # documents by status, units, results ok/failed
        self.errors: dict[str, int] = defaultdict(int)  # failed result rows by error type
        self.flags: dict[str, int] = defaultdict(int)  # documents by flag (pdf_repaired, ...)
        self.shown: list[dict[str, Any]] = []  # the first SHOWN documents rows (no text), for the summary

    def publish(self, sources: list[Complete]) -> WindowStats | None:
        """Commit one window (nothing when `sources` is empty).

        Safe to call again with the same window after it raised (the store failed): a window staged
        before the failure is not staged again, and a decided one is finished, never decided twice
        (its intent is rewritten with the same content, and every operation is idempotent).
        """
        if not sources:
            return None
        if self._decided is None:
            self._decided = self._stage(sources, self.window + 1)
        intent, stats, doc_rows = self._decided
        # 2. decide
        storage.write_bytes(self.layout.intent(intent["stem"]), json.dumps(intent).encode(), self.layout.storage)
        _fault("decided")
        # 3. apply, 4. forget
        apply(self.layout, intent)
        self._decided = None
        self.window += 1
        for d in doc_rows:
            if len(self.shown) < SHOWN:
                self.shown.append({k: v for k, v in d.items() if k != "text"})
            for f in d["failures"]:
                self.errors[f["error_type"]] += f["count"]
            for flag in d["flags"] or []:
                self.flags[flag] += 1
            self.counts[f"documents_{d['status']}"] += 1
            self.counts["units"] += d["num_units"]
            self.counts["results_ok"] += d["results_ok"]
            self.counts["results_failed"] += d["results_failed"]
        self.counts["windows"] += 1
        return stats

    def _stage(self, sources: list[Complete], window: int) -> tuple[dict[str, Any], WindowStats, list[dict[str, Any]]]:
        """Step 1: write the window's files under staging; return the intent that publishes them."""
        stem = f"{self.attempt}-w{window:05d}"
        st = self.layout.storage
        now = datetime.now(timezone.utc)
        moved, rewrites = self._supersede(sources)
        results_rows: list[dict[str, Any]] = []
        doc_rows = []
        manifest_rows: list[int | None] = []  # per results row: its source's manifest row (pass-through)
        for src in sources:
            mine = moved.get(src.work.source_id, [])
            results_rows.extend(mine)
            results_rows.extend(src.rows)
            manifest_rows.extend([src.work.manifest_row] * (len(mine) + len(src.rows)))
            doc_rows.append(document_row(src, self.fingerprints, self.attempt, self.run_id, now, self.with_text, mine,
                                         self.max_failed_unit_share))
        staged = self.layout.staging(self.attempt, f"w{window:05d}")
        ops: list[list[str]] = []
        files: list[tuple[str, pa.Table | None, str]] = []  # (table, content or None to delete, final uri)
        if results_rows:
            files.append(("results", self._with_rows(to_table(results_rows, RESULTS_SCHEMA), manifest_rows),
                          self.layout.data_file("results", stem)))
        files.extend(r for r in rewrites if r[0] == "results")
        files.append(("documents", self._with_rows(to_table(doc_rows, DOCUMENTS_SCHEMA),
                                                   [s.work.manifest_row for s in sources]),
                      self.layout.data_file("documents", stem)))
        files.extend(r for r in rewrites if r[0] == "documents")
        for i, (table, content, final) in enumerate(files):
            if content is None or content.num_rows == 0:
                ops.append(["delete", final])
                continue
            path = storage.join(staged, f"{i:04d}-{table}.parquet")
            storage.write_bytes(path, _parquet_bytes(content, self.compression), st)
            ops.append(["put", path, final])
        _fault("staged")
        intent = {"version": 1, "attempt": self.attempt, "stem": stem, "staging": staged, "ops": ops,
                  "sources": len(sources), "decided_at": now.isoformat()}
        return intent, WindowStats(stem, len(sources), len(results_rows), len(rewrites)), doc_rows

    def _with_rows(self, table: pa.Table, manifest_rows: list[int | None]) -> pa.Table:
        """`table` with the pass-through columns of its rows' manifest rows appended (pipeline/rowdata.py)."""
        return self.rows.attach(table, manifest_rows) if self.rows is not None else table

    def _supersede(self, sources: list[Complete]) -> tuple[dict[str, list[dict[str, Any]]], list[tuple[str, pa.Table | None, str]]]:
        """For re-published sources: their earlier rows of tasks not redone (moved into this window),
        and the rewritten earlier files without them (None: nothing left, delete)."""
        by_stem: dict[str, dict[str, tuple[str, ...]]] = defaultdict(dict)
        for src in sources:
            if src.work.prior is not None:
                by_stem[src.work.prior.stem][src.work.source_id] = src.work.tasks
        moved: dict[str, list[dict[str, Any]]] = defaultdict(list)
        rewrites: list[tuple[str, pa.Table | None, str]] = []
        st = self.layout.storage
        for old, redo in sorted(by_stem.items()):
            ids = pa.array(sorted(redo), pa.string())
            for table in ("results", "documents"):
                uri = self.layout.data_file(table, old)
                t = read_table(uri, st)
                if t is None:
                    continue
                # Files of an older minor schema version gain the new columns; the pass-through columns
                # of the sources left in the file stay (they are re-attached to the moved rows).
                t = conform(t, self.schemas[table])
                mask = pc.is_in(t.column("source_id"), value_set=ids)
                if table == "results":
                    for row in conform(t.filter(mask), RESULTS_SCHEMA).to_pylist():
                        if row["task"] not in redo[row["source_id"]]:
                            moved[row["source_id"]].append(row)
                rest = t.filter(pc.invert(mask))
                rewrites.append((table, rest if rest.num_rows else None, uri))
        return moved, rewrites


def apply(layout: Layout, intent: dict[str, Any]) -> None:
    """Carry out a decided commit (idempotent: safe to repeat after a crash at any point)."""
    st = layout.storage
    for i, op in enumerate(intent["ops"]):
        if op[0] == "put":
            src, dst = op[1], op[2]
            if storage.exists(src, st):
                storage.move(src, dst, st)
        elif op[0] == "delete":
            storage.rm(op[1], st)
        if i == 0:
            _fault("applied-results")
    _fault("applied")
    storage.rm(layout.intent(intent["stem"]), st)
    _fault("forgotten")
    storage.rm(intent["staging"], st, recursive=True)


def recover(layout: Layout) -> list[str]:
    """Roll forward every decided commit a dead run left (in window order); return their stems."""
    st = layout.storage
    done = []
    for uri in sorted(u for u in storage.list_files(layout.intents(), st) if u.endswith(".json")):
        try:
            intent = json.loads(storage.read_bytes(uri, st, max_bytes=64 * 2**20))
        except FileNotFoundError:
            continue
        log.warning("rolling forward the commit %s left by attempt %s", intent["stem"], intent["attempt"])
        apply(layout, intent)
        done.append(intent["stem"])
    return done


def discard_staging(layout: Layout, keep: str) -> list[str]:
    """Delete the staging directories of every attempt but `keep` (dead runs: call after `recover`)."""
    st = layout.storage
    root = layout.staging_root()
    if not storage.exists(root, st):
        return []
    fs, path = storage.get_fs(root, st)
    gone = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name and name != keep:
            storage.rm(layout.staging(name), st, recursive=True)
            gone.append(name)
    return gone

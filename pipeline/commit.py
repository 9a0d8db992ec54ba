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
from schemas.records import DOCUMENTS_SCHEMA, JSON_PREFIX, conform, results_schema, to_table

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
                 json_columns: dict[str, tuple[pa.DataType, str]] | None = None):
        self.layout, self.attempt, self.run_id = layout, attempt, run_id
        # json_schema tasks: id -> (type, schema) of their `json_<id>` results columns (pipeline/structured.py)
        self.json_columns = json_columns or {}
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
        moved, rewrites, kept = self._supersede(sources)
        results_rows: list[dict[str, Any]] = []
        doc_rows = []
        for src in sources:
            mine = moved.get(src.work.source_id, [])
            results_rows.extend(mine)
            results_rows.extend(src.rows)
            doc_rows.append(document_row(src, self.fingerprints, self.attempt, self.run_id, now, self.with_text, mine,
                                         self.max_failed_unit_share))
        staged = self.layout.staging(self.attempt, f"w{window:05d}")
        ops: list[list[str]] = []
        files: list[tuple[str, pa.Table | None, str]] = []  # (table, content or None to delete, final uri)
        if results_rows:
            from pipeline.structured import fill_json_values

            # This job's json_<id> columns, then those that only rows moved from earlier files have.
            schema = results_schema({**kept, **{name: type_ for name, (type_, _) in self.json_columns.items()}})
            fill_json_values(results_rows, self.json_columns)
            for row in results_rows:
                for name in kept:
                    row.setdefault(JSON_PREFIX + name, None)
            files.append(("results", to_table(results_rows, schema), self.layout.data_file("results", stem)))
        files.extend(r for r in rewrites if r[0] == "results")
        files.append(("documents", to_table(doc_rows, DOCUMENTS_SCHEMA), self.layout.data_file("documents", stem)))
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

    def _supersede(self, sources: list[Complete]) -> tuple[dict[str, list[dict[str, Any]]],
                                                           list[tuple[str, pa.Table | None, str]],
                                                           dict[str, pa.DataType]]:
        """For re-published sources: their earlier rows of tasks not redone (moved into this window),
        the rewritten earlier files without them (None: nothing left, delete), and the `json_<task>`
        columns (task -> type) that moved rows bring and this job does not have. A moved row's
        json value whose type differs from the window's (the task's schema changed) becomes null."""
        by_stem: dict[str, dict[str, tuple[str, ...]]] = defaultdict(dict)
        for src in sources:
            if src.work.prior is not None:
                by_stem[src.work.prior.stem][src.work.source_id] = src.work.tasks
        moved: dict[str, list[dict[str, Any]]] = defaultdict(list)
        rewrites: list[tuple[str, pa.Table | None, str]] = []
        types = {name: type_ for name, (type_, _) in self.json_columns.items()}
        kept: dict[str, pa.DataType] = {}
        st = self.layout.storage
        for old, redo in sorted(by_stem.items()):
            ids = pa.array(sorted(redo), pa.string())
            for table in ("results", "documents"):
                uri = self.layout.data_file(table, old)
                t = read_table(uri, st)
                if t is None:
                    continue
                schema = DOCUMENTS_SCHEMA
                if table == "results":  # its own json_<task> columns stay in the rewritten file
                    schema = results_schema({f.name[len(JSON_PREFIX):]: f.type for f in t.schema
                                             if f.name.startswith(JSON_PREFIX)})
                t = conform(t, schema)  # files of an older minor schema version gain the new columns
                mask = pc.is_in(t.column("source_id"), value_set=ids)
                if table == "results":
                    own = {f.name: f.type for f in schema if f.name.startswith(JSON_PREFIX)}
                    for name, type_ in own.items():
                        kept.setdefault(name[len(JSON_PREFIX):], type_)
                    for row in t.filter(mask).to_pylist():
                        if row["task"] not in redo[row["source_id"]]:
                            for key, type_ in own.items():
                                if types.get(key[len(JSON_PREFIX):], kept[key[len(JSON_PREFIX):]]) != type_:
                                    row[key] = None
                            moved[row["source_id"]].append(row)
                rest = t.filter(pc.invert(mask))
                rewrites.append((table, rest if rest.num_rows else None, uri))
        return moved, rewrites, {name: type_ for name, type_ in kept.items() if name not in types}


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

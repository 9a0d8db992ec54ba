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

Partitioned output (output.partition_by) changes only where files go: a window's file set is one file
per partition and table, all named `<stem>.parquet`, and every put, rewrite and delete above is one
operation per file as before.

Appending (output.min_rows_per_file). Merging published small files into a new big one cannot be
atomic on S3, where there is no multi-object operation: between writing the merged file and deleting
the small ones a plain directory reader (`pd.read_parquet(dir)`, which has no manifest to consult)
would see rows twice, and in the other order it would miss them. So small files are never made in
the first place: a window whose set would be small is written into the open set's files, each
replaced by a staged copy holding its old rows plus the window's (step 3's replace, atomic per
object). A reader sees each file either before or after the window, never a row twice; the open set
is recorded in `_tail.json` by the same intent. The price is rewriting the open files once per
window until they reach min_rows_per_file (bench/file_sizes.py measures it).

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

from pipeline import partitions, storage
from pipeline.collect import Complete
from pipeline.sink import Layout, document_row, read_table, set_files
from schemas.records import DOCUMENTS_SCHEMA, JSON_PREFIX, RESULTS_SCHEMA, TABLES, conform, results_schema, to_table

log = logging.getLogger(__name__)

#: Test hook: `CPMV_FAULT_COMMIT=<step>` kills the process (os._exit) at that step of the first
#: window's commit (`<step>:<N>`: the N-th window's), to prove recovery from each kill point. Steps:
#: staged, decided, applied-results, applied, forgotten. Never set in production.
FAULT_ENV = "CPMV_FAULT_COMMIT"
SHOWN = 20


@dataclass
class WindowStats:
    stem: str
    sources: int
    rows: int
    rewritten: int
    file_set: str = ""  # the stem of the files written (the window's own, or the open set it was appended to)


_reached: dict[str, int] = defaultdict(int)


def _fault(step: str) -> None:
    """`CPMV_FAULT_COMMIT=step` kills at the step's first occurrence (the first window's commit),
    `step:N` at its N-th (the N-th window's: e.g. the first window appended to an open file set)."""
    import os

    want, _, nth = os.environ.get(FAULT_ENV, "").partition(":")
    if want != step:
        return
    _reached[step] += 1
    if _reached[step] == int(nth or 1):
        log.error("fault injection: killing the driver at commit step %r (occurrence %d)", step, _reached[step])
        os._exit(137)


def _parquet_bytes(table: pa.Table, compression: str) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression=None if compression == "none" else compression)
    return buf.getvalue().to_pybytes()


def _append(old: pa.Table, piece: pa.Table) -> pa.Table:
    """An open file's rows and then a window's, as one table: columns either has (a `json_<id>` column
    of an earlier job's task) are kept, nulls where the other has none; where both have a column, the
    window's type wins (a changed json schema: the old values become null if they do not cast)."""
    names = piece.column_names + [n for n in old.column_names if n not in piece.column_names]
    fields = [piece.schema.field(n) if n in piece.column_names else old.schema.field(n) for n in names]
    schema = pa.schema(fields, metadata=piece.schema.metadata)

    def fit(t: pa.Table) -> pa.Table:
        arrays = []
        for f in schema:
            if f.name not in t.column_names:
                arrays.append(pa.nulls(t.num_rows, f.type))
                continue
            try:
                arrays.append(t.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                arrays.append(pa.nulls(t.num_rows, f.type))
        return pa.Table.from_arrays(arrays, schema=schema)

    return pa.concat_tables([fit(old), fit(piece)])


class Publisher:
    """Publishes windows of complete sources for one attempt (see the module docstring).

    With `min_rows_per_file` (output.min_rows_per_file), a window whose file set would be small goes
    into the open set instead (`tail`: the run's last set, or the one `_tail.json` names from an
    earlier run) while that set holds fewer than `min_rows_per_file` result rows and stays within
    `rows_per_file`: each of its files is replaced by a copy with the window's rows appended, one
    atomic put per file (see "Appending" in the module docstring).
    """

    def __init__(self, layout: Layout, attempt: str, run_id: str, fingerprints: dict[str, str],
                 compression: str = "zstd", with_text: bool = True, max_failed_unit_share: float = 0.1,
                 min_rows_per_file: int = 0, rows_per_file: int = 50_000, rows: Any = None,
                 json_columns: dict[str, tuple[pa.DataType, str]] | None = None):
        """`rows`: the manifest's per-row data (pipeline/rowdata.py RowData): its pass-through columns
        are appended to every results and documents file, so every file of a prefix has one schema.
        `json_columns`: json_schema tasks, id -> (type, schema) of their `json_<id>` results columns
        (pipeline/structured.py)."""
        self.layout, self.attempt, self.run_id = layout, attempt, run_id
        self.rows = rows
        self.extra = rows.fields if rows is not None else []  # pass-through fields, after ours
        self.json_columns = json_columns or {}
        self.json_types = {name: type_ for name, (type_, _) in self.json_columns.items()}
        self.fingerprints = fingerprints
        self.compression, self.with_text = compression, with_text
        self.max_failed_unit_share = max_failed_unit_share  # documents.max_failed_unit_share
        self.min_rows, self.max_rows = min_rows_per_file, rows_per_file
        self.window = 0  # windows published
        # staged, not applied: (intent, stats, documents rows, the open file set after it)
        self._decided: tuple[dict[str, Any], WindowStats, list[dict[str, Any]], tuple[str, int] | None] | None = None
        self.tail: tuple[str, int] | None = self._adopt() if min_rows_per_file else None  # (set stem, result rows)
        self.counts: dict[str, int] = defaultdict(int)  # documents by status, units, results ok/failed
        self.errors: dict[str, int] = defaultdict(int)  # failed result rows by error type
        self.flags: dict[str, int] = defaultdict(int)  # documents by flag (pdf_repaired, ...)
        self.shown: list[dict[str, Any]] = []  # the first SHOWN documents rows (no text), for the summary

    def _adopt(self) -> tuple[str, int] | None:
        """The file set an earlier run left open (`_tail.json`, written by its last commit), if any."""
        try:
            marker = json.loads(storage.read_bytes(self.layout.tail_marker(), self.layout.storage, max_bytes=2**16))
            return str(marker["stem"]), int(marker["rows"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as err:  # a damaged marker only costs a new file set
            log.warning("ignoring %s: %s", self.layout.tail_marker(), err)
            return None

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
        intent, stats, doc_rows, tail = self._decided
        # 2. decide
        storage.write_bytes(self.layout.intent(intent["stem"]), json.dumps(intent).encode(), self.layout.storage)
        _fault("decided")
        # 3. apply, 4. forget
        apply(self.layout, intent)
        self._decided = None
        self.window += 1
        self.tail = tail
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

    def _target(self, stem: str, rows: int) -> tuple[str, int]:
        """(the file set this window writes, result rows it holds already): the open set while it is
        under min_rows_per_file and the window fits within rows_per_file, else a new set `stem`."""
        if self.tail is not None and self.tail[1] < self.min_rows and self.tail[1] + rows <= self.max_rows:
            return self.tail
        return stem, 0

    def _stage(self, sources: list[Complete], window: int
               ) -> tuple[dict[str, Any], WindowStats, list[dict[str, Any]], tuple[str, int] | None]:
        """Step 1: write the window's files under staging; return the intent that publishes them."""
        stem = f"{self.attempt}-w{window:05d}"
        st = self.layout.storage
        now = datetime.now(timezone.utc)
        moved, rewrites, kept = self._supersede(sources)
        rewritten = len(rewrites)
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
        target, held = self._target(stem, len(results_rows))
        staged = self.layout.staging(self.attempt, f"w{window:05d}")
        # final uri -> (table, content or None to delete); results first, then documents (readers
        # see a source's results before its documents row, never a documents row without results)
        files: dict[str, tuple[str, pa.Table | None]] = {}
        row_of = {"results": manifest_rows, "documents": [s.work.manifest_row for s in sources]}
        if results_rows:
            from pipeline.structured import fill_json_values

            fill_json_values(results_rows, self.json_columns)
            for row in results_rows:  # json_<id> columns only rows moved from earlier files have
                for name in kept:
                    row.setdefault(JSON_PREFIX + name, None)
        for table, rows in (("results", results_rows), ("documents", doc_rows)):
            schema = self._schema(table, kept)
            fschema = partitions.file_schema(schema, self.layout.keys(table))
            # pass-through columns are attached before the split: every file of the prefix has them
            whole = self._with_rows(to_table(rows, self._schema(table, kept, extra=False)), row_of[table]) if rows else None
            parts = partitions.split(whole, self.layout.keys(table)) if rows else {}
            for part, piece in parts.items():
                uri = self.layout.data_file(table, target, part)
                piece = conform(piece, fschema)
                if target != stem:  # appending: the file as it is now, or as this window rewrites it
                    old = rewrites.pop(uri)[1] if uri in rewrites else read_table(uri, self.layout.storage)
                    if old is not None:
                        piece = _append(old, piece)
                files[uri] = (table, piece)
            files.update((u, r) for u, r in rewrites.items() if r[0] == table)
        ops: list[list[str]] = []
        for i, (final, (table, content)) in enumerate(files.items()):
            if content is None or content.num_rows == 0:
                ops.append(["delete", final])
                continue
            path = storage.join(staged, f"{i:04d}-{table}.parquet")
            storage.write_bytes(path, _parquet_bytes(content, self.compression), st)
            ops.append(["put", path, final])
        tail = None
        if self.min_rows:
            # The open set is part of the commit, so a rolled-forward window also names it.
            tail = (target, held + len(results_rows))
            path = storage.join(staged, "tail.json")
            marker = {"stem": tail[0], "rows": tail[1], "attempt": self.attempt}
            storage.write_bytes(path, json.dumps(marker).encode(), st)
            ops.append(["put", path, self.layout.tail_marker()])
        _fault("staged")
        intent = {"version": 1, "attempt": self.attempt, "stem": stem, "staging": staged, "ops": ops,
                  "sources": len(sources), "decided_at": now.isoformat(), "file_set": target}
        return intent, WindowStats(stem, len(sources), len(results_rows), rewritten, target), doc_rows, tail

    def _with_rows(self, table: pa.Table, manifest_rows: list[int | None]) -> pa.Table:
        """`table` with the pass-through columns of its rows' manifest rows appended (pipeline/rowdata.py)."""
        return self.rows.attach(table, manifest_rows) if self.rows is not None else table

    def _schema(self, table: str, json_types: dict[str, pa.DataType] | None = None, extra: bool = True) -> pa.Schema:
        """A `table` file's whole schema (partition columns included): ours, for results this job's
        `json_<id>` columns and then `json_types`' others (columns only earlier files have), then the
        pass-through ones (unless not `extra`)."""
        base = DOCUMENTS_SCHEMA
        if table == "results":
            base = results_schema({**(json_types or {}), **self.json_types})
        return pa.schema([*base, *(self.extra if extra else [])], metadata=base.metadata)

    def _supersede(self, sources: list[Complete]) -> tuple[dict[str, list[dict[str, Any]]],
                                                           dict[str, tuple[str, pa.Table | None]],
                                                           dict[str, pa.DataType]]:
        """For re-published sources: their earlier rows of tasks not redone (moved into this window),
        the rewritten earlier files without them (final uri -> (table, content; None: nothing left,
        delete); files of an earlier set that hold none of them are left alone), and the
        `json_<task>` columns (task -> type) that moved rows bring and this job does not have. A moved
        row's json value whose type differs from the window's (the task's schema changed) becomes null."""
        by_stem: dict[str, dict[str, tuple[str, ...]]] = defaultdict(dict)
        for src in sources:
            if src.work.prior is not None:
                by_stem[src.work.prior.stem][src.work.source_id] = src.work.tasks
        moved: dict[str, list[dict[str, Any]]] = defaultdict(list)
        rewrites: dict[str, tuple[str, pa.Table | None]] = {}
        kept: dict[str, pa.DataType] = {}
        if not by_stem:
            return moved, rewrites, kept
        for table in ("results", "documents"):
            found = set_files(self.layout, table, set(by_stem))
            for old, redo in sorted(by_stem.items()):
                ids = pa.array(sorted(redo), pa.string())
                for uri in found.get(old, []):
                    t = read_table(uri, self.layout.storage)
                    if t is None:
                        continue
                    # The file's own json_<task> columns stay in it; files of an older minor schema
                    # version gain the new columns; partition columns come back from the path; the
                    # pass-through columns of the sources left in the file stay (they are re-attached
                    # to the moved rows).
                    own = {f.name[len(JSON_PREFIX):]: f.type for f in t.schema
                           if table == "results" and f.name.startswith(JSON_PREFIX)}
                    full = pa.schema([*(results_schema(own) if table == "results" else DOCUMENTS_SCHEMA), *self.extra])
                    t = conform(partitions.restore(t, self.layout.partition_of(table, uri), full), full)
                    mask = pc.is_in(t.column("source_id"), value_set=ids)
                    if not pc.any(mask).as_py():
                        continue
                    if table == "results":
                        for task, type_ in own.items():
                            kept.setdefault(task, type_)
                        for row in conform(t.filter(mask), results_schema(own)).to_pylist():
                            if row["task"] not in redo[row["source_id"]]:
                                for task, type_ in own.items():
                                    if self.json_types.get(task, kept[task]) != type_:
                                        row[JSON_PREFIX + task] = None
                                moved[row["source_id"]].append(row)
                    rest = t.filter(pc.invert(mask))
                    rewrites[uri] = (table, conform(rest, partitions.file_schema(full, self.layout.keys(table)))
                                     if rest.num_rows else None)
        return moved, rewrites, {name: type_ for name, type_ in kept.items() if name not in self.json_types}


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

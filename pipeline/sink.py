"""Output layout, documents rows, and what earlier runs published (the resume lookup).

Layout under the output prefix (the commit protocol that fills it is pipeline/commit.py):

    results/<stem>.parquet        one row per unit and task (schemas.records.RESULTS_SCHEMA)
    documents/<stem>.parquet      one row per source of the same window (DOCUMENTS_SCHEMA)
                                  (with output.partition_by: <table>/<key>=<value>/.../<stem>.parquet,
                                  the keys' columns in the path, not the file: pipeline/partitions.py)
    _tail.json                    with output.min_rows_per_file: the file set later windows append to
    _runs/<attempt>.json          one run record per attempt: config (secrets redacted), counts, status
                                  (`runs/` before; still read: an older run's record is marked there)
    _commits/<stem>.json          a decided commit not yet fully applied (rolled forward by any run)
    _staging/<attempt>/...        work in progress; never read as output
    _lock.json                    the attempt that owns the prefix now (pipeline/lease.py)

`<stem>` is `<attempt>-w<window>`: an attempt id is unique (a job's fixed `run_id` plus the start
time and a random suffix), so no run ever overwrites another's file. A source lives in exactly one
file set (the files named `<stem>.parquet` of both tables, one per partition): when a later run redoes
some of its tasks, its rows move to the new window and the old files are rewritten without it, so
`documents` holds one current row per source. With `output.min_rows_per_file`, a window's rows are
appended to the last file set while it is small (an atomic replace per file: pipeline/commit.py), so
a set holds the sources of several windows, possibly of several runs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import partitions, storage
from pipeline.collect import Complete, Prior, SourceWork
from pipeline.config import ConfigError, StorageConfig
from schemas.records import DOCUMENTS_SCHEMA, SCHEMA_VERSION, conform
from schemas.records import TABLES as SCHEMAS

TABLES = ("results", "documents")


@dataclass(frozen=True)
class Layout:
    """Paths of one output prefix."""

    root: str
    storage: StorageConfig
    partition_by: tuple[str, ...] = ()  # output.partition_by

    def table_dir(self, table: str) -> str:
        return storage.safe_join(self.root, table)

    def keys(self, table: str) -> tuple[str, ...]:
        """The partition keys of `table` (outermost first; none when unpartitioned)."""
        return partitions.table_keys(self.partition_by, table)

    def data_file(self, table: str, stem: str, part: tuple[str, ...] = ()) -> str:
        """The file of set `stem` in `table`'s partition `part` (its key values, in `keys(table)` order)."""
        sub = partitions.part_path(self.keys(table), part)
        return storage.safe_join(self.root, f"{table}/{sub}/{stem}.parquet" if sub else f"{table}/{stem}.parquet")

    def file_schema(self, table: str) -> pa.Schema:
        """What a file of `table` holds: its schema without the partition columns."""
        return partitions.file_schema(SCHEMAS[table], self.keys(table))

    def partition_of(self, table: str, uri: str) -> dict[str, str]:
        """The partition values in the path of one of `table`'s files."""
        return partitions.parse(self.rel_dirs(table, uri))

    def rel_dirs(self, table: str, uri: str) -> list[str]:
        """The directory names between `table`'s directory and one of its files (listings give
        canonical URIs, absolute local paths; `data_file` gives the root as configured)."""
        base = self.table_dir(table)
        if not uri.startswith(base.rstrip("/") + "/"):
            fs, path = storage.get_fs(base, self.storage)
            base = storage.to_uri(fs, path)
        if not uri.startswith(base.rstrip("/") + "/"):
            raise ValueError(f"{storage.redact(uri)} is not under {storage.redact(base)}")
        return uri[len(base.rstrip("/")) + 1:].split("/")[:-1]

    def tail_marker(self) -> str:
        return storage.safe_join(self.root, "_tail.json")

    def staging(self, attempt: str, rel: str = "") -> str:
        return storage.safe_join(self.root, f"_staging/{attempt}/{rel}".rstrip("/"))

    def staging_root(self) -> str:
        return storage.safe_join(self.root, "_staging")

    def intents(self) -> str:
        return storage.safe_join(self.root, "_commits")

    def intent(self, stem: str) -> str:
        return storage.safe_join(self.root, f"_commits/{stem}.json")

    def run_record(self, attempt: str) -> str:
        # `_`-prefixed: pyarrow, pandas, DuckDB and Spark skip such names, so JSON beside the tables
        # never breaks a reader pointed at the output root.
        return storage.safe_join(self.root, f"_runs/{attempt}.json")

    def legacy_run_record(self, attempt: str) -> str:
        """Where runs before `_runs/` wrote their record (read when taking over from them)."""
        return storage.safe_join(self.root, f"runs/{attempt}.json")

    def lock(self) -> str:
        return storage.safe_join(self.root, "_lock.json")


def parquet_files(uri: str, st: StorageConfig) -> list[str]:
    """Every Parquet file under `uri`, partition directories included (sorted; none when it does not exist)."""
    return sorted(u for u in storage.list_files(uri, st) if u.endswith(".parquet"))


def read_table(uri: str, st: StorageConfig, columns: list[str] | None = None) -> pa.Table | None:
    """One Parquet file, or None when it does not exist."""
    fs, path = storage.pyarrow_fs(uri, st)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except FileNotFoundError:
        return None


def stem_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")


def read_rows(layout: Layout, table: str, uri: str, schema: pa.Schema | None = None) -> pa.Table | None:
    """One data file as the table's full schema, or `schema` (ours plus a job's pass-through columns)
    when given: partition columns restored from its path, columns of a newer minor schema version as
    nulls. None when it does not exist."""
    t = read_table(uri, layout.storage)
    if t is None:
        return None
    schema = schema or SCHEMAS[table]
    return conform(partitions.restore(t, layout.partition_of(table, uri), schema), schema)


def set_files(layout: Layout, table: str, stems: set[str]) -> dict[str, list[str]]:
    """The files of each file set in `stems` (unpartitioned: the one path, which may not exist;
    partitioned: found by one listing of the table directory)."""
    if not layout.keys(table):
        return {s: [layout.data_file(table, s)] for s in stems}
    out: dict[str, list[str]] = defaultdict(list)
    for uri in parquet_files(layout.table_dir(table), layout.storage):
        if (s := stem_of(uri)) in stems:
            out[s].append(uri)
    return out


def check_partitioning(layout: Layout) -> None:
    """ConfigError when files already under the prefix use other partition keys than the job's: a
    table whose files sit at different depths or keys is not one table to a reader (pyarrow's hive
    discovery fails or gives nulls), so a prefix keeps the partitioning it was first written with."""
    for table in ("results", "documents"):
        want = layout.keys(table)
        base = layout.table_dir(table)
        for uri in parquet_files(base, layout.storage):
            have = tuple(d.partition("=")[0] for d in layout.rel_dirs(table, uri))
            if have != want:
                raise ConfigError(
                    f"output.partition_by {list(layout.partition_by)} does not match the files already in "
                    f"{storage.redact(base)} (partitioned by {list(have)}, e.g. {storage.redact(uri)}): keep the "
                    f"prefix's partitioning or write to a new output.uri")


# ---------------------------------------------------------------------------------------------
# What is committed


class CommittedIndex:
    """source_id -> (window stem, committed (task, fingerprint), failures), from the documents table.

    Read once per run, column by column: ~100 bytes per committed source in Arrow memory, looked up
    in chunks (`lookup`), so a million committed sources never become a million Python objects.
    """

    def __init__(self, table: pa.Table):
        import numpy as np

        self.table = table  # source_id, stem, committed, failures, fingerprints
        # Sorted ids, built once: a hash set rebuilt per chunk (pc.index_in's value_set) made each
        # chunk cost O(committed), ~250 ms per 10k ids against 1M (bench/commit_index.py).
        # Fixed-width bytes (source ids are ASCII hex): 32 bytes an id, where numpy's str is UCS-4.
        ids = np.asarray(table.column("source_id").to_pylist(), dtype="S")
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]
        del ids

    @classmethod
    def load(cls, layout: Layout) -> "CommittedIndex":
        schema = pa.schema([pa.field("source_id", pa.string()), DOCUMENTS_SCHEMA.field("committed"),
                            DOCUMENTS_SCHEMA.field("failures"), DOCUMENTS_SCHEMA.field("fingerprints")])
        parts = []
        for uri in parquet_files(layout.table_dir("documents"), layout.storage):
            fs, path = storage.pyarrow_fs(uri, layout.storage)
            names = pq.read_schema(path, filesystem=fs).names
            # Files of schema 1.1 have no `committed`/`failures`: read what is there, nulls for the rest.
            t = read_table(uri, layout.storage, [n for n in schema.names if n in names])
            if t is None or not t.num_rows:
                continue
            t = pa.table({f.name: t.column(f.name).cast(f.type) if f.name in t.column_names
                          else pa.nulls(t.num_rows, f.type) for f in schema})
            parts.append(t.append_column("stem", pa.array([stem_of(uri)] * t.num_rows, pa.string())
                                         .dictionary_encode()))
        if not parts:
            empty = schema.append(pa.field("stem", pa.dictionary(pa.int32(), pa.string())))
            return cls(empty.empty_table())
        return cls(pa.concat_tables(parts, promote_options="permissive").combine_chunks())

    def __len__(self) -> int:
        return self.table.num_rows

    def lookup(self, source_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The committed state of those of `source_ids` that have one (pass chunks of ~10k)."""
        if not source_ids or not self.table.num_rows:
            return {}
        import numpy as np

        query = np.asarray(source_ids, dtype="S")
        at = np.searchsorted(self._sorted, query)
        at[at == len(self._sorted)] = 0
        found = self._sorted[at] == query
        if not found.any():
            return {}
        rows = self.table.take(pa.array(self._order[at[found]], pa.int64())).to_pylist()
        return {sid.decode(): row for sid, row in zip(query[found].tolist(), rows)}


def with_legacy_commitments(state: dict[str, Any] | None, fingerprints: dict[str, str]) -> dict[str, Any] | None:
    """A state read from a schema-1.1 documents row (fingerprints without their tasks), with the
    `committed` entries this job's fingerprints give it; newer states pass through unchanged."""
    if state is None or state.get("committed") is not None:
        return state
    have = set(state.get("fingerprints") or [])
    return {**state, "committed": [{"task": t, "fingerprint": fp} for t, fp in fingerprints.items() if fp in have]}


def tasks_to_do(state: dict[str, Any] | None, fingerprints: dict[str, str], retries) -> list[str]:
    """The tasks a source needs from this run: those not committed at this fingerprint, and those
    whose committed rows hold an error type `retries` (a RetryPolicy) says to redo."""
    if state is None:
        return list(fingerprints)
    state = with_legacy_commitments(state, fingerprints)
    committed = {(c["task"], c["fingerprint"]) for c in state["committed"] or []}
    failed = {f["task"] for f in state["failures"] or [] if retries.retries(f["error_type"])}
    return [t for t, fp in fingerprints.items() if (t, fp) not in committed or t in failed]


def prior_of(state: dict[str, Any] | None) -> Prior | None:
    if state is None:
        return None
    return Prior(str(state["stem"]), tuple((c["task"], c["fingerprint"]) for c in state["committed"] or []))


# ---------------------------------------------------------------------------------------------
# Documents rows


def document_row(src: Complete, fingerprints: dict[str, str], attempt: str, run_id: str, now: datetime,
                 with_text: bool, moved: list[dict[str, Any]] = (), max_failed_unit_share: float = 0.1) -> dict[str, Any]:
    """The documents row of a published source, from all of its result rows (this run's and the
    rows of tasks it did not redo, `moved` from its earlier window).

    Status (documents.max_failed_unit_share, the olmOCR rule of a maximum failed-page rate): `error`
    when no result is ok or more than `max_failed_unit_share` of its units failed (a unit failed
    when any of its tasks did), `partial` when fewer failed, `ok` when none did. Flags such as
    `pdf_repaired` on a document whose rows are all ok stay flags: the status is `ok`.

    A complete source commits the fingerprints of every task this run did for it, including tasks
    that do not apply to it (so a rerun does not retry them). A source with no rows at all is an
    `error` row of type `lost`; one with rows missing is `lost_units`; neither commits the tasks of
    this run, so the next run redoes them.
    """
    w = src.work
    fingerprints = w.fingerprints(fingerprints)  # a per-row prompt makes them this source's own
    base = {"schema_version": SCHEMA_VERSION, "run_id": run_id, "attempt": attempt, "source_uri": w.uri,
            "source_id": w.source_id, "size_bytes": w.size, "created_at": now}
    kept = {t: fp for t, fp in (w.prior.committed if w.prior else ()) if t not in w.tasks}
    if src.complete:
        kept.update({t: fingerprints[t] for t in w.tasks})
    committed = [{"task": t, "fingerprint": fp} for t, fp in sorted(kept.items())]
    rows = [*moved, *src.rows]
    if not rows:
        return {**base, "num_units": 0, "units_ok": 0, "units_failed": 0, "results_ok": 0, "results_failed": 0,
                "status": "error", "error_type": "lost",
                "error_message": "no result rows came back for this source (a stage crashed or the run stopped); "
                "the next run redoes it", "tasks": [], "fingerprints": sorted(kept.values()),
                "committed": committed, "failures": [{"task": t, "error_type": "lost", "count": 1} for t in w.tasks],
                "flags": []}
    d = _aggregate(rows)
    c = d["counts"]
    units_failed = sum(1 for s in d["units"].values() if "error" in s)
    units_ok = sum(1 for s in d["units"].values() if all(x == "ok" for x in s))
    etype, emsg = d["error"] or (None, None)
    if c["error"] == 0:
        status = "skipped" if c["ok"] == 0 else "ok"
    else:
        share = units_failed / len(d["units"]) if d["units"] else 0.0
        status = "error" if c["ok"] == 0 or share > max_failed_unit_share else "partial"
        if c["ok"] and status == "error":
            emsg = (f"{units_failed} of {len(d['units'])} units failed ({share:.0%}, above "
                    f"documents.max_failed_unit_share {max_failed_unit_share:g}); first: {emsg}")
    text = None
    if with_text and d["media_type"] in ("pdf", "document") and d["texts"]:
        text = "\n\n".join(d["texts"][i] for i in sorted(d["texts"]))
    flags = set(d["flags"])
    failures = [{"task": t, "error_type": e, "count": n} for (t, e), n in sorted(d["failures"].items())]
    if not src.complete:
        flags.add("lost_units")
        failures += [{"task": t, "error_type": "lost_units", "count": 1} for t in w.tasks]
        status = "partial" if c["ok"] else "error"
        etype, emsg = "lost_units", ("some units of this source never came back from the pipeline; "
                                     "the next run redoes its tasks")
    elif status == "ok" and flags & _SKIPPED_FRAMES:
        # Pages of a multi-page image left out (a policy or image.max_frames): never silently ok.
        status, etype = "partial", "frames_skipped"
        emsg = (f"some frames (pages) of the file were not expanded ({', '.join(sorted(flags & _SKIPPED_FRAMES))}; "
                "see image.multi_frame and image.max_frames)")
    # A repaired PDF whose rows are all ok stays `ok` with its `pdf_repaired` flag (pages may be missing
    # or blank): the run summary lists it under flags, not among errors.
    return {**base, "media_type": d["media_type"], "num_units": len(d["units"]), "units_ok": units_ok,
            "units_failed": units_failed, "results_ok": c["ok"], "results_failed": c["error"], "status": status,
            "error_type": etype, "error_message": emsg, "tasks": sorted(d["tasks"]),
            "fingerprints": sorted(kept.values()), "committed": committed, "failures": failures,
            "flags": sorted(flags), "text": text, "content_hash": next((r.get("content_hash") for r in rows
                                                                        if r.get("content_hash")), None),
            "dedup_of": next((r.get("dedup_of") for r in rows if r.get("dedup_of")), None)}


# Unit flags saying frames of the source were left out (pipeline/media/image.py SKIPPED_FRAME_FLAGS;
# kept here as strings so that the sink does not import the image decoders).
_SKIPPED_FRAMES = frozenset({"multi_frame_first_only", "multi_frame_capped"})


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {"units": defaultdict(list), "tasks": set(), "flags": set(), "media_type": None,
                         "error": None, "texts": {}, "counts": defaultdict(int), "failures": defaultdict(int)}
    for r in rows:
        d["media_type"] = d["media_type"] or r["media_type"]
        d["counts"][r["status"]] += 1
        d["tasks"].add(r["task"])
        d["flags"].update(r["flags"] or [])
        if r["unit_index"] >= 0:
            d["units"][r["unit_index"]].append(r["status"])
        if r["status"] == "error":
            d["failures"][(r["task"], r["error_type"] or "unknown")] += 1
            if d["error"] is None:
                d["error"] = (r["error_type"], r["error_message"])
        if r["task"] == "ocr" and r["status"] == "ok" and r["unit_index"] >= 0:
            # tiles of a page follow each other in reading order (tile_index null: an untiled page)
            d["texts"][(r["unit_index"], r["tile_index"] if r["tile_index"] is not None else -1)] = r["text"] or ""
    return d


def lost(work: SourceWork) -> Complete:
    """A source of this run whose rows never came back (published as a `lost` documents row)."""
    return Complete(work, [], 0, complete=False)

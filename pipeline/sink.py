"""Writing and committing outputs, and reading what earlier runs committed (resume).

Layout under the output prefix:

    results/<run_id>-<task>.parquet     one row per unit and task (schemas.records.RESULTS_SCHEMA)
    documents/<run_id>.parquet          one row per source (DOCUMENTS_SCHEMA); the commit marker
    runs/<run_id>.json                  the run record: config (secrets redacted), versions, counts
    _staging/<run_id>/...               work in progress; never read as output

Ray Data writes results into staging; only after the whole plan finished does the driver build the
documents rows from them, move the result files into `results/`, then write `documents/` and
finally `runs/`. A reader of `results/` never sees a file of a run that is still going, and a
rerun skips exactly the sources that have a `documents` row for the same task fingerprints.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import StorageConfig
from schemas.records import DOCUMENTS_SCHEMA, SCHEMA_VERSION, to_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Paths of one output prefix."""

    root: str
    storage: StorageConfig

    def table_dir(self, table: str) -> str:
        return storage.safe_join(self.root, table)

    def staging(self, run_id: str, table: str = "") -> str:
        return storage.safe_join(self.root, f"_staging/{run_id}/{table}".rstrip("/"))

    def run_record(self, run_id: str) -> str:
        return storage.safe_join(self.root, f"runs/{run_id}.json")


def _parquet_files(uri: str, st: StorageConfig) -> list[str]:
    if not storage.exists(uri, st):
        return []
    return sorted(u for u in storage.list_files(uri, st) if u.endswith(".parquet"))


def _read(uris: list[str], st: StorageConfig, columns: list[str]) -> pa.Table | None:
    tables = []
    for uri in uris:
        fs, path = storage.pyarrow_fs(uri, st)
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(tables, promote_options="default") if tables else None


def committed(layout: Layout) -> dict[str, set[str]]:
    """source_id -> task fingerprints committed by earlier runs (from the documents table)."""
    table = _read(_parquet_files(layout.table_dir("documents"), layout.storage), layout.storage,
                  ["source_id", "fingerprints"])
    done: dict[str, set[str]] = defaultdict(set)
    if table is not None:
        for sid, fps in zip(table.column("source_id").to_pylist(), table.column("fingerprints").to_pylist()):
            done[sid].update(fps or [])
    return done


def write_results(ds: Any, layout: Layout, run_id: str, rows_per_file: int, compression: str,
                  ray_remote_args: dict[str, Any]) -> None:
    """Stream the results dataset into staging as Parquet with deterministic file names."""
    from ray.data import SaveMode
    from ray.data.datasource import FilenameProvider

    class RunFiles(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{run_id}-{task_index:06d}.parquet"

    fs, path = storage.pyarrow_fs(layout.staging(run_id, "results"), layout.storage)
    ds.write_parquet(
        path, filesystem=fs, filename_provider=RunFiles(), max_rows_per_file=rows_per_file,
        compression=None if compression == "none" else compression, ray_remote_args=ray_remote_args,
        # The staging dir belongs to this run alone, so overwrite mode is safe; it is also what lets
        # file names be deterministic (Ray otherwise demands its random write id in every name).
        mode=SaveMode.OVERWRITE,
    )


_DOC_COLUMNS = ["source_uri", "source_id", "media_type", "unit_index", "tile_index", "task", "status",
                "error_type", "error_message", "flags", "fingerprint", "text"]


def build_documents(layout: Layout, run_id: str, sources: list[dict[str, Any]], fingerprints: dict[str, str],
                    with_text: bool) -> pa.Table:
    """One documents row per source of this run, aggregated from the staged results.

    `fingerprints` maps task -> fingerprint; a row commits the fingerprints of every task the run
    handled for its source, including tasks that do not apply to it (so a rerun does not retry them).
    A source that produced no result rows at all still gets a row (status `error`, type `lost`) and
    commits nothing: nothing disappears silently, and the next run retries it.
    """
    files = _parquet_files(layout.staging(run_id, "results"), layout.storage)
    table = _read(files, layout.storage, _DOC_COLUMNS)
    acc: dict[str, dict[str, Any]] = {}
    if table is not None:
        for r in table.to_pylist():
            _accumulate(acc.setdefault(r["source_id"], _empty_doc()), r)
    now = datetime.now(timezone.utc)
    rows = [_doc_row(src, acc.get(src["source_id"]), run_id, now, with_text) for src in sources]
    for row, src in zip(rows, sources):
        if row["error_type"] != "lost":
            row["fingerprints"] = sorted({fingerprints[t] for t in src["tasks"]} | set(row["fingerprints"]))
    return to_table(rows, DOCUMENTS_SCHEMA)


def _empty_doc() -> dict[str, Any]:
    return {"units": defaultdict(list), "tasks": set(), "fps": set(), "flags": set(), "media_type": None,
            "error": None, "texts": {}, "counts": defaultdict(int)}


def _accumulate(d: dict[str, Any], r: dict[str, Any]) -> None:
    d["media_type"] = d["media_type"] or r["media_type"]
    d["counts"][r["status"]] += 1
    d["tasks"].add(r["task"])
    d["fps"].add(r["fingerprint"])
    d["flags"].update(r["flags"] or [])
    if r["unit_index"] >= 0:
        d["units"][r["unit_index"]].append(r["status"])
    if r["status"] == "error" and d["error"] is None:
        d["error"] = (r["error_type"], r["error_message"])
    if r["task"] == "ocr" and r["status"] == "ok" and r["unit_index"] >= 0:
        # tiles of a page follow each other in reading order (tile_index null: an untiled page)
        d["texts"][(r["unit_index"], r["tile_index"] if r["tile_index"] is not None else -1)] = r["text"] or ""


def _doc_row(src: dict[str, Any], d: dict[str, Any] | None, run_id: str, now: datetime, with_text: bool) -> dict[str, Any]:
    base = {"schema_version": SCHEMA_VERSION, "run_id": run_id, "source_uri": src["source_uri"],
            "source_id": src["source_id"], "size_bytes": src.get("size"), "created_at": now}
    if d is None:
        return {**base, "num_units": 0, "units_ok": 0, "units_failed": 0, "results_ok": 0, "results_failed": 0,
                "status": "error", "error_type": "lost",
                "error_message": "no result rows were produced for this source (a stage crashed); rerun the job",
                "tasks": [], "fingerprints": [], "flags": []}
    c = d["counts"]
    units_failed = sum(1 for s in d["units"].values() if "error" in s)
    units_ok = sum(1 for s in d["units"].values() if all(x == "ok" for x in s))
    if c["error"] == 0:
        status = "skipped" if c["ok"] == 0 else "ok"
    else:
        status = "error" if c["ok"] == 0 else "partial"
    text = None
    if with_text and d["media_type"] == "pdf" and d["texts"]:
        text = "\n\n".join(d["texts"][i] for i in sorted(d["texts"]))
    etype, emsg = d["error"] or (None, None)
    if status == "ok" and "pdf_repaired" in d["flags"]:
        # A damaged PDF opens "repaired" and renders without errors, with pages missing or blank:
        # calling it ok would be a silent loss (DESIGN.md section 6).
        status, etype = "partial", "pdf_repaired"
        emsg = "the PDF was damaged and repaired on open; pages may be missing or blank (see units' flags)"
    return {**base, "media_type": d["media_type"], "num_units": len(d["units"]), "units_ok": units_ok,
            "units_failed": units_failed, "results_ok": c["ok"], "results_failed": c["error"], "status": status,
            "error_type": etype, "error_message": emsg, "tasks": sorted(d["tasks"]),
            "fingerprints": sorted(d["fps"]), "flags": sorted(d["flags"]), "text": text}


def commit(layout: Layout, run_id: str, documents: pa.Table, record: dict[str, Any]) -> list[str]:
    """Publish a run: move result files, then write documents (the resume marker), then the run record."""
    st = layout.storage
    final = []
    for uri in _parquet_files(layout.staging(run_id, "results"), st):
        dst = storage.safe_join(layout.table_dir("results"), uri.rstrip("/").rsplit("/", 1)[-1])
        storage.move(uri, dst, st)
        final.append(dst)
    if documents.num_rows:
        buf = pa.BufferOutputStream()
        pq.write_table(documents, buf, compression="zstd")
        storage.write_bytes(storage.safe_join(layout.table_dir("documents"), f"{run_id}.parquet"),
                            buf.getvalue().to_pybytes(), st)
    storage.write_bytes(layout.run_record(run_id), json.dumps(record, indent=2, default=str).encode(), st)
    if storage.exists(layout.staging(run_id), st):
        storage.rm(layout.staging(run_id), st, recursive=True)
    return final

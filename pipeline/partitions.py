"""Hive-style partition directories of the output tables (`output.partition_by`).

A partitioned file lives at `<table>/<k1>=<v1>/<k2>=<v2>/<stem>.parquet`. Every row in it has those
values, and the partition columns are left out of the file, as Spark and pyarrow's `write_dataset`
write them: readers add them back from the path (pyarrow and pandas by hive discovery, DuckDB with
`hive_partitioning`, Spark by partition discovery). Measured with pyarrow 26 / pandas 3.1:
- a column both in the file and in the path breaks `pd.read_parquet(dir)` ("Unable to merge: Field
  task has incompatible types: string vs dictionary");
- a null partition (`__HIVE_DEFAULT_PARTITION__`) breaks it too ("Cannot yet unify dictionaries with
  nulls"), so a null value is written as `unknown` (the only nullable key is `media_type`, whose
  schema already uses `unknown`).

`date` is not a column of the files: it is the UTC day (YYYY-MM-DD) of `created_at`, which the rows
keep, so it only adds a directory level and a column for readers.
"""

from __future__ import annotations

from collections import defaultdict
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.compute as pc

#: Keys each table may be partitioned by (config.PartitionKey lists them all): documents rows have
#: no `task` (one row per source, over all its tasks).
KEYS: dict[str, tuple[str, ...]] = {
    "results": ("task", "status", "media_type", "run_id", "date"),
    "documents": ("status", "media_type", "run_id", "date"),
}
NULL = "unknown"
DERIVED = frozenset({"date"})  # computed from created_at; never a column of the files


def table_keys(partition_by: tuple[str, ...] | list[str], table: str) -> tuple[str, ...]:
    """The keys of `partition_by` that apply to `table`, in the job's order (outermost first)."""
    return tuple(k for k in partition_by if k in KEYS[table])


def part_path(keys: tuple[str, ...], values: tuple[str, ...]) -> str:
    """`k1=v1/k2=v2` (empty without keys). Values are percent-encoded, so no value can add a path
    segment (`/`, `..`); the values written today (task and status names, media types, run ids
    checked as safe segments, dates) need no encoding."""
    return "/".join(f"{k}={quote(v, safe='')}" for k, v in zip(keys, values, strict=True))


def parse(rel_dirs: list[str]) -> dict[str, str]:
    """`{key: value}` of the `key=value` directory names between a table directory and a file."""
    out = {}
    for seg in rel_dirs:
        key, sep, value = seg.partition("=")
        if sep:
            out[key] = unquote(value)
    return out


def _values(table: pa.Table, key: str) -> list[str]:
    if key == "date":
        return pc.strftime(table.column("created_at"), format="%Y-%m-%d").to_pylist()
    return pc.fill_null(table.column(key).cast(pa.string()), NULL).to_pylist()


def split(table: pa.Table, keys: tuple[str, ...]) -> dict[tuple[str, ...], pa.Table]:
    """Rows of `table` by partition values, each part without its partition columns (sorted by values)."""
    if not keys:
        return {(): table}
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, vals in enumerate(zip(*(_values(table, k) for k in keys))):
        groups[vals].append(i)
    drop = [k for k in keys if k not in DERIVED]
    return {vals: table.take(pa.array(idx, pa.int64())).drop_columns(drop) for vals, idx in sorted(groups.items())}


def file_schema(schema: pa.Schema, keys: tuple[str, ...]) -> pa.Schema:
    """The schema of a file: the table's schema without its partition columns (metadata kept)."""
    return pa.schema([f for f in schema if f.name not in keys or f.name in DERIVED], metadata=schema.metadata)


def restore(table: pa.Table, values: dict[str, str], schema: pa.Schema) -> pa.Table:
    """A file's rows with the partition columns of its path added back (as the table's type), so that
    the pipeline reads its own files as the full schema (`schemas.records.conform` does the rest)."""
    for key, value in values.items():
        if key in DERIVED or key not in schema.names or key in table.column_names:
            continue
        table = table.append_column(key, pa.array([value] * table.num_rows, schema.field(key).type))
    return table


def describe() -> dict[str, object]:
    """The output layout, for `cpmv schema --output` (pipeline/sink.py has the whole list)."""
    return {
        "tables": "results/ and documents/ under the output root: read one table directory at a time, e.g. "
                  "pd.read_parquet('OUT/results'), duckdb read_parquet('OUT/results/**/*.parquet', "
                  "hive_partitioning=true), spark.read.parquet('s3a://bucket/OUT/results')",
        "file": "<table>/[<key>=<value>/...]<stem>.parquet; names starting with _ (run records, commits, staging, "
                "_tail.json) are not tables and Parquet readers skip them",
        "partition_keys": {t: list(k) for t, k in KEYS.items()},
        "partition_columns": "with output.partition_by, left out of the files and read from the directory names "
                             f"(hive partitioning); a null value is '{NULL}'; date is the UTC day of created_at",
        "file_sets": "the files of one <stem> hold whole sources; with output.min_rows_per_file, commit windows "
                     "are appended to the open set until it holds that many result rows",
    }

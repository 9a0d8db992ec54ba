"""Versioned pyarrow schemas of the output tables: `results`, `documents` (and the run record).

Every writer casts to these schemas, so all files of a table share one schema whatever a batch held
(an all-error batch must not produce a `null`-typed column that breaks readers). Bump
SCHEMA_VERSION when a column changes meaning or type; adding a nullable column is a minor bump.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "1.2"  # 1.1: tile_index, num_tiles, text_layer_quality; 1.2: documents.committed, failures, attempt

STATUS_OK = "ok"
STATUS_ERROR = "error"
#: Document status when some but not all of its units failed.
STATUS_PARTIAL = "partial"

#: Tables parsed from a reply: per table its column count and its rows of cells, header rows marked.
TABLES_TYPE = pa.list_(pa.struct([
    pa.field("columns", pa.int32()),
    pa.field("rows", pa.list_(pa.struct([pa.field("header", pa.bool_()), pa.field("cells", pa.list_(pa.string()))]))),
]))

#: Labels are few distinct strings: dictionary-encoded (pandas reads them as a categorical column).
LABEL_TYPE = pa.dictionary(pa.int32(), pa.string())

RESULTS_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("media_type", pa.string()),  # pdf | document | image | video | audio | unknown
        pa.field("unit_index", pa.int32(), nullable=False),  # -1: the source failed before any unit existed
        pa.field("unit_kind", pa.string(), nullable=False),  # page | image | clip | source
        pa.field("tile_index", pa.int32()),  # reading-order tile of an oversized unit; null when not tiled
        pa.field("num_tiles", pa.int32()),
        pa.field("task", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | error | skipped (no task applies to the unit)
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("text", pa.string()),  # OCR text, markdown table or caption
        pa.field("output_source", pa.string()),  # model | text_layer | text_layer_fallback (pipeline/checks.py)
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("width", pa.int32()),  # size of the image handed to the model
        pa.field("height", pa.int32()),
        pa.field("num_frames", pa.int32()),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("text_layer_chars", pa.int32()),
        pa.field("text_layer_quality", pa.float32()),  # fraction of printable characters in the text layer
        pa.field("flags", pa.list_(pa.string())),
        pa.field("preprocess_ms", pa.float64()),  # this unit's expansion (render, decode, resize), ms
        # this unit's share of engine time: its engine call's wall time / the units in the call (a
        # batched call cannot time units apart; vLLM streaming: latency_ms / batch_units). Null: no engine
        pa.field("infer_ms", pa.float64()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("model_family", pa.string()),
        pa.field("engine", pa.string()),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),  # task+model+prompt+params: the resume key
        pa.field("created_at", pa.timestamp("ms", tz="UTC"), nullable=False),
        # Reply checks (pipeline/checks.py): engine calls made for this row (1 = first reply passed;
        # null: no model reply, e.g. text_layer rows) and the failed check of every failed attempt.
        pa.field("attempts", pa.int32()),
        pa.field("retry_reasons", pa.list_(pa.string())),
        pa.field("tables", TABLES_TYPE),  # tables of `table` and `ocr` replies as data (pipeline/tables.py)
        pa.field("latency_ms", pa.float64()),  # from handing the unit to the engine to its reply (a batch: the call)
        pa.field("batch_units", pa.int32()),  # requests handed to the engine together with this one
        # Per-row prompt (input.prompt_column): the prompt text the engine was given, hint included; null when
        # the task's own prompt was used (prompt_version names it then).
        pa.field("prompt", pa.string()),
        # input.dedup content: sha256 of the source's bytes, and the source_uri of the source whose inference
        # these rows copy (null: inferred for this source itself)
        pa.field("content_hash", pa.string()),
        pa.field("dedup_of", pa.string()),
        # A multi-image unit's pages (pdf.page_window for `table`: unit_index is the first; null for
        # one-page units), in the order the model saw them.
        pa.field("pages", pa.list_(pa.int32())),
        # Structured output (pipeline/structured.py): a `choices` task's label (categorical), the reasoning
        # of a `thinking` task (never in `text`), why a json_schema/choices reply is invalid. A json_schema
        # task's parsed value is its own column `json_<task>`, added per job (results_schema).
        pa.field("label", LABEL_TYPE),
        pa.field("reasoning", pa.string()),
        pa.field("validation_error", pa.string()),
    ],
    metadata={"cpmv.table": "results", "cpmv.schema_version": SCHEMA_VERSION},
)

DOCUMENTS_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("media_type", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("num_units", pa.int32(), nullable=False),
        pa.field("units_ok", pa.int32(), nullable=False),  # units whose every task is ok
        pa.field("units_failed", pa.int32(), nullable=False),
        pa.field("results_ok", pa.int32(), nullable=False),  # result rows (unit x task) with status ok
        pa.field("results_failed", pa.int32(), nullable=False),
        # ok | partial (some results failed, or a repaired PDF) | error (none ok, or lost) | skipped (no task applied)
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_type", pa.string()),  # first error seen, for a quick look
        pa.field("error_message", pa.string()),
        pa.field("tasks", pa.list_(pa.string())),
        pa.field("fingerprints", pa.list_(pa.string())),  # committed fingerprints: what a rerun skips
        # the same by task (a task redone replaces its own entry only)
        pa.field("committed", pa.list_(pa.struct([pa.field("task", pa.string()),
                                                  pa.field("fingerprint", pa.string())]))),
        # error rows by task and type: what a rerun retries (pipeline/retry.py)
        pa.field("failures", pa.list_(pa.struct([pa.field("task", pa.string()), pa.field("error_type", pa.string()),
                                                 pa.field("count", pa.int32())]))),
        pa.field("flags", pa.list_(pa.string())),
        pa.field("text", pa.string()),  # OCR text of all pages in order (PDFs), for whole-document use
        pa.field("attempt", pa.string()),  # the run attempt that published this row (file names carry it)
        pa.field("created_at", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("content_hash", pa.string()),  # input.dedup content: sha256 of the source's bytes
        pa.field("dedup_of", pa.string()),  # the source_uri whose inference this source's rows copy
    ],
    metadata={"cpmv.table": "documents", "cpmv.schema_version": SCHEMA_VERSION},
)

#: The engine stage's output: result rows plus, on end-of-source markers only, the number of result
#: rows the source will have (pipeline/collect.py). Internal: never written out.
EXPECTED_ROWS = "_expected_rows"
# Labels travel as plain strings between stages (blocks of one table never disagree on a dictionary);
# the writer encodes them. Parsed JSON travels in `text` and becomes `json_<task>` at the writer.
STREAM_SCHEMA = pa.schema([pa.field(f.name, pa.string()) if f.name == "label" else f for f in RESULTS_SCHEMA],
                          metadata=RESULTS_SCHEMA.metadata).append(pa.field(EXPECTED_ROWS, pa.int32()))

#: Prefix of the per-task columns of json_schema tasks' parsed values.
JSON_PREFIX = "json_"


def results_schema(json_columns: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """RESULTS_SCHEMA plus one column `json_<task>` per json_schema task, typed from its schema
    (pipeline/structured.py `arrow_type`), after every fixed column, in the order given."""
    schema = RESULTS_SCHEMA
    for task, type_ in (json_columns or {}).items():
        schema = schema.append(pa.field(JSON_PREFIX + task, type_))
    return schema
#: `unit_kind` of the stream's internal rows: a source's end marker, and a (unit, task) pair that
#: produces no result row (a text-layer page's later tiles) but counts towards the source's total.
MARKER_KIND = "_end"
NO_ROW_KIND = "_none"

TABLES: dict[str, pa.Schema] = {"results": RESULTS_SCHEMA, "documents": DOCUMENTS_SCHEMA}


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly `schema` from row dicts (missing keys become nulls, extra keys an error)."""
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise KeyError(f"columns not in the {schema.metadata.get(b'cpmv.table', b'?').decode()} schema: {sorted(extra)}")
    # One conversion of the rows as structs, not one per column: ~4x faster for the one-row tables
    # the expand stage yields per page.
    arr = pa.array(rows, type=pa.struct(schema))
    return pa.Table.from_struct_array(arr).replace_schema_metadata(schema.metadata)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast a table to `schema`: add missing columns as nulls, drop others, fix column order and types."""
    arrays = []
    for f in schema:
        if f.name in table.column_names:
            arrays.append(table.column(f.name).cast(f.type))
        else:
            arrays.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)

# Internal: the rows that travel from the expand stage to the engine stage (never written out).
UNITS_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("media_type", pa.string()),
        pa.field("tasks", pa.list_(pa.string())),
        pa.field("unit_index", pa.int32()),
        pa.field("unit_kind", pa.string()),
        pa.field("tile_index", pa.int32()),
        pa.field("num_tiles", pa.int32()),
        pa.field("pixels", pa.list_(pa.binary())),  # raw RGB uint8, one entry per frame
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("num_frames", pa.int32()),
        pa.field("stack_frames", pa.int32()),  # clips sampled for 4.6's stack_frames: main frames, then sub-frames
        pa.field("text_layer", pa.string()),
        pa.field("text_layer_quality", pa.float32()),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("flags", pa.list_(pa.string())),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("preprocess_ms", pa.float64()),
        pa.field("_expected_rows", pa.int32()),  # end-of-source markers only (EXPECTED_ROWS)
        pa.field("prompt", pa.string()),  # the source's per-row prompt (input.prompt_column), null: the task's
        pa.field("content_hash", pa.string()),  # input.dedup content
        # end markers of a duplicate only: the source_id whose units stand for this source's (pipeline/dedup.py)
        pa.field("dedup_of", pa.string()),
        # Multi-image units whose images differ in size (a page window): (width, height) of each
        # entry of `pixels`; null when every frame is width x height.
        pa.field("frame_sizes", pa.list_(pa.list_(pa.int32(), 2))),
        pa.field("pages", pa.list_(pa.int32())),  # a page window's pages (RESULTS_SCHEMA `pages`)
    ]
)

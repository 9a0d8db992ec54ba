"""Per-row manifest data: a source's own prompt (or prompt template) and its pass-through columns.

A manifest row may carry more than a URI (input.prompt_column, input.pass_through). The driver reads
the manifest once (pipeline/sources.py), keeps the pass-through columns as an Arrow table indexed by
manifest row, and attaches them to every results and documents row of the row's source when a window
is published (pipeline/commit.py): the values never travel through the Ray plan, and Arrow's `take`
keeps their types exactly (an int64 stays int64, a timestamp keeps its unit and zone).

Decisions (README "Per-row prompts and pass-through columns"):
- A template field naming no manifest column, or a null cell, is an error row of that source
  (`prompt_template`), not a config error: the prompt column is data, and one bad row must not stop
  a million-row job. A pass-through or prompt column the manifest lacks is a config error.
- A per-row prompt is different work: it enters the task's prompt_version and fingerprint for that
  source (`row_prompt_version`, `row_fingerprint`), so a rerun with a changed prompt redoes it.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.config import InputConfig

#: Error type of a source whose per-row prompt cannot be made (bad template, null cell, too long).
PROMPT_ERROR = "prompt_template"
#: Manifest rows converted to Python at a time to fill templates.
_CHUNK = 8192
#: Longest per-row prompt, in characters (inputs are bounded; the context guard counts tokens later).
MAX_PROMPT_CHARS = 32_000


class TemplateError(ValueError):
    """A per-row prompt template that cannot be filled from its row."""


def fill_template(template: str, row: dict[str, object]) -> str:
    """`template` with each `{column}` replaced by the row's value (`{{`, `}}`: literal braces).

    Only plain column names: no positional `{}`, attribute or index access, conversion or format
    spec (a template is data from the manifest, and str.format's `{x.__class__}` would reach objects).
    Raises TemplateError naming the field.
    """
    out = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:  # an unmatched brace
        raise TemplateError(f"the prompt template is malformed ({err}); write literal braces as {{{{ and }}}}") from None
    for literal, name, spec, conv in parsed:
        out.append(literal)
        if name is None:
            continue
        if not name or spec or conv:
            raise TemplateError(f"template field {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} "
                                "is not supported: use {column} with a manifest column's name")
        if name not in row:
            raise TemplateError(f"template field {{{name}}} names no manifest column; columns: {', '.join(row)}")
        value = row[name]
        if value is None:
            raise TemplateError(f"template field {{{name}}} is null in this row")
        out.append(str(value))
    return "".join(out)


def row_prompt_version(version: str, prompt: str | None) -> str:
    """The prompt version of a task run with a per-row prompt (the task's own when None)."""
    if prompt is None:
        return version
    return f"{version}+row-{hashlib.sha256(prompt.encode()).hexdigest()[:12]}"


def row_fingerprint(fingerprint: str, prompt: str | None) -> str:
    """The resume fingerprint of a task run with a per-row prompt (the task's own when None)."""
    if prompt is None:
        return fingerprint
    return hashlib.sha256(f"{fingerprint}\n{prompt}".encode()).hexdigest()[:16]


@dataclass
class RowData:
    """What the manifest says of each row beyond its URI, by manifest row index."""

    prompts: list[str | None] = field(default_factory=list)  # filled prompt (None: the task's own)
    errors: list[str | None] = field(default_factory=list)  # why the row's prompt could not be made
    columns: pa.Table | None = None  # the pass-through columns, one row per manifest row

    @property
    def fields(self) -> list[pa.Field]:
        """The pass-through columns appended to results and documents (none without pass_through)."""
        return list(self.columns.schema) if self.columns is not None else []

    def prompt(self, row: int | None) -> tuple[str | None, str | None]:
        """(prompt, error) of a manifest row (None, None: no row, or no per-row prompt)."""
        if row is None or not self.prompts:
            return None, None
        return self.prompts[row], self.errors[row]

    def attach(self, table: pa.Table, rows: list[int | None]) -> pa.Table:
        """`table` with the pass-through columns of manifest rows `rows` (one per table row; None:
        the row's source came from input.uris, nulls) appended, types kept."""
        if self.columns is None:
            return table
        taken = self.columns.take(pa.array(rows, pa.int64()))
        for f, col in zip(taken.schema, taken.columns):
            table = table.append_column(f, col)
        return table


def load(cfg: InputConfig, table: pa.Table | None, where: str = "manifest") -> RowData:
    """The per-row data of a manifest table. Raises ValueError naming the field for a prompt or
    pass-through column the manifest lacks, a pass-through column of type null (an all-empty CSV
    column: give it a type), and one URI in several rows with different prompts or values."""
    if table is None or not (cfg.prompt_column or cfg.pass_through):
        return RowData()
    names = table.column_names
    missing = [c for c in cfg.pass_through if c not in names]
    if missing:
        raise ValueError(f"input.pass_through: {where} has no column(s) {', '.join(map(repr, missing))}; "
                         f"its columns are: {', '.join(names)}")
    for c in cfg.pass_through:
        if pa.types.is_null(table.schema.field(c).type):
            raise ValueError(f"input.pass_through: column {c!r} of {where} is empty in every row, so its type is "
                             "null; fill it, or write the manifest as Parquet with the column's type")
    data = RowData(columns=table.select(cfg.pass_through) if cfg.pass_through else None)
    if cfg.prompt_column:
        c = cfg.prompt_column
        if c not in names:
            raise ValueError(f"input.prompt_column: {where} has no column {c!r}; its columns are: {', '.join(names)}")
        if not (pa.types.is_string(table.schema.field(c).type) or pa.types.is_large_string(table.schema.field(c).type)
                or pa.types.is_null(table.schema.field(c).type)):
            raise ValueError(f"input.prompt_column: column {c!r} of {where} must hold text, not "
                             f"{table.schema.field(c).type}")
        others = table.drop_columns([c])
        chunk: list[dict[str, object]] = []
        for i, template in enumerate(table.column(c).to_pylist()):
            if i % _CHUNK == 0:  # rows become Python objects a chunk at a time: a huge manifest stays Arrow
                chunk = others.slice(i, _CHUNK).to_pylist()
            if template is None or not str(template).strip():
                data.prompts.append(None)
                data.errors.append(None)
                continue
            try:
                prompt = fill_template(str(template), chunk[i % _CHUNK])
                if len(prompt) > MAX_PROMPT_CHARS:
                    raise TemplateError(f"the prompt has {len(prompt)} characters, above {MAX_PROMPT_CHARS}")
                data.prompts.append(prompt)
                data.errors.append(None)
            except TemplateError as err:
                data.prompts.append(None)
                data.errors.append(f"per-row prompt ({cfg.prompt_column!r} column): {err}")
    _check_repeats(cfg, table, data, where)
    return data


def _check_repeats(cfg: InputConfig, table: pa.Table, data: RowData, where: str) -> None:
    """A URI named by several rows must say the same in each: a source has one prompt and one set of values."""
    if cfg.manifest_column not in table.column_names:
        return  # sources.manifest_uris names this error
    uris = [(v or "").strip() for v in table.column(cfg.manifest_column).to_pylist()]
    first: dict[str, int] = {}

    def values(k: int) -> list[dict[str, object]] | None:
        return data.columns.slice(k, 1).to_pylist() if data.columns is not None else None

    for i, u in enumerate(uris):
        j = first.setdefault(u, i)
        if j == i:
            continue
        same = (not data.prompts or (data.prompts[i], data.errors[i]) == (data.prompts[j], data.errors[j])) and (
            values(i) == values(j))
        if not same:
            raise ValueError(f"{where}: rows {j} and {i} (0-based) both name {u!r} with different prompts or "
                             "pass-through values; one source has one row (list it once)")


#: What `cpmv schema --output` says of the columns a job adds (its --job option lists them).
PASS_THROUGH_NOTE = ("input.pass_through columns are appended after these to results and documents, with the "
                     "manifest's Arrow types; `cpmv schema --output --job JOB` lists a job's")


def job_columns(path: str, overrides: list[str]) -> list[dict[str, object]]:
    """A job's pass-through columns as `cpmv schema --output` lists them (reads its manifest)."""
    from pipeline import storage
    from pipeline.config import load_job
    from pipeline.sources import read_manifest_table

    job = load_job(path, overrides)
    if not job.input.manifest or not job.input.pass_through:
        return []
    table = read_manifest_table(job.input.manifest, job.storage)
    data = load(job.input, table, f"manifest {storage.redact(job.input.manifest)!r}")
    return [{"name": f.name, "type": str(f.type), "nullable": True, "pass_through": True} for f in data.fields]

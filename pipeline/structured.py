"""Structured output: JSON schemas and label lists of tasks (`tasks[].json_schema`, `tasks[].choices`).

One module for what every engine and the writer share: loading a schema (inline, a .json file or a
pydantic model), checking a reply against it (jsonschema, the reference validator), and the Arrow
type of its parsed value. Decoding is constrained in the engines (vLLM structured outputs, the
OpenAI engine's `response_format`, xgrammar for transformers); this module never imports them.

Arrow type of a schema (`arrow_type`): `object` with `properties` -> struct of its properties,
`array` with `items` -> list, `string` (and string `enum`s) -> string, `integer` -> int64,
`number` -> float64, `boolean` -> bool, `["T", "null"]` and pydantic's `anyOf: [T, {"type": "null"}]`
-> T (every field is nullable), local `$ref`s into `$defs` are followed. Anything else (`oneOf`,
free-form objects, mixed types, recursive models) has no one Arrow type: the column is then the
value as JSON text (`string`), and `arrow_type` says why.
"""

from __future__ import annotations

import importlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

#: Most characters of a validation error kept in a row (jsonschema's message quotes the instance).
MAX_ERROR = 500


def load_schema(spec: dict[str, Any] | str) -> dict[str, Any]:
    """The JSON Schema `spec` names: a mapping (inline), `pkg.mod:Model` (a pydantic model's
    `model_json_schema()`), or a path to a .json file. Raises ValueError naming what is wrong,
    including a schema that is not valid JSON Schema (Draft 2020-12 meta-schema)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if isinstance(spec, dict):
        schema = spec
    elif ":" in spec and not spec.endswith(".json") and "/" not in spec:
        schema = _pydantic_schema(spec)
    else:
        path = Path(spec).expanduser()
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ValueError(f"json_schema file {spec!r} cannot be read ({err.strerror or err}); give a path to a "
                             "JSON Schema file, an inline mapping, or a pydantic model as `package.module:Model`") from None
        except ValueError as err:
            raise ValueError(f"json_schema file {spec!r} is not JSON: {err}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema must be a JSON object (a mapping), got {type(schema).__name__}")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as err:
        raise ValueError(f"json_schema is not a valid JSON Schema: {err.message} (at {'/'.join(map(str, err.path)) or 'top'})") from None
    return schema


def _pydantic_schema(path: str) -> dict[str, Any]:
    module, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"json_schema {path!r}: cannot import {attr!r} from {module!r} ({err}); the module must be "
                         "importable where the job is loaded") from None
    schema_fn = getattr(obj, "model_json_schema", None)
    if not callable(schema_fn):
        raise ValueError(f"json_schema {path!r} is not a pydantic model (it has no model_json_schema())")
    return schema_fn()


def canonical(schema: dict[str, Any]) -> str:
    """The schema as compact JSON text: what fingerprints hash and engines are given. Keys keep their
    order: constrained decoding writes properties in schema order (a `reasoning` field before an
    `answer` field is a different question from the reverse), so the order is part of the task."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


@lru_cache(maxsize=64)
def _validator(schema_json: str) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(schema_json))


def validate_json(text: str, schema_json: str) -> tuple[Any, str | None]:
    """(parsed value, None) when `text` is JSON valid under the schema; (parsed or None, why not) otherwise.

    Code fences (```json ... ```) that a server without constrained decoding may add are removed first.
    """
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0].strip()
    try:
        value = json.loads(body)
    except ValueError as err:
        return None, f"not JSON: {err}"[:MAX_ERROR]
    error = next(iter(_validator(schema_json).iter_errors(value)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        return value, f"at {where}: {error.message}"[:MAX_ERROR]
    return value, None


def validate_choice(text: str, choices: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(label, None) when `text` is one of `choices` (also as a JSON string: what an `enum` schema
    gives through the OpenAI API); (None, why not) otherwise."""
    answer = text.strip()
    if answer in choices:
        return answer, None
    try:
        decoded = json.loads(answer)
    except ValueError:
        decoded = None
    if isinstance(decoded, str) and decoded in choices:
        return decoded, None
    return None, f"{answer[:100]!r} is not one of the choices {list(choices)}"


def choices_schema(choices: tuple[str, ...]) -> dict[str, Any]:
    """A JSON Schema whose only valid values are the labels: what engines without a `choice`
    constraint (the OpenAI API) are given."""
    return {"type": "string", "enum": list(choices)}


def prompt_suffix(schema_json: str | None, choices: tuple[str, ...]) -> str:
    """What is appended to a task's prompt so that the model knows the shape it must answer in
    (constrained decoding forces the shape; the model still has to know what the fields mean)."""
    if schema_json is not None:
        return f"\n\nAnswer with one JSON value that follows this JSON Schema:\n{schema_json}"
    if choices:
        return "\n\nAnswer with exactly one of: " + ", ".join(choices) + "."
    return ""


def arrow_type(schema: dict[str, Any]) -> tuple[pa.DataType, str | None]:
    """(Arrow type of values valid under `schema`, None), or (pa.string(), why) where no one type
    fits and the column holds the value as JSON text (module docstring)."""
    try:
        return _arrow(schema, schema, ()), None
    except _NoType as why:
        return pa.string(), str(why)


class _NoType(Exception):
    pass


_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def _arrow(node: Any, root: dict[str, Any], seen: tuple[str, ...]) -> pa.DataType:
    if not isinstance(node, dict):
        raise _NoType(f"schema node {node!r} is not a mapping")
    ref = node.get("$ref")
    if ref is not None:
        if not isinstance(ref, str) or not ref.startswith("#/") or ref in seen:
            raise _NoType(f"$ref {ref!r} is not a local, non-recursive reference")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _arrow(target, root, (*seen, ref))
    for key in ("anyOf", "oneOf"):
        if key in node:  # pydantic's Optional[T]: anyOf [T, null]
            options = [o for o in node[key] if not (isinstance(o, dict) and o.get("type") == "null")]
            if len(options) != 1:
                raise _NoType(f"{key} with {len(options)} non-null alternatives")
            return _arrow(options[0], root, seen)
    kind = node.get("type")
    if kind is None and "enum" in node:
        kinds = {type(v) for v in node["enum"] if v is not None}
        kind = "string" if kinds == {str} else None
        if kind is None:
            raise _NoType("an enum of mixed or non-string values")
    if kind is None and "const" in node and isinstance(node["const"], str):
        kind = "string"
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != 1:
            raise _NoType(f"type {kind}")
        kind = kinds[0]
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        if not isinstance(node.get("items"), dict):
            raise _NoType("an array without one `items` schema")
        return pa.list_(_arrow(node["items"], root, seen))
    if kind == "object":
        props = node.get("properties")
        if not props:
            raise _NoType("an object without `properties`")
        return pa.struct([pa.field(name, _arrow(sub, root, seen)) for name, sub in props.items()])
    raise _NoType(f"type {kind!r}")


def to_column_value(value: Any, type_: pa.DataType) -> Any:
    """A parsed reply as a value of the column type: JSON text for the string fallback, else the
    value with only the schema's properties (extra keys of an open schema are dropped)."""
    if pa.types.is_string(type_):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return _project(value, type_)


def _project(value: Any, type_: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_struct(type_):
        if not isinstance(value, dict):
            return None
        return {type_.field(i).name: _project(value.get(type_.field(i).name), type_.field(i).type)
                for i in range(type_.num_fields)}
    if pa.types.is_list(type_):
        return [_project(v, type_.value_type) for v in value] if isinstance(value, list) else None
    return value


def json_columns(tasks: Any) -> dict[str, tuple[pa.DataType, str]]:
    """Task id -> (Arrow type of its `json_<id>` column, schema JSON) for the json_schema tasks among
    `tasks` (ResolvedTask values), in job order."""
    return {t.name: (arrow_type(json.loads(t.json_schema))[0], t.json_schema) for t in tasks if t.json_schema}


def fill_json_values(rows: list[dict[str, Any]], columns: dict[str, tuple[pa.DataType, str]]) -> None:
    """Give every results row a value for each `json_<id>` column, in place: the parsed reply of an
    `ok` row of task <id> (its text passed validation in the reply checks), else null. Rows that
    already carry the key (moved from an earlier file) keep their value."""
    from schemas.records import JSON_PREFIX

    for row in rows:
        for task, (type_, schema_json) in columns.items():
            key = JSON_PREFIX + task
            if key in row:
                continue
            value = None
            if row.get("task") == task and row.get("status") == "ok" and row.get("text"):
                parsed, _ = validate_json(row["text"], schema_json)
                value = to_column_value(parsed, type_) if parsed is not None else None
            row[key] = value

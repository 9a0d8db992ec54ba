"""Structured output, labels and thinking without a model: schemas, Arrow types, validation in the
reply checks, task naming, fingerprints and the refusals (pipeline/structured.py, config, tasks)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from pydantic import BaseModel

from pipeline.checks import Attempts, check_reply
from pipeline.config import ChecksConfig, ConfigError, ModelConfig, TaskConfig, load_job_data
from pipeline.engines.base import Reply, Request
from pipeline.engines.factory import check_job
from pipeline.models import check_thinking
from pipeline.structured import arrow_type, fill_json_values, json_columns, load_schema, validate_choice, validate_json
from pipeline.tasks import fingerprint, resolve_task

SCHEMA = {"type": "object", "required": ["kind", "pages"], "additionalProperties": False,
          "properties": {"kind": {"enum": ["photo", "scan"]}, "pages": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}},
                         "size": {"type": "object", "properties": {"w": {"type": "number"}, "h": {"type": "number"}}}}}
BASE = {"input": {"uris": ["/data"]}, "output": {"uri": "/out"}}


class Author(BaseModel):
    name: str
    email: str | None = None


class Paper(BaseModel):
    """Used by its import path `tests.unit.test_structured:Paper`."""

    title: str
    year: int
    authors: list[Author]


def _job(*tasks: dict) -> object:
    return load_job_data({**BASE, "tasks": list(tasks)})


# -- schemas and types ----------------------------------------------------------------------------


def test_schema_inline_file_and_pydantic_model(tmp_path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SCHEMA))
    assert load_schema(SCHEMA) == load_schema(str(path)) == SCHEMA
    paper = load_schema("tests.unit.test_structured:Paper")
    assert paper == Paper.model_json_schema()
    # pydantic's $defs/$ref and Optional (anyOf [T, null]) become a real nested struct
    type_, why = arrow_type(paper)
    assert why is None
    assert type_ == pa.struct([pa.field("title", pa.string()), pa.field("year", pa.int64()),
                               pa.field("authors", pa.list_(pa.struct([pa.field("name", pa.string()),
                                                                       pa.field("email", pa.string())])))])


@pytest.mark.parametrize("spec,match", [
    ("/no/such/schema.json", "cannot be read"),
    ("tests.unit.test_structured:Nope", "cannot import"),
    ("tests.unit.test_structured:SCHEMA", "not a pydantic model"),
    ({"type": "objekt"}, "not a valid JSON Schema"),
])
def test_bad_schemas_fail_naming_the_problem(spec, match) -> None:
    with pytest.raises(ValueError, match=match):
        load_schema(spec)


def test_arrow_types_and_the_json_text_fallback() -> None:
    type_, why = arrow_type(SCHEMA)
    assert why is None and type_.field("kind").type == pa.string() and type_.field("pages").type == pa.int64()
    assert type_.field("tags").type == pa.list_(pa.string())
    assert type_.field("size").type == pa.struct([pa.field("w", pa.float64()), pa.field("h", pa.float64())])
    assert arrow_type({"type": ["integer", "null"]}) == (pa.int64(), None)
    for schema in ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, {"type": "object"},
                   {"enum": ["a", 1]}):
        type_, why = arrow_type(schema)
        assert type_ == pa.string() and why


def test_validation_of_json_and_labels() -> None:
    s = json.dumps(SCHEMA)
    assert validate_json('{"kind": "scan", "pages": 2}', s) == ({"kind": "scan", "pages": 2}, None)
    assert validate_json('```json\n{"kind": "scan", "pages": 2}\n```', s)[1] is None  # fenced by a free server
    value, why = validate_json('{"kind": "poster", "pages": 2}', s)
    assert value["kind"] == "poster" and why.startswith("at kind:") and "poster" in why
    assert validate_json('{"kind": "scan"', s)[1].startswith("not JSON")
    assert validate_choice("cat", ("cat", "dog")) == ("cat", None)
    assert validate_choice('"dog"', ("cat", "dog")) == ("dog", None)  # an enum schema's JSON string
    assert validate_choice("cow", ("cat", "dog"))[1] == "'cow' is not one of the choices ['cat', 'dog']"


# -- tasks: names, prompts, fingerprints ----------------------------------------------------------


def test_custom_tasks_are_named_by_id_and_builtins_keep_theirs() -> None:
    job = _job({"name": "ocr"}, {"name": "caption", "id": "caption_json", "json_schema": SCHEMA},
               {"name": "custom", "id": "doc_type", "prompt": "What is it?", "choices": ["form", "letter"]})
    tasks = [resolve_task(t) for t in job.tasks]
    assert [t.name for t in tasks] == ["ocr", "caption_json", "doc_type"]
    assert tasks[0].prompt_version == "ocr-v1" and tasks[0].json_schema is None  # unchanged
    assert tasks[1].base == "caption" and tasks[1].unit_kinds == frozenset({"page", "image"})
    assert '"kind"' in tasks[1].prompt and tasks[1].prompt_version.startswith("custom-")
    assert tasks[2].unit_kinds == frozenset({"page", "image", "clip"})
    assert tasks[2].prompt.endswith("Answer with exactly one of: form, letter.")
    assert list(json_columns(tasks)) == ["caption_json"]


@pytest.mark.parametrize("tasks,match", [
    ([{"name": "custom", "prompt": "x"}], "needs an `id`"),
    ([{"name": "custom", "id": "a"}], "needs an `id`.*and a `prompt`"),
    ([{"name": "caption"}, {"name": "caption"}], "repeated: caption"),
    ([{"name": "caption", "json_schema": SCHEMA, "choices": ["a", "b"]}], "not both"),
    ([{"name": "caption", "thinking": True, "choices": ["a", "b"]}], "`thinking` cannot be combined"),
    ([{"name": "caption", "choices": ["a", "a"]}], "distinct"),
    ([{"name": "caption", "json_schema": "/missing.json"}], r"tasks\.0.*cannot be read"),
    ([{"name": "caption", "id": "_hidden"}], "not a safe name"),
])
def test_task_config_errors_name_the_field(tasks, match) -> None:
    with pytest.raises(ConfigError, match=match):
        _job(*tasks)


def test_fingerprint_follows_schema_choices_and_thinking_only_when_set() -> None:
    def key(**task):
        return fingerprint(resolve_task(TaskConfig(name="caption", **task)), ModelConfig(), "m")

    plain = key()
    variants = [key(json_schema=SCHEMA), key(json_schema={**SCHEMA, "required": ["kind"]}),
                key(choices=["a", "b"]), key(choices=["a", "c"]), key(thinking=True)]
    assert len({plain, *variants}) == 6
    # A plain task's key is what it was before these fields existed (no rerun of finished work).
    import hashlib

    task = resolve_task(TaskConfig(name="caption"))
    m = ModelConfig()
    old = {"task": "caption", "prompt_version": "caption-v1", "model": "m", "revision": None,
           "max_slice_nums": None, "use_image_id": None, "downsample_mode": None, "max_new_tokens": task.max_new_tokens,
           "temperature": 0.0, "text_layer": "ignore"}
    assert m.revision is None and plain == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]


# -- reply checks ---------------------------------------------------------------------------------


def _attempts(task_cfg: dict, *texts: str, checks: ChecksConfig | None = None) -> Attempts:
    task = resolve_task(TaskConfig(name="custom", id="t", prompt="p", **{"retries": 1, **task_cfg}))
    a = Attempts(task, Request("p"), checks or ChecksConfig())
    for text in texts:
        if a.take(Reply(text=text, completion_tokens=5, finish_reason="stop")) is None:
            break
    return a


def test_invalid_json_is_retried_then_reply_invalid_with_validation_error() -> None:
    a = _attempts({"json_schema": SCHEMA}, '{"kind": "poster", "pages": 1}', '{"kind": "scan", "pages": 3}')
    assert a.count == 2 and a.reasons == ["invalid"] and a.verdict.ok
    assert a.verdict.parsed == {"kind": "scan", "pages": 3} and a.verdict.validation_error is None
    a = _attempts({"json_schema": SCHEMA}, '{"pages": 1}', "not json")
    assert a.count == 2 and not a.verdict.ok and a.verdict.reason == "invalid"
    assert a.verdict.validation_error.startswith("not JSON")
    # an empty reply is no valid JSON even where the base task allows empty answers
    v = check_reply(Reply(text="", finish_reason="stop"), "table", ChecksConfig(), validate=lambda s: (None, "x"))
    assert not v.ok and v.reason == "empty"


def test_label_outside_the_list_is_invalid() -> None:
    a = _attempts({"choices": ["cat", "dog"]}, "cow", "dog")
    assert a.verdict.ok and a.verdict.parsed == "dog" and a.reasons == ["invalid"]


def test_thinking_reasoning_goes_apart_from_the_answer() -> None:
    # The template opened <think> in the prompt: the reply holds `reasoning</think>answer`.
    a = _attempts({"thinking": True}, "it is a cat because of the ears</think>\n\nA cat.")
    assert a.verdict.ok and a.verdict.text == "A cat."
    assert a.verdict.reasoning == "it is a cat because of the ears"
    # Cut by the cap before </think>: all reasoning, no answer (never taken for the answer).
    a = _attempts({"thinking": True, "retries": 0}, "still thinking about")
    assert not a.verdict.ok and a.verdict.text == "" and a.verdict.reasoning == "still thinking about"
    # Thinking off: a reply without a block is the answer, no reasoning.
    a = _attempts({}, "A cat.")
    assert a.verdict.ok and a.verdict.text == "A cat." and a.verdict.reasoning is None


# -- refusals -------------------------------------------------------------------------------------


def test_thinking_refused_for_generations_without_it() -> None:
    for family in ("minicpmv4_5", "minicpmv4_6", "minicpmv4_7"):
        check_thinking(family, ["caption"])
    with pytest.raises(ValueError, match=r"tasks\[\]\.thinking is set for task\(s\) caption, but MiniCPM-V 2\.6 has "
                                         r"no thinking mode: remove `thinking: true`.*MiniCPM-V 4\.5"):
        check_thinking("minicpmv2_6", ["caption"])
    job = _job({"name": "caption", "thinking": True})
    with pytest.raises(ConfigError, match="MiniCPM-OCR 1.0 has no thinking mode"):
        check_job(job, "minicpm_ocr", "transformers")
    check_job(job, "minicpmv4_6", "vllm")


# -- the writer's json_<task> columns -------------------------------------------------------------


def test_json_values_fill_typed_columns() -> None:
    task = resolve_task(TaskConfig(name="custom", id="info", prompt="p", json_schema=SCHEMA))
    cols = json_columns([task])
    rows = [{"task": "info", "status": "ok", "text": '{"kind": "scan", "pages": 2, "size": {"w": 1.5}}'},
            {"task": "info", "status": "error", "text": '{"kind": "poster"}'},
            {"task": "ocr", "status": "ok", "text": "hello"}]
    fill_json_values(rows, cols)
    col = pa.array([r["json_info"] for r in rows], type=cols["info"][0])
    assert col[0].as_py() == {"kind": "scan", "pages": 2, "tags": None, "size": {"w": 1.5, "h": None}}
    assert col[1].as_py() is None and col[2].as_py() is None

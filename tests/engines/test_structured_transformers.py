"""Constrained decoding through the transformers engine (xgrammar), tiny random MiniCPM-V 4.6.

Random weights write JSON valid under a schema (or one of a list of labels) only when decoding is
constrained: every constrained reply validating, next to an unconstrained reply of the same model
that does not, is what shows the grammar reached `generate`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.engines.base import Request  # noqa: E402
from pipeline.engines.transformers import TransformersEngine  # noqa: E402
from pipeline.structured import canonical, validate_choice, validate_json  # noqa: E402
from pipeline.tiny import build_tiny  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["kind", "has_text", "pages"],
          "properties": {"kind": {"enum": ["photo", "scan", "drawing"]}, "has_text": {"type": "boolean"},
                         "pages": {"type": "integer", "minimum": 0, "maximum": 9}}}
LABELS = ("invoice", "letter", "receipt form")


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> TransformersEngine:
    return TransformersEngine(str(build_tiny("minicpmv4_6", tmp_path_factory.mktemp("m46"))), device="cpu")


def test_json_schema_and_choices_in_one_batch(engine: TransformersEngine) -> None:
    schema = canonical(SCHEMA)
    replies = engine.generate([
        Request("Describe.", [_image(0)], max_new_tokens=48, json_schema=schema),
        Request("Which?", [_image(1)], max_new_tokens=16, choices=LABELS),
        Request("Describe.", [_image(2)], max_new_tokens=48, json_schema=schema),
        Request("Describe.", [_image(3)], max_new_tokens=12),
    ])
    for reply in (replies[0], replies[2]):
        assert reply.error_type is None and reply.finish_reason == "stop", reply
        value, why = validate_json(reply.text, schema)
        assert why is None, (reply.text, why)
        assert set(value) == {"kind", "has_text", "pages"}
    assert validate_choice(replies[1].text, LABELS) == (replies[1].text, None)
    assert validate_json(replies[3].text, schema)[1] is not None  # unconstrained: no valid JSON


def test_json_properties_in_schema_order_without_free_whitespace(engine: TransformersEngine) -> None:
    (reply,) = engine.generate([Request("Describe.", [_image(4)], max_new_tokens=48, json_schema=canonical(SCHEMA))])
    assert reply.text.startswith('{"kind":') and " " not in reply.text and "\t" not in reply.text


def test_thinking_on_and_off_render_the_template(engine: TransformersEngine) -> None:
    on = engine._render(Request("Describe.", [_image(0)], thinking=True))
    off = engine._render(Request("Describe.", [_image(0)]))
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_thinking_refused_when_the_template_ignores_it(tmp_path: Path) -> None:
    path = build_tiny("minicpmv4_6", tmp_path / "m")
    config = path / "chat_template.jinja"
    if not config.exists():
        pytest.skip("tiny checkpoint keeps its template elsewhere")
    text = config.read_text()
    config.write_text(text.replace("enable_thinking is defined and enable_thinking", "false"))
    eng = TransformersEngine(str(path), device="cpu")
    (reply,) = eng.generate([Request("Describe.", [_image(0)], max_new_tokens=2, thinking=True)])
    assert reply.error_type == "ValueError"
    assert "tasks[].thinking" in reply.error_message and "ignores enable_thinking" in reply.error_message

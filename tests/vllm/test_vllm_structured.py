"""Structured output, labels and thinking through the vLLM engine on CPU (tiny random 4.6 and 4.5).

Random weights write valid JSON only when decoding is constrained: every reply here validating
against its schema is what shows that vLLM's structured outputs got the task's schema. Run with
`.venv-vllm/bin/python -m pytest tests/vllm/test_vllm_structured.py`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.engines.base import Request  # noqa: E402
from pipeline.engines.vllm import VLLMEngine, generation, render_user_turn  # noqa: E402
from pipeline.structured import canonical, validate_choice, validate_json  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["kind", "has_text", "pages"],
          "properties": {"kind": {"enum": ["photo", "scan", "drawing"]}, "has_text": {"type": "boolean"},
                         "pages": {"type": "integer", "minimum": 0, "maximum": 9}}}
CHOICES = ("invoice", "letter", "receipt form")


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=("minicpmv4_6", "minicpmv4_5"))
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMEngine]:
    family = request.param
    out = tmp_path_factory.mktemp(family)
    if family == "minicpmv4_5":
        from pipeline.tiny_legacy import build_tiny_legacy

        path = build_tiny_legacy("4.5", out)
    else:
        from pipeline.tiny import build_tiny

        path = build_tiny(family, out)
    eng = VLLMEngine(str(path), trust_remote_code=not generation(family).native, load_format="dummy",
                     enforce_eager=True, max_model_len=2048, max_images_per_prompt=2)
    yield eng
    eng.close()


def test_json_schema_replies_validate_and_free_replies_do_not(engine: VLLMEngine) -> None:
    schema = canonical(SCHEMA)
    replies = engine.generate([Request("Describe.", [_image(k)], max_new_tokens=48, json_schema=schema)
                               for k in range(3)] + [Request("Describe.", [_image(9)], max_new_tokens=24)])
    for reply in replies[:3]:
        assert reply.error_type is None, reply.error_message
        value, why = validate_json(reply.text, schema)
        assert why is None, (reply.text, why)
        assert value["kind"] in ("photo", "scan", "drawing")
    # The unconstrained reply of the same random model is no JSON: the constraint did the work.
    assert validate_json(replies[3].text, schema)[1] is not None


def test_choices_constrain_to_the_list(engine: VLLMEngine) -> None:
    replies = engine.generate([Request("Which?", [_image(k)], max_new_tokens=16, choices=CHOICES) for k in range(3)])
    for reply in replies:
        assert reply.error_type is None, reply.error_message
        assert validate_choice(reply.text, CHOICES) == (reply.text, None)


def test_thinking_renders_the_templates_thinking_turn(engine: VLLMEngine) -> None:
    on = render_user_turn(engine.gen, "Describe.", engine.tokenizer, thinking=True)
    off = render_user_turn(engine.gen, "Describe.", engine.tokenizer, thinking=False)
    assert on != off and "</think>" in off and "</think>" not in on  # an empty think block closes it when off
    (reply,) = engine.generate([Request("Describe.", [_image(0)], max_new_tokens=4, thinking=True)])
    assert reply.error_type is None, reply.error_message

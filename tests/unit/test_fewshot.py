"""Few-shot examples without a model: configuration, fingerprint, the 2.0 refusal, the 2.5-4.5 prompt
format against the reference files (../shared/reference), the HTTP body and the prompt guard.

The 2.6/4.0/4.5 `chat()` of the remote-code model joins each message's images and text as
`(<image>./</image>)` + "\\n" + text and renders the message list with the tokenizer's chat template;
vLLM's processor (and the remote-code processor) then replaces the i-th placeholder with
`get_slice_image_placeholder(size, image_idx=i)`. The tests below rebuild that text from the
reference image processors and check the engine's prompt and the guard's count against it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_job_data
from pipeline.engines.base import Example, Request
from pipeline.engines.vllm import (LEGACY_IMAGE_PLACEHOLDER, conversation_turns, generation, render_conversation)
from pipeline.guards import check_unit, estimate_text_tokens, visual_tokens
from pipeline.media.slicing import plan_image
from tests.reference import image_processor, reference_dir
from tests.unit.test_reference_processors import count_tokens

PROMPT = "Convert the table."


def _png(path: Path, h: int, w: int, seed: int) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def _job(tmp_path: Path, examples: list[dict], **extra) -> object:
    data = {"input": {"uris": ["x"]}, "output": {"uri": str(tmp_path / "out")},
            "tasks": [{"name": "table", "examples": examples}], **extra}
    return load_job_data(data)


def _request(sizes: list[tuple[int, int]], unit: tuple[int, int]) -> Request:
    img = lambda w, h: np.zeros((h, w, 3), np.uint8)  # noqa: E731
    examples = [Example((img(w, h),), PROMPT, f"answer {k}") for k, (w, h) in enumerate(sizes)]
    return Request(PROMPT, [img(*unit)], examples=examples)


# -- configuration ---------------------------------------------------------------------------------


def test_examples_on_video_captions_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="video_caption"):
        load_job_data({"input": {"uris": ["x"]}, "output": {"uri": "o"},
                       "tasks": [{"name": "video_caption", "examples": [{"image": "a.png", "answer": "x"}]}]})


def test_2_0_refuses_examples_before_any_work(tmp_path):
    from pipeline.engines.factory import check_job

    job = _job(tmp_path, [{"image": "a.png", "answer": "x"}])
    with pytest.raises(ConfigError, match="one image per prompt.*remove `examples`"):
        check_job(job, "minicpmv2_0", "vllm")
    check_job(job, "minicpmv2_6", "vllm")  # later generations take them
    gen = generation("minicpmv2_0")
    with pytest.raises(ValueError, match="one image per prompt"):
        render_conversation(gen, conversation_turns(gen, _request([(64, 64)], (64, 64))), tokenizer=None)


def test_fingerprint_follows_example_content_not_only_its_uri(tmp_path):
    from pipeline.tasks import fingerprint, resolve_task

    ex = _png(tmp_path / "ex.png", 40, 30, 1)

    def fp(answer: str = "| a |") -> str:
        job = _job(tmp_path, [{"image": ex, "answer": answer}])
        return fingerprint(resolve_task(job.tasks[0]), job.model, "m", job)

    first = fp()
    assert fp() == first
    assert fp("| b |") != first  # another answer
    _png(tmp_path / "ex.png", 40, 30, 2)  # same URI, other pixels
    assert fp() != first
    plain = _job(tmp_path, [])
    assert fingerprint(resolve_task(plain.tasks[0]), plain.model, "m", plain) != first
    assert resolve_task(plain.tasks[0]).prompt_version == "table-v1"  # jobs without examples keep theirs


def test_unreadable_example_fails_the_job_naming_it(tmp_path):
    from pipeline.tasks import fingerprint, resolve_task

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    for image, match in ((str(bad), r"examples\[0\]\.image .*bad\.png"), (str(tmp_path / "no.png"), "could not be read")):
        job = _job(tmp_path, [{"image": image, "answer": "x"}])
        with pytest.raises(ConfigError, match=match):
            fingerprint(resolve_task(job.tasks[0]), job.model, "m", job)


def test_vllm_image_limit_covers_examples_and_windows(tmp_path):
    from pipeline.examples import images_per_prompt

    examples = [{"image": "a.png", "answer": "x"}] * 8
    assert images_per_prompt(_job(tmp_path, examples, pdf={"page_window": 3})) == 11
    assert images_per_prompt(_job(tmp_path, [])) == 1


# -- prompt format of 2.5-4.5 against the reference files -------------------------------------------


def _reference_template_tokenizer():
    """MiniCPM-Llama3-V 2.5's real chat template (v25_tokenizer_config.json) rendered by transformers."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = json.loads((reference_dir() / "v25_tokenizer_config.json").read_text())["chat_template"]

    class Tok:
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs):
            rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                                add_generation_prompt=add_generation_prompt,
                                                bos_token="<|begin_of_text|>", **kwargs)
            return rendered[0]

    return Tok()


def test_2_5_examples_render_through_its_real_chat_template():
    gen = generation("minicpmv2_5")
    tok = _reference_template_tokenizer()
    text = render_conversation(gen, conversation_turns(gen, _request([(300, 200), (90, 60)], (500, 700))), tok)
    # chat()'s messages: "(<image>./</image>)\n" + question per user turn, the answers as assistant turns.
    card = [{"role": "user", "content": f"{LEGACY_IMAGE_PLACEHOLDER}\n{PROMPT}"},
            {"role": "assistant", "content": "answer 0"},
            {"role": "user", "content": f"{LEGACY_IMAGE_PLACEHOLDER}\n{PROMPT}"},
            {"role": "assistant", "content": "answer 1"},
            {"role": "user", "content": f"{LEGACY_IMAGE_PLACEHOLDER}\n{PROMPT}"}]
    assert text == tok.apply_chat_template(card)
    assert text.count(LEGACY_IMAGE_PLACEHOLDER) == 3
    assert re.search(r"user<\|end_header_id\|>.*answer 0.*answer 1.*assistant<\|end_header_id\|>\n\n$", text, re.S)


@pytest.mark.parametrize("family", ["minicpmv2_5", "minicpmv2_6", "minicpmv4_0", "minicpmv4_5"])
def test_placeholders_of_examples_and_unit_count_as_the_reference_processor_expands_them(family):
    """The i-th `(<image>./</image>)` becomes the reference processor's placeholder for image i (ids
    count through the examples' images, then the unit's): the guard's total is those tokens exactly."""
    sizes = [(300, 200), (1200, 900), (90, 60), (640, 500)]  # three examples, then the unit
    ip = image_processor(family, max_slice_nums=9)
    use_id = family != "minicpmv2_5"  # vLLM's rule: ids for 2.6+, none for 2.0/2.5
    expanded = []
    for idx, (w, h) in enumerate(sizes):
        if family == "minicpmv2_5":
            expanded.append(ip.get_slice_image_placeholder((w, h)))
        else:
            expanded.append(ip.get_slice_image_placeholder((w, h), image_idx=idx, max_slice_nums=9, use_image_id=True))
    reference = sum(count_tokens(t) for t in expanded)
    ours = visual_tokens(family, "image", None, None, 0, max_slice_nums=9, use_image_id=use_id, sizes=sizes)
    assert ours == reference
    # Character for character: image ids count through the examples' images, then the unit's.
    from pipeline.media.placeholders import placeholder_from_plan

    for idx, (w, h) in enumerate(sizes):
        plan = plan_image(family, w, h, max_slice_nums=9, use_image_id=use_id, image_index=idx)
        assert placeholder_from_plan(family, plan, image_id=idx if use_id else None) == expanded[idx]


# -- the HTTP engine's body --------------------------------------------------------------------------


def test_openai_body_has_examples_as_earlier_turns():
    from pipeline.engines.openai_http import OpenAIEngine

    engine = OpenAIEngine("http://127.0.0.1:9", "m", family="minicpmv4_6", max_retries=0)
    try:
        body = json.loads(engine._body(_request([(30, 20), (40, 20)], (50, 60))))
        roles = [m["role"] for m in body["messages"]]
        assert roles == ["user", "assistant", "user", "assistant", "user"]
        assert [m["content"] for m in body["messages"] if m["role"] == "assistant"] == ["answer 0", "answer 1"]
        for m in body["messages"][::2]:
            assert [c["type"] for c in m["content"]] == ["image_url", "text"] and m["content"][1]["text"] == PROMPT
        sizes = [Image.open(__import__("io").BytesIO(__import__("base64").b64decode(
            m["content"][0]["image_url"]["url"].split(",", 1)[1]))).size for m in body["messages"][::2]]
        assert sizes == [(30, 20), (40, 20), (50, 60)]  # examples first, in order, then the unit
    finally:
        engine.close()
    # A multi-image unit (a page window, a manifest row): every image in its one user turn, in order.
    engine = OpenAIEngine("http://127.0.0.1:9", "m", family="minicpmv4_6", max_retries=0)
    try:
        two = Request(PROMPT, [np.zeros((20, 30, 3), np.uint8), np.zeros((40, 10, 3), np.uint8)])
        (turn,) = json.loads(engine._body(two))["messages"]
        assert [c["type"] for c in turn["content"]] == ["image_url", "image_url", "text"]
    finally:
        engine.close()
    # 2.0 never gets as far as a body on this engine: no OpenAI server renders its prompt (issue 12),
    # so the engine refuses it at construction, examples or not.
    with pytest.raises(ValueError, match="does not serve MiniCPM-V 2.0"):
        OpenAIEngine("http://127.0.0.1:9", "m", family="minicpmv2_0", max_retries=0)


# -- the prompt guard ---------------------------------------------------------------------------------


def test_guard_counts_examples_and_reslices_every_image():
    family = "minicpmv4_6"
    sizes = [(1600, 1200), (1600, 1200), (2000, 2800)]
    full = visual_tokens(family, "image", None, None, 0, max_slice_nums=8, use_image_id=True, sizes=sizes)
    unit_only = visual_tokens(family, "image", 2000, 2800, 1, max_slice_nums=8, use_image_id=True)
    assert full > unit_only
    text = estimate_text_tokens(PROMPT, None, (("q", "a"), ("q", "b")))
    assert text > estimate_text_tokens(PROMPT)
    fits = check_unit(family, "image", 2000, 2800, 1, text, 100, full + text + 100, max_slice_nums=8,
                      use_image_id=True, sizes=sizes)
    assert fits.ok and fits.estimate.visual_tokens == full
    tight = check_unit(family, "image", 2000, 2800, 1, text, 100, full + text + 99, max_slice_nums=8,
                       use_image_id=True, sizes=sizes)
    assert tight.ok and tight.max_slice_nums == 4
    assert tight.estimate.visual_tokens == visual_tokens(family, "image", None, None, 0, max_slice_nums=4,
                                                         use_image_id=True, sizes=sizes)


def test_inspect_counts_the_examples_images_before_the_unit(tmp_path):
    from pipeline.inspect_units import inspect_units

    ex1, ex2 = _png(tmp_path / "e1.png", 300, 200, 1), _png(tmp_path / "e2.png", 40, 30, 2)
    unit = _png(tmp_path / "in.png", 500, 700, 3)
    job = load_job_data({"input": {"uris": [unit]}, "output": {"uri": str(tmp_path / "o")},
                         "tasks": [{"name": "ocr"}, {"name": "caption", "examples": [
                             {"image": ex1, "answer": "a"}, {"image": ex2, "answer": "b"}]}]})
    (rec,) = list(inspect_units(job, "minicpmv4_6"))
    expected = sum(plan_image("minicpmv4_6", w, h, use_image_id=True, image_index=k).placeholder_tokens
                   for k, (w, h) in enumerate([(200, 300), (30, 40), (700, 500)]))
    assert rec["prompt_placeholder_tokens"] == {"caption": expected}
    assert rec["placeholder_tokens"] < expected  # the unit alone

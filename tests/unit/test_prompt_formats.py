"""Prompt format and stop tokens of MiniCPM-V 2.0 / 2.5 as their reference files build them.

The 2.0 tokenizer has no chat template and its own `apply_chat_template(conversation,
add_image_msg=True)` (v20_tokenization_minicpmv.py in ../shared/reference, loaded from there):
its `<用户>...<AI>` text is what the vLLM engine must send. Pure Python: no vLLM needed.
"""

from __future__ import annotations

import json

import pytest

from pipeline.engines.vllm import LEGACY_IMAGE_PLACEHOLDER, generation, legacy_user_content, render_user_turn
from pipeline.models import FAMILIES
from tests.reference import load, reference_dir


class _NoTemplate:
    """A tokenizer stand-in whose apply_chat_template must not be called (2.0 has no template)."""

    def apply_chat_template(self, *args, **kwargs):
        raise AssertionError("2.0 prompts must not go through a chat template")


@pytest.mark.parametrize("prompt", ["Describe this image.", "提取文字", "Line one\nline two", ""])
@pytest.mark.parametrize("n_images", [0, 1])
def test_2_0_prompt_is_the_reference_tokenizers(prompt, n_images):
    ref_tokenizer = load("v20_tokenization_minicpmv").MiniCPMVTokenizer
    gen = generation("minicpmv2_0")
    content = legacy_user_content(gen, n_images, prompt)
    ours = render_user_turn(gen, content, _NoTemplate())
    # apply_chat_template uses no tokenizer state: call it unbound on the real class.
    reference = ref_tokenizer.apply_chat_template(None, [{"role": "user", "content": content}],
                                                  add_image_msg=bool(n_images))
    assert ours == reference
    if n_images:
        assert ours == f"<用户>{LEGACY_IMAGE_PLACEHOLDER}{prompt}<AI>"


def test_2_0_reference_processor_puts_the_image_placeholder_right_before_the_text():
    """The 2.0 processor replaces the pattern with a placeholder that ends in "\\n", so nothing else
    separates image and text (vLLM does the same replacement)."""
    ip = load("v20_image_processing_minicpmv").MiniCPMVImageProcessor(image_feature_size=64)
    assert ip.get_slice_image_placeholder((448, 448)).endswith("</image>\n")
    assert generation("minicpmv2_0").image_separator == ""
    assert generation("minicpmv2_5").image_separator == "\n"  # 2.5's placeholder has no newline


def test_2_0_takes_one_image_per_prompt():
    assert generation("minicpmv2_0").max_images == 1
    assert generation("minicpmv2_6").max_images is None


def test_stop_tokens_are_the_reference_tokenizers_end_tokens():
    ref = reference_dir()
    v20 = json.loads((ref / "v20_tokenizer_config.json").read_text())
    assert FAMILIES["minicpmv2_0"].stop_tokens[0] == v20["eos_token"] == "</s>"
    v25 = json.loads((ref / "v25_tokenizer_config.json").read_text())
    eot = load("v25_tokenization_minicpmv_fast").MiniCPMVTokenizerFast.__init__.__code__.co_consts
    assert "<|eot_id|>" in eot  # the tokenizer's eot_token, which ends each chat turn
    assert set(FAMILIES["minicpmv2_5"].stop_tokens) == {"<|eot_id|>", v25["eos_token"]}
    assert "<|eot_id|>" in v25["chat_template"]


def test_2_5_uses_its_tokenizers_chat_template():
    assert generation("minicpmv2_5").chat_format == "template"
    assert generation("minicpmv2_0").chat_format == "minicpm_v2"


@pytest.mark.parametrize("family,flat", [("minicpmv2_0", True), ("minicpmv2_5", False), ("minicpmv2_6", False)])
def test_only_2_0s_image_sizes_are_nested_for_vllm(family, flat):
    """vLLM 0.32's processor indexes `image_sizes` per prompt; the real 2.0 image processor returns
    one flat list (the engine nests it), 2.5 and 2.6 already return one list per prompt."""
    from PIL import Image

    from pipeline.engines.vllm import _flat_sizes
    from tests.reference import image_processor

    out = image_processor(family).preprocess([Image.new("RGB", (700, 500))], return_tensors="pt")
    assert _flat_sizes(out["image_sizes"]) is flat


class _Tok:
    """A tokenizer stand-in: one id per character (BOS 0 added on request), whitespace dropped if told."""

    bos_token, bos_token_id = "<s>", 0

    def __init__(self, keep_whitespace=True, adds_bos=True):
        self.keep_whitespace, self.adds_bos = keep_whitespace, adds_bos

    def encode(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text if self.keep_whitespace or not c.isspace()]
        return ([0] if add_special_tokens and self.adds_bos else []) + ids


def test_a_tokenizer_that_drops_whitespace_fails_the_engine_start():
    """transformers 5 loads 2.5's remote-code tokenizer without its pre-tokenizer (spaces and
    newlines vanish); the engine refuses such a tokenizer instead of sending mangled prompts."""
    from pipeline.engines.vllm import _check_whitespace_kept

    _check_whitespace_kept(_Tok(), "ckpt")
    with pytest.raises(ValueError, match="drops spaces or newlines.*Fix:"):
        _check_whitespace_kept(_Tok(keep_whitespace=False), "ckpt")


def test_the_templates_bos_is_left_out_only_where_the_tokenizer_adds_one():
    """Llama 3's template writes <|begin_of_text|> and its tokenizer adds one too: vLLM would get two."""
    from pipeline.engines.vllm import _bos_added_twice

    assert _bos_added_twice(_Tok(adds_bos=True)) == "<s>"
    assert _bos_added_twice(_Tok(adds_bos=False)) is None  # Qwen's tokenizers (2.6+)


@pytest.mark.parametrize("family,sep", [("minicpmv2_0", 0), ("minicpmv2_5", 1), ("minicpmv2_6", 1),
                                        ("minicpmv4_5", 1), ("minicpmv4_6", 0)])
def test_the_guard_counts_the_newline_after_each_placeholder(family, sep):
    """2.5-4.5 prompts are placeholder + "\\n" per image (clip): one token each that the guard adds."""
    from pipeline.guards import visual_tokens
    from pipeline.media.slicing import plan_image
    from pipeline.models import separator_tokens

    assert separator_tokens(family) == sep
    plans = [plan_image(family, 700, 500, image_index=k).placeholder_tokens for k in range(2)]
    assert visual_tokens(family, "image", 700, 500, 2) == sum(plans) + 2 * sep

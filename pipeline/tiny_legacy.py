"""Tiny checkpoints of MiniCPM-V 2.6 / 4.0 / 4.5 (the `trust_remote_code` generations), offline.

These generations have no transformers classes: the checkpoint directory carries its own config,
image processor and processor code. `build_tiny_legacy(version, out_dir)` writes such a directory
with *our* remote-code files (pipeline/remote_code/minicpmv/), a tiny config of the real
architecture (vLLM's `minicpmv` model: SigLIP/Idefics2 vision tower, resampler, Qwen2 / Llama /
Qwen3 text backbone dispatched on `version`), a byte-level BPE tokenizer with MiniCPM-V's markers
and a chat template. No weights are written: the directory is meant for vLLM with
`load_format="dummy"` (random weights), where it runs the real engine, real processing and the
real model code. Generated text is meaningless.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REMOTE_CODE_DIR = Path(__file__).with_name("remote_code") / "minicpmv"
REMOTE_CODE_FILES = ("configuration_minicpm.py", "image_processing_minicpmv.py", "processing_minicpmv.py")

CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Image markers of the MiniCPM-V vocabularies; <unk> is the visual-embedding slot vLLM fills.
MM_TOKENS = ("<unk>", "<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>",
             "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>")
THINK_TOKENS = ("<think>", "</think>")
# Attribute names the published MiniCPM-V tokenizers expose (tokenizer.im_start_id etc.).
NAMED_TOKENS = {"im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
                "im_id_start": "<image_id>", "im_id_end": "</image_id>", "ref_start": "<ref>", "ref_end": "</ref>",
                "box_start": "<box>", "box_end": "</box>", "quad_start": "<quad>", "quad_end": "</quad>",
                "point_start": "<point>", "point_end": "</point>"}

# ChatML with string content (the image placeholders are part of the user text). `enable_thinking`
# follows Qwen3 (4.5): an empty think block when thinking is off.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if think_block and not (enable_thinking is defined and enable_thinking) -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)
# Qwen2's pre-tokenizer split (digits one by one, so image ids are single tokens).
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CORPUS = """
The quick brown fox jumps over the lazy dog. Describe this image in detail. Extract all text from
the page as markdown, keeping headings, lists and tables. Convert the table to HTML. Summarise what
happens in this video clip. Invoice number 0123456789, date 2026-01-31, total 42. Answer in JSON.
"""


@dataclass(frozen=True)
class LegacyVersion:
    version: str  # config `version`, what vLLM dispatches on
    text_model_type: str  # backbone family (informational; vLLM picks it from `version`)
    think_block: bool  # chat template adds an empty <think> block (Qwen3-based 4.5)


VERSIONS: dict[str, LegacyVersion] = {
    "2.6": LegacyVersion("2.6", "qwen2", False),
    "4.0": LegacyVersion("4.0", "llama", False),
    "4.5": LegacyVersion("4.5", "qwen3", True),
}

_TEXT = {  # shrunk; vLLM's resampler uses hidden_size // 128 heads, so 128 is the smallest width
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
_VISION = {  # SigLIP as in the checkpoints (image_size 980 -> 70x70 position grid), shrunk
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 980,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
_QUERY_NUM = 64  # visual tokens per slice, as in the real 2.6 / 4.0 / 4.5
_SLICE = {"patch_size": 14, "max_slice_nums": 9, "scale_resolution": 448}


def _build_tokenizer(out: Path, think_block: bool) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    model = json.loads(tok.to_str())["model"]

    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
        # A bos token must exist (vLLM's copy of the upstream processor prepends it when tokenizing
        # its own copy of the prompt); prompts themselves get none, as with the real tokenizers.
        unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=dict(NAMED_TOKENS),
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in (*CHAT_TOKENS, *MM_TOKENS)],
                         special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE.replace("think_block", "true" if think_block else "false")
    tokenizer.save_pretrained(out)
    return tokenizer


def build_tiny_legacy(version: str, out_dir: str | Path) -> Path:
    """Write a tiny MiniCPM-V `version` ("2.6", "4.0" or "4.5") checkpoint directory; return it.

    Holds config.json (architectures MiniCPMV, `version`, flat tiny text config, SigLIP
    vision_config, query_num, slice_config, auto_map), generation_config.json, the tokenizer files
    with chat template, preprocessor_config.json (auto_map for AutoImageProcessor/AutoProcessor) and
    our three remote-code files. No weights: load it with vLLM `load_format="dummy"`.
    """
    try:
        spec = VERSIONS[version]
    except KeyError:
        raise ValueError(f"unknown legacy MiniCPM-V version {version!r}; allowed: {', '.join(VERSIONS)}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(out, spec.think_block)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*CHAT_TOKENS, *MM_TOKENS)}
    stop_ids = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    vocab_size = ((len(tokenizer) + 63) // 64) * 64

    config = {
        "architectures": ["MiniCPMV"],
        "model_type": "minicpmv",
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig"},
        "version": float(spec.version),
        **_TEXT,
        "vocab_size": vocab_size,
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": stop_ids,
        "pad_token_id": ids["<|endoftext|>"],
        "query_num": _QUERY_NUM,
        "image_size": 448,
        "patch_size": 14,
        "drop_vision_last_layer": False,
        "batch_vision_input": True,
        "use_image_id": True,
        "vision_batch_size": 16,
        "slice_mode": True,
        "slice_config": {"model_type": "minicpmv", **_SLICE},
        "vision_config": dict(_VISION),
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": stop_ids, "pad_token_id": ids["<|endoftext|>"], "do_sample": False}, indent=2) + "\n")

    preprocessor = {
        "image_processor_type": "MiniCPMVImageProcessor",
        "processor_class": "MiniCPMVProcessor",
        "auto_map": {"AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
                     "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor"},
        "max_slice_nums": _SLICE["max_slice_nums"],
        "scale_resolution": _SLICE["scale_resolution"],
        "patch_size": _SLICE["patch_size"],
        "use_image_id": True,
        "slice_mode": True,
        "image_feature_size": _QUERY_NUM,
        "norm_mean": [0.5, 0.5, 0.5],
        "norm_std": [0.5, 0.5, 0.5],
        "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
        "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>",
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / name, out / name)
    return out

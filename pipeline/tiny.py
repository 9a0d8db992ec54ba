"""Tiny random checkpoints of the real MiniCPM-V architectures, built offline in seconds.

`build_tiny(family, out_dir)` writes a directory that `AutoProcessor.from_pretrained` and
`AutoModelForImageTextToText.from_pretrained` load into the *real* transformers classes
(MiniCPMV4_6 / MiniCPMV4_7 / MiniCPMOcr with a Qwen3.5 hybrid text backbone). Only the sizes are
tiny and the weights random: the processor keeps its real defaults (scale_resolution 448,
patch_size 14, slicing, placeholders, image ids), so tests exercise the same code path as a real
checkpoint and catch errors such as images silently not attached. Generated text is meaningless.

Nothing is downloaded: the byte-level BPE tokenizer is trained on a built-in text with the
`tokenizers` library and the weights come from `model.save_pretrained` of a random init.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.models import check_transformers_version, get_family

# Special tokens of the real checkpoints (Qwen3.5 vocabulary plus MiniCPM-V's markers). The
# processors read the named ones as `tokenizer.<name>` / `tokenizer.<name>_id`, which in
# transformers 5 come from `extra_special_tokens` (a dict) in tokenizer_config.json.
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
NAMED_MM_TOKENS: dict[str, str] = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
# Qwen3.5 keeps <think>/</think> as added but *non-special* tokens (they survive decoding).
THINK_TOKENS = ("<think>", "</think>")

# Qwen-style chat template that renders each image content item to the image placeholder and each
# video item to the video placeholder; the processor then expands them into
# <image_id>N</image_id><image>...</image><slice>...</slice> runs. `enable_thinking` follows the
# Qwen3.5 convention (an empty think block when thinking is off).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|image_pad|>\\n' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|video_pad|>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{- '<think>\\n' -}}"
    "{%- else -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Training text for the BPE merges: enough words for a few hundred merges, nothing else matters.
_CORPUS = """
The quick brown fox jumps over the lazy dog. Describe this image in detail. Extract all text from
the page as markdown, keeping headings, lists and tables. Convert the table to HTML. Write formulas
as LaTeX. Summarise what happens in this video clip, frame by frame, with the people, objects,
actions and any text that appears on screen. Invoice number 0123456789, date 2026-01-31, total 42.
Figure 1 shows the results; Table 2 lists the parameters. Answer in JSON with keys title, author.
"""

_VISION = {  # SigLIP-style encoder, shrunk; patch_size must equal the processor's (14)
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 448,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
}
_TEXT = {  # Qwen3.5 hybrid (one full-attention and one gated-deltanet layer), shrunk
    "model_type": "qwen3_5_text",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    # partial_rotary_factor 0.25 -> 8 rotary dims -> 4 frequencies = sum(mrope_section)
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    "layer_types": ["full_attention", "linear_attention"],
    # vLLM's CPU gated-deltanet kernels accept only conv width 4 and linear head dims of 64/128
    # ("Unexpected block size, 2 x 64", "Unexpected head dim size, 32"); the real checkpoints use
    # 4 and 128, so these are the smallest values that run through both transformers and vLLM.
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}


def _train_tokenizer() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with the Qwen3.5 pre-tokenizer; return (vocab, merges)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        # Every byte is in the vocab, so any input (any language, any bytes) tokenizes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def _build_tokenizer() -> Any:
    """Build and save the tokenizer with every special token the processors read."""
    from tokenizers import AddedToken
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    vocab, merges = _train_tokenizer()
    tokenizer = Qwen3_5Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(NAMED_MM_TOKENS),
    )
    # Chat and multimodal markers are special (never split, dropped by skip_special_tokens).
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS], special_tokens=True)
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in NAMED_MM_TOKENS.values()], special_tokens=True
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _component_classes(model_type: str) -> tuple[type, type, type]:
    """The real (processor, image processor, video processor) classes for `model_type`."""
    from transformers import AutoConfig
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.models.auto.video_processing_auto import video_processor_class_from_name

    config_class = type(AutoConfig.for_model(model_type))
    processor_class = PROCESSOR_MAPPING[config_class]
    image_processor_class = get_image_processor_class_from_name(_IMAGE_PROCESSORS[model_type])
    video_processor_class = video_processor_class_from_name(_VIDEO_PROCESSORS[model_type])
    return processor_class, image_processor_class, video_processor_class


# 4.7 reuses the 4.6 image and video processors (see transformers' auto mappings).
_IMAGE_PROCESSORS = {
    "minicpmv4_6": "MiniCPMV4_6ImageProcessor",
    "minicpmv4_7": "MiniCPMV4_6ImageProcessor",
    "minicpm_ocr": "MiniCPMOcrImageProcessor",
}
_VIDEO_PROCESSORS = {
    "minicpmv4_6": "MiniCPMV4_6VideoProcessor",
    "minicpmv4_7": "MiniCPMV4_6VideoProcessor",
    "minicpm_ocr": "MiniCPMOcrVideoProcessor",
}


def build_tiny(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `family` to `out_dir` and return its path.

    The directory holds config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json (with chat template and named special tokens) and the processor configs,
    exactly as `save_pretrained` of the real classes writes them. Works with HF_HUB_OFFLINE=1.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    spec = get_family(family)
    if not spec.native_transformers:
        raise ValueError(f"{family} has no native transformers classes; build it with "
                         f"pipeline.tiny_legacy.build_tiny_legacy({spec.version!r}, dir) (vLLM, load_format dummy)")
    check_transformers_version(spec, transformers.__version__)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (*CHAT_TOKENS, *NAMED_MM_TOKENS.values())}
    stop_ids = [ids[t] for t in spec.stop_tokens]
    # Round the embedding table up so the random model can emit every token id, specials included.
    vocab_size = ((len(tokenizer) + 63) // 64) * 64

    text_config = dict(
        _TEXT,
        vocab_size=vocab_size,
        bos_token_id=None,
        eos_token_id=stop_ids,
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=spec.name == "minicpm_ocr",
    )
    config_kwargs: dict[str, Any] = dict(
        text_config=text_config,
        vision_config=dict(_VISION),
        # The window merger must run inside the (2-layer) vision encoder.
        insert_layer_id=0,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        downsample_mode=spec.downsample_mode,
        tie_word_embeddings=spec.name == "minicpm_ocr",
    )
    if spec.hf_model_type == "minicpmv4_7":
        # Canvas M-RoPE pins these marker tokens to the canvas corners; newline ends a slice row.
        newline = tokenizer.encode("\n", add_special_tokens=False)
        if len(newline) != 1:
            raise RuntimeError(f"newline must be one token, got {newline}")
        config_kwargs.update(
            image_start_id=ids["<image>"],
            image_end_id=ids["</image>"],
            slice_start_id=ids["<slice>"],
            slice_end_id=ids["</slice>"],
            newline_id=newline[0],
        )
    config = AutoConfig.for_model(spec.hf_model_type, **config_kwargs)

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=stop_ids,
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)

    processor_class, image_processor_class, video_processor_class = _component_classes(spec.hf_model_type)
    processor = processor_class(
        image_processor=image_processor_class(),
        video_processor=video_processor_class(),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out

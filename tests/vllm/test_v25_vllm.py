"""MiniCPM-Llama3-V 2.5 end to end through vLLM on CPU: a tiny checkpoint with the real 2.5 files.

The checkpoint is written at test time into a temporary directory from ../shared/reference: the
real 2.5 config.json (`version` "2.5", query_num 96, Idefics2/SigLIP vision_config, Llama-3 text
fields) with every width shrunk, the real image processor, processor and fast-tokenizer class files
and preprocessor_config.json (copied into the temporary checkpoint, as a hub download would place
them), and a tokenizer built from the real tokenizer_config.json: its chat template (Llama 3's,
with `bos_token` written by the template), its 256 special tokens in their order, bos/eos/pad/unk,
over a small trained byte-level BPE whose post-processor adds `<|begin_of_text|>` like Llama 3's
tokenizer.json. 2.5's configuration class lives in its modeling repository (not among the
reference files); the stand-in below is a LlamaConfig with an Idefics2 vision config, which is what
the published one is. No weights (`load_format="dummy"`): the text is meaningless, the prompt
format, stop tokens and token accounting are real.
Run: `flock /tmp/cpmv-ray.lock .venv-vllm/bin/python -m pytest tests/vllm/test_v25_vllm.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.engines.base import Request  # noqa: E402
from pipeline.engines.vllm import VLLMEngine  # noqa: E402
from pipeline.guards import check_unit  # noqa: E402
from pipeline.media.slicing import plan_image  # noqa: E402
from pipeline.models import detect_family  # noqa: E402
from tests.reference import reference_dir  # noqa: E402

CONFIG_CODE = """from transformers import LlamaConfig, PretrainedConfig
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig


class MiniCPMVSliceConfig(PretrainedConfig):
    model_type = "minicpmv"

    def __init__(self, patch_size=14, max_slice_nums=9, scale_resolution=448, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution


class MiniCPMVConfig(LlamaConfig):
    model_type = "minicpmv"

    def __init__(self, query_num=96, image_size=448, drop_vision_last_layer=False, batch_vision_input=True,
                 slice_config=None, vision_config=None, slice_mode=True, version=None, **kwargs):
        self.query_num = query_num
        self.image_size = image_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input
        self.slice_mode = slice_mode
        if version is not None:
            self.version = version
        self.slice_config = (slice_config if isinstance(slice_config, MiniCPMVSliceConfig)
                             else MiniCPMVSliceConfig(**(slice_config or {})))
        vision = dict(vision_config or {}) if not isinstance(vision_config, Idefics2VisionConfig) else vision_config
        if isinstance(vision, dict):
            vision.pop("model_type", None)
            vision = Idefics2VisionConfig(**vision)
        self.vision_config = vision
        super().__init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        for key in ("slice_config", "vision_config"):
            if isinstance(out.get(key), PretrainedConfig):
                out[key] = out[key].to_dict()
        return out
"""
CORPUS = ("Describe this image in detail. Two images. Extract all text. The quick brown fox jumps over "
          "the lazy dog. 0123456789\n")
# Llama 3's pre-tokenizer split (tokenizer.json of Meta-Llama-3; digits in runs of up to 3).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=4096)  # resampler heads: hidden_size // 128
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _tokenizer(ref: Path, out: Path) -> int:
    """Write the tokenizer files; return its length (base BPE + the real 256 special tokens)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    real = json.loads((ref / "v25_tokenizer_config.json").read_text())
    specials = [v["content"] for _, v in sorted(real["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))]
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS] * 4, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = real["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=real["eos_token"],
                                   unk_token=real["unk_token"], pad_token=real["pad_token"],
                                   chat_template=real["chat_template"])
    fast.save_pretrained(out)
    shutil.copyfile(ref / "v25_tokenization_minicpmv_fast.py", out / "tokenization_minicpmv_fast.py")
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(auto_map=real["auto_map"], tokenizer_class=real["tokenizer_class"])
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(fast)


def build_tiny_v25(out: Path) -> Path:
    """The tiny 2.5 checkpoint directory (see the module docstring)."""
    ref = reference_dir()
    out.mkdir(parents=True, exist_ok=True)
    vocab = (_tokenizer(ref, out) + 63) // 64 * 64
    config = json.loads((ref / "v25_config.json").read_text())
    config.update(TINY_TEXT, vocab_size=vocab)
    config["vision_config"].update(TINY_VISION)
    config["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMVConfig"}
    for key in ("bos_token_id", "eos_token_id"):  # the real ids (128000/128001) are outside the tiny vocab
        config.pop(key)
    (out / "configuration_minicpm.py").write_text(CONFIG_CODE)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "preprocessor_config.json").write_text((ref / "v25_preprocessor_config.json").read_text())
    shutil.copyfile(ref / "v25_image_processing_minicpmv.py", out / "image_processing_minicpmv.py")
    shutil.copyfile(ref / "v25_processing_minicpmv.py", out / "processing_minicpmv.py")
    return out


def test_2_5_runs_through_vllm_with_its_llama3_prompt_and_exact_counts(tmp_path: Path) -> None:
    path = build_tiny_v25(tmp_path / "v25")
    assert detect_family(path) == "minicpmv2_5"
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if not getattr(TokenizersBackend.convert_to_native_format.__func__, "_cpmv_keeps_json", False):
        # The transformers 5 fault the engine patches: 2.5's remote-code tokenizer class (it has its
        # own __init__) is rebuilt without its tokenizer.json pre-tokenizer. When this fails,
        # transformers fixed it and pipeline.engines.vllm._patch_remote_tokenizer_json can go.
        plain = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        assert plain.encode("a b\nc", add_special_tokens=False) == plain.encode("abc", add_special_tokens=False)
    eng = VLLMEngine(str(path), trust_remote_code=True, load_format="dummy", enforce_eager=True,
                     max_model_len=2048, max_images_per_prompt=2)
    try:
        tok = eng.tokenizer  # loaded through the engine's patch: spaces and newlines survive
        assert tok.decode(tok.encode("Two images.\nDescribe.", add_special_tokens=False)) == "Two images.\nDescribe."
        bos, eot, eos = (tok.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"))
        assert sorted(eng.stop_ids) == sorted([eot, eos])
        image, small = (np.random.default_rng(s).integers(0, 256, (h, w, 3), dtype=np.uint8)
                        for s, (h, w) in enumerate(((500, 700), (200, 300))))
        # The model card's chat(): the image then the question, joined by "\n", in a user turn of the
        # real Llama 3 chat template (which writes <|begin_of_text|> itself).
        card = tok.apply_chat_template([{"role": "user", "content": "(<image>./</image>)\nDescribe."}],
                                       tokenize=False, add_generation_prompt=True)
        assert card == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n(<image>./</image>)\n"
                        "Describe.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        request = Request("Describe.", [image], max_new_tokens=4)
        prompt = eng._prompt(request)
        # The tokenizer adds <|begin_of_text|> itself: the engine leaves the template's copy out, so
        # vLLM's prompt starts with exactly one (two would be Llama 3 with a doubled BOS).
        assert prompt["prompt"] == card[len("<|begin_of_text|>"):]
        (raw,) = eng.llm.generate([prompt], eng._sampling(request), use_tqdm=False)
        ids = list(raw.prompt_token_ids)
        assert ids[0] == bos and ids.count(bos) == 1, ids[:4]

        ok, two, tiny = eng.generate([
            request,
            Request("Two images.", [image, small], max_new_tokens=4),  # 2.5 takes several images
            Request("Tiny.", [image[:3, :50]], max_new_tokens=4),  # 3 px high: the processor would raise
        ])
        for reply in (ok, two):
            assert reply.error_type is None, reply.error_message
            assert 1 <= reply.completion_tokens <= 4 and reply.finish_reason in ("stop", "length")
        assert tiny.error_type is not None and "under 4 px" in tiny.error_message
        assert ok.prompt_tokens == len(ids)
        # What the context guard estimates (the text of the turn as the engine counts it, plus each
        # image's placeholder and the "\n" after it) is exactly what vLLM counted.
        for reply, text, sizes in ((ok, "Describe.", [(700, 500)]), (two, "Two images.", [(700, 500), (300, 200)])):
            planned = sum(plan_image("minicpmv2_5", w, h).placeholder_tokens + 1 for w, h in sizes)
            assert reply.prompt_tokens == eng.count_text_tokens(text) + planned, (reply.prompt_tokens, text, sizes)
        verdict = check_unit("minicpmv2_5", "image", 700, 500, 1, eng.count_text_tokens("Describe."), 4, 2048)
        assert verdict.ok and verdict.estimate.total == ok.prompt_tokens + 4, (verdict.estimate, ok.prompt_tokens)
    finally:
        eng.close()

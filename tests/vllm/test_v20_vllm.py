"""MiniCPM-V 2.0 end to end through vLLM on CPU: a tiny checkpoint with the real 2.0 remote code.

The checkpoint is written at test time into a temporary directory: the real 2.0 config (text model
shrunk to one layer; hidden_size 2304 and query_num 64 kept, which is how vLLM and our detection
tell 2.0), the real 2.0 image processor and processor files from ../shared/reference (copied into
the temporary checkpoint, as a hub download would place them), a small trained BPE tokenizer with
2.0's special tokens, no chat template and 2.0's im_start_id/im_end_id properties, and no weights (`load_format="dummy"`). vLLM builds 2.0's
real vision tower with timm (SigLIP so400m; random weights), so this is the slowest vLLM test here.
Needs .venv-vllm with timm: `flock /tmp/cpmv-ray.lock .venv-vllm/bin/python -m pytest tests/vllm/test_v20_vllm.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
pytest.importorskip("timm")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.engines.base import Request  # noqa: E402
from pipeline.engines.vllm import VLLMEngine  # noqa: E402
from pipeline.media.slicing import plan_image  # noqa: E402
from pipeline.models import detect_family  # noqa: E402
from tests.reference import reference_dir  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>",
            "</quad>", "<point>", "</point>", "<slice>", "</slice>", "<用户>", "<AI>"]
# 2.0's config class lives in its modeling repository (not among the reference files): a plain
# PretrainedConfig keeps every field of the real config.json and, like 2.0's, has no `version`.
CONFIG_CODE = """from transformers import PretrainedConfig


class MiniCPMVConfig(PretrainedConfig):
    model_type = "minicpmv"
"""
# 2.0's tokenizer (a sentencepiece LlamaTokenizer subclass) exposes im_start_id / im_end_id, which
# vLLM's MiniCPMVProcessor reads to bound the images; the stand-in has the same two properties.
TOKENIZER_CODE = """from transformers import PreTrainedTokenizerFast


class MiniCPMVTokenizerFast(PreTrainedTokenizerFast):
    @property
    def im_start_id(self):
        return self.convert_tokens_to_ids("<image>")

    @property
    def im_end_id(self):
        return self.convert_tokens_to_ids("</image>")
"""
CORPUS = "Describe this image in detail. Extract all text. The quick brown fox jumps over the lazy dog. 0123456789\n"


def _tokenizer(out: Path) -> int:
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS] * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS[:3],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                              show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", add_bos_token=True)
    fast.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[3:]], special_tokens=True)
    fast.save_pretrained(out)
    assert fast.chat_template is None  # like 2.0's tokenizer
    (out / "tokenization_minicpmv.py").write_text(TOKENIZER_CODE)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": [None, "tokenization_minicpmv.MiniCPMVTokenizerFast"]},
                  tokenizer_class="MiniCPMVTokenizerFast")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(fast)


def build_tiny_v20(out: Path) -> Path:
    ref = reference_dir()
    out.mkdir(parents=True, exist_ok=True)
    vocab = (_tokenizer(out) + 63) // 64 * 64
    config = json.loads((ref / "v20_config.json").read_text())
    config.update(num_hidden_layers=1, intermediate_size=256, vocab_size=vocab, max_position_embeddings=4096)
    config["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMVConfig"}
    (out / "configuration_minicpm.py").write_text(CONFIG_CODE)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "preprocessor_config.json").write_text((ref / "v20_preprocessor_config.json").read_text())
    shutil.copyfile(ref / "v20_image_processing_minicpmv.py", out / "image_processing_minicpmv.py")
    shutil.copyfile(ref / "v20_processing_minicpmv.py", out / "processing_minicpmv.py")
    return out


def test_2_0_runs_through_vllm_with_its_own_prompt_format(tmp_path: Path) -> None:
    path = build_tiny_v20(tmp_path / "v20")
    assert detect_family(path) == "minicpmv2_0"
    eng = VLLMEngine(str(path), trust_remote_code=True, load_format="dummy", enforce_eager=True,
                     max_model_len=2048, max_images_per_prompt=1)
    try:
        image = np.random.default_rng(0).integers(0, 256, (500, 700, 3), dtype=np.uint8)
        prompt = eng._prompt(Request("Describe.", [image], max_new_tokens=4))
        assert prompt["prompt"] == "<用户>(<image>./</image>)Describe.<AI>"
        replies = eng.generate([
            Request("Describe.", [image], max_new_tokens=4),
            Request("Two images.", [image, image], max_new_tokens=4),  # 2.0 takes one: an error row
            Request("Tiny.", [image[:3, :50]], max_new_tokens=4),  # 3 px high: the processor would raise
        ])
        ok, two, tiny = replies
        assert ok.error_type is None, ok.error_message
        assert 1 <= ok.completion_tokens <= 4
        plan = plan_image("minicpmv2_0", 700, 500)
        # <s> <用户> placeholder "Describe." <AI>: the visual part is exactly the plan's, and the text
        # part is what the engine counts for the context guard (with the <s> its tokenizer adds).
        text = len(eng.tokenizer.encode("<用户>Describe.<AI>"))
        assert eng.count_text_tokens("Describe.") == text
        assert ok.prompt_tokens == text + plan.placeholder_tokens, (ok.prompt_tokens, text, plan)
        assert two.error_type is not None and "at most 1 image" in two.error_message
        assert tiny.error_type is not None and "under 4 px" in tiny.error_message
    finally:
        eng.close()


def test_a_vllm_openai_server_cannot_render_2_0s_prompt() -> None:
    """Why engine.kind openai refuses 2.0 (pipeline.models' 2.0 note): vLLM 0.32's server renders every
    chat request with `safe_apply_chat_template`, which calls the tokenizer's `apply_chat_template`
    with conversation=, tools=, chat_template= and tokenize=. 2.0's real tokenizer class overrides
    that method as (conversation, add_image_msg): even with a chat template given (the server's
    --chat-template or a request's chat_template), every request fails as a validation error (HTTP
    400). The real method is bound to a minimal tokenizer object (2.0's sentencepiece model is not
    among the reference files)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers.hf import safe_apply_chat_template

    from tests.reference import load

    real = load("v20_tokenization_minicpmv").MiniCPMVTokenizer
    tokenizer = type("Tokenizer20", (), {
        "apply_chat_template": real.apply_chat_template, "name_or_path": "minicpmv2_0",
        "get_chat_template": lambda self, template, tools=None: template,
    })()
    conversation = [{"role": "user", "content": "(<image>./</image>)Describe."}]
    assert real.apply_chat_template(tokenizer, conversation) == "<用户>(<image>./</image>)Describe.<AI>"
    template = "{% for m in messages %}<用户>{{ m['content'] }}{% endfor %}<AI>"
    with pytest.raises(VLLMValidationError, match=r"apply_chat_template\(\) got an unexpected keyword argument 'tools'"):
        safe_apply_chat_template(None, tokenizer, conversation, chat_template=template, tokenize=False)

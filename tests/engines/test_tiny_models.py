"""Tiny random checkpoints of the real MiniCPM-V architectures through the transformers engine.

Each family is built once per module (seconds, offline), loaded with the real Auto classes and
run through `TransformersEngine.generate` with images that get sliced and a short video, checking
that the visual tokens really reach the prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in this module may touch the Hub

from pipeline.engines.base import Reply, Request  # noqa: E402
from pipeline.engines.transformers import TransformersEngine, pick_device  # noqa: E402
from pipeline.models import FAMILIES, detect_family  # noqa: E402
from pipeline.tiny import NAMED_MM_TOKENS, build_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {
    "minicpmv4_6": ("MiniCPMV4_6Processor", "MiniCPMV4_6ForConditionalGeneration"),
    "minicpmv4_7": ("MiniCPMV4_7Processor", "MiniCPMV4_7ForConditionalGeneration"),
    "minicpm_ocr": ("MiniCPMOcrProcessor", "MiniCPMOcrForConditionalGeneration"),
}
MAX_NEW = 8


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


NATIVE = sorted(name for name, spec in FAMILIES.items() if spec.native_transformers)


@pytest.fixture(scope="module", params=NATIVE)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, float]:
    family = request.param
    start = time.perf_counter()
    path = build_tiny(family, tmp_path_factory.mktemp(family))
    return family, path, time.perf_counter() - start


@pytest.fixture(scope="module")
def engine(tiny: tuple[str, Path, float]) -> TransformersEngine:
    family, path, _ = tiny
    eng = TransformersEngine(str(path), device="cpu")
    assert eng.family == family
    return eng


def test_build_is_complete(tiny: tuple[str, Path, float]) -> None:
    # How long a build takes is a benchmark's business, not a test's (no wall-clock assertions).
    family, path, _ = tiny
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "processor_config.json"} <= names
    assert detect_family(path) == family


def test_loads_with_real_auto_classes(tiny: tuple[str, Path, float]) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    family, path, _ = tiny
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert (type(processor).__name__, type(model).__name__) == CLASSES[family]

    tok = processor.tokenizer
    for name, token in NAMED_MM_TOKENS.items():
        assert getattr(tok, name) == token, name
    assert tok.image_token_id == model.config.image_token_id
    assert tok.video_token_id == model.config.video_token_id
    # The real processor defaults are kept (what the pipeline's slice/token estimates must match).
    ip = processor.image_processor
    assert (ip.scale_resolution, ip.patch_size, ip.max_slice_nums, ip.slice_mode) == (448, 14, 9, True)
    assert ip.downsample_mode == FAMILIES[family].downsample_mode
    assert model.config.vision_config.patch_size == ip.patch_size

    stops = [tok.convert_tokens_to_ids(t) for t in FAMILIES[family].stop_tokens]
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == stops

    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    assert rendered.startswith("<|im_start|>user\n<|image_pad|>\n<|video_pad|>\nHi<|im_end|>\n")
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_generate_images_and_video(engine: TransformersEngine) -> None:
    requests = [
        Request("Describe this image.", [_image(200, 300, 1)], max_new_tokens=MAX_NEW),
        Request("Describe this image.", [_image(700, 1000, 2)], max_new_tokens=MAX_NEW),  # sliced
        Request("Describe this clip.", [_image(240, 320, k) for k in range(4)], is_video=True,
                max_new_tokens=MAX_NEW),
        Request("Describe this image.", [], max_new_tokens=MAX_NEW),  # text-only baseline
    ]
    replies = engine.generate(requests)
    assert len(replies) == len(requests)
    for reply in replies:
        assert isinstance(reply, Reply)
        assert reply.error_type is None and reply.error_message is None, reply
        assert 1 <= reply.completion_tokens <= MAX_NEW
        assert reply.finish_reason in ("stop", "length")
        assert isinstance(reply.text, str)
    small, large, video, text_only = (r.prompt_tokens for r in replies)
    # Visual tokens really reached the prompt (the "images silently not attached" trap) ...
    assert small > text_only + 16 and video > text_only + 16
    # ... and the large image was sliced into more tokens than the small one.
    assert large > small


def test_bad_image_fails_alone(engine: TransformersEngine) -> None:
    replies = engine.generate([
        Request("ok", [_image(64, 64, 3)], max_new_tokens=2),
        Request("grey", [np.zeros((32, 32), dtype=np.uint8)], max_new_tokens=2),
        Request("floats", [np.zeros((32, 32, 3), dtype=np.float32)], max_new_tokens=2),
        Request("frames", [_image(32, 32, 4), _image(48, 32, 5)], is_video=True, max_new_tokens=2),
        Request("opts", [_image(64, 64, 6)], processor_kwargs={"slices": 4}, max_new_tokens=2),
    ])
    assert replies[0].error_type is None and replies[0].completion_tokens >= 1
    for reply in replies[1:]:
        assert reply.error_type == "ValueError" and reply.error_message and reply.text == ""


def test_preprocessing_failure_is_isolated(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # A failure the cheap checks cannot see (inside the processor) must not sink the batch.
    real = engine._preprocess

    def flaky(options, requests):  # type: ignore[no-untyped-def]
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("decoder exploded")
        return real(options, requests)

    monkeypatch.setattr(engine, "_preprocess", flaky)
    replies = engine.generate([
        Request("a", [_image(64, 64, 7)], max_new_tokens=2),
        Request("boom", [_image(64, 64, 8)], max_new_tokens=2),
        Request("c", [_image(64, 64, 9)], max_new_tokens=2),
    ])
    assert [r.error_type for r in replies] == [None, "RuntimeError", None]
    assert replies[1].error_message == "decoder exploded"


def test_template_that_drops_images_is_an_error(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # A chat template without image support must fail loudly, not answer without the image.
    text_only = "{% for m in messages %}{{ m['content'][-1]['text'] }}{% endfor %}"
    monkeypatch.setattr(engine.processor, "chat_template", text_only)
    reply = engine.generate([Request("x", [_image(64, 64, 14)], max_new_tokens=2)])[0]
    assert reply.error_type == "ValueError" and "placeholder" in (reply.error_message or "")


def test_per_request_options_and_budgets(engine: TransformersEngine) -> None:
    image = _image(300, 400, 10)
    base, no_id, four_x, short = engine.generate([
        Request("x", [image], max_new_tokens=MAX_NEW),
        Request("x", [image], max_new_tokens=MAX_NEW, processor_kwargs={"use_image_id": False}),
        Request("x", [image], max_new_tokens=MAX_NEW, processor_kwargs={"downsample_mode": "4x"}),
        Request("x", [image], max_new_tokens=1),
    ])
    assert no_id.prompt_tokens < base.prompt_tokens  # <image_id>0</image_id> dropped
    if engine.spec.downsample_mode == "16x":
        assert four_x.prompt_tokens > base.prompt_tokens  # 4x keeps 4x more visual tokens
    assert short.completion_tokens == 1 and short.finish_reason in ("stop", "length")
    assert short.prompt_tokens == base.prompt_tokens


def test_stop_and_length_accounting(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Random weights rarely emit a stop token, so script the generated ids to pin the accounting:
    # completion counts tokens up to and including the first stop, never the padding after it.
    import torch

    stop, pad, word = engine.stop_ids[0], engine.pad_id, 65
    scripted = [[word, word, stop, pad, pad, pad], [word] * 6, [word, stop, pad, pad, pad, pad]]

    def fake_generate(**inputs):  # type: ignore[no-untyped-def]
        new = torch.tensor(scripted[: inputs["input_ids"].shape[0]], dtype=inputs["input_ids"].dtype)
        return torch.cat([inputs["input_ids"], new], dim=1)

    monkeypatch.setattr(engine.model, "generate", fake_generate)
    replies = engine.generate([
        Request("a", [_image(64, 64, 11)], max_new_tokens=6),
        Request("b", [_image(64, 64, 12)], max_new_tokens=6),
        Request("c", [_image(64, 64, 13)], max_new_tokens=1),  # its own budget ends before the stop
    ])
    assert [(r.completion_tokens, r.finish_reason) for r in replies] == [(3, "stop"), (6, "length"), (1, "length")]
    assert replies[0].text == engine.tokenizer.decode([word, word]).strip()


def test_model_info(engine: TransformersEngine, tiny: tuple[str, Path, float]) -> None:
    info = engine.model_info()
    assert info["family"] == tiny[0] and info["engine"] == "transformers"
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert all(isinstance(v, str) for v in info.values())


def test_pick_device_and_lazy_imports() -> None:
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu")
    code = ("import sys, pipeline.engines.transformers, pipeline.tiny; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.strip() == "[]"


def test_legacy_families_are_refused_with_the_right_builder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="build_tiny_legacy\\('4.5'"):
        build_tiny("minicpmv4_5", tmp_path / "x")

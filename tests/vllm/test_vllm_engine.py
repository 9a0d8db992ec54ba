"""The vLLM engine on CPU with tiny MiniCPM-V 4.6 (native) and 4.5 (remote code) checkpoints.

Runs only where vLLM is installed (the second environment, scripts/setup_vllm_env.sh):
`.venv-vllm/bin/python -m pytest tests/vllm`. Real engine, real processors and model code, random
weights (`load_format="dummy"`): the text is meaningless, the token accounting is real.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the Hub

from pipeline.engines.base import Reply, Request, VideoStack  # noqa: E402
from pipeline.engines.vllm import VLLMEngine, generation  # noqa: E402
from pipeline.models import detect_family  # noqa: E402

MAX_NEW = 6
MAX_MODEL_LEN = 2048
FAMILIES = ("minicpmv4_6", "minicpmv4_5")


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _build(family: str, out: Path) -> Path:
    if family == "minicpmv4_5":
        from pipeline.tiny_legacy import build_tiny_legacy

        return build_tiny_legacy("4.5", out)
    from pipeline.tiny import build_tiny

    return build_tiny(family, out)


MAX_NUM_SEQS = 6  # not vLLM's default: the test below sees whether the setting reached the scheduler


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMEngine]:
    family = request.param
    path = _build(family, tmp_path_factory.mktemp(family))
    assert detect_family(path) == family
    start = time.perf_counter()
    eng = VLLMEngine(str(path), trust_remote_code=not generation(family).native, load_format="dummy",
                     enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_images_per_prompt=2, max_num_seqs=MAX_NUM_SEQS)
    print(f"\n{family}: engine start {time.perf_counter() - start:.1f}s")
    assert eng.family == family
    yield eng
    eng.close()


def _ok(reply: Reply) -> None:
    assert reply.error_type is None, reply.error_message
    assert 1 <= reply.completion_tokens <= MAX_NEW
    assert reply.finish_reason in ("stop", "length")


def test_batch_of_two_images(engine: VLLMEngine) -> None:
    big, small = _image(600, 900, 0), _image(200, 300, 1)
    text_only = engine.generate([Request("Describe the image.", max_new_tokens=MAX_NEW)])[0]
    start = time.perf_counter()
    replies = engine.generate([Request("Describe the image.", [big], max_new_tokens=MAX_NEW),
                               Request("Describe the image.", [small], max_new_tokens=MAX_NEW)])
    seconds = time.perf_counter() - start
    print(f"{engine.family}: batch of 2 in {seconds:.2f}s, {sum(r.completion_tokens for r in replies) / seconds:.1f} tok/s")
    _ok(text_only)
    for reply in replies:
        _ok(reply)
    # The images reached the model: visual tokens in the prompt, more for the image cut in slices.
    assert replies[1].prompt_tokens >= text_only.prompt_tokens + 64
    assert replies[0].prompt_tokens > replies[1].prompt_tokens


def test_overlong_prompt_is_an_error_reply_for_that_request_only(engine: VLLMEngine) -> None:
    image = _image(200, 300, 2)
    replies = engine.generate([
        Request("Describe.", [image], max_new_tokens=MAX_NEW),
        Request("word " * (MAX_MODEL_LEN + 100), [image], max_new_tokens=MAX_NEW),
        Request("Describe.", max_new_tokens=MAX_NEW),
    ])
    _ok(replies[0])
    assert replies[1].error_type is not None and "maximum context length" in replies[1].error_message
    assert replies[1].text == "" and replies[1].completion_tokens == 0
    _ok(replies[2])
    # The engine is still usable afterwards.
    _ok(engine.generate([Request("Again.", [image], max_new_tokens=MAX_NEW)])[0])


def test_bad_requests_are_error_replies(engine: VLLMEngine) -> None:
    image = _image(100, 120, 3)
    replies = engine.generate([
        Request("Describe.", [image.astype(np.float32)], max_new_tokens=MAX_NEW),
        Request(f"Spell {engine._image_token} here.", [image], max_new_tokens=MAX_NEW),
        Request("Describe.", [image], max_new_tokens=MAX_NEW, processor_kwargs={"colour": "red"}),
        Request("Describe.", [image], max_new_tokens=MAX_NEW),
    ])
    assert [r.error_type for r in replies[:3]] == ["ValueError", "ValueError", "ValueError"]
    _ok(replies[3])


def test_processor_options_per_request(engine: VLLMEngine) -> None:
    big = _image(600, 900, 4)
    default, one_slice = engine.generate([
        Request("Describe.", [big], max_new_tokens=MAX_NEW),
        Request("Describe.", [big], max_new_tokens=MAX_NEW, processor_kwargs={"max_slice_nums": 1}),
    ])
    _ok(default)
    if generation(engine.family).native:
        _ok(one_slice)
        assert one_slice.prompt_tokens < default.prompt_tokens
    else:
        # vLLM's `minicpmv` takes processor options per engine only (see VLLMEngine._options).
        assert one_slice.error_type == "ValueError" and "per engine" in one_slice.error_message


def test_video_frames(engine: VLLMEngine) -> None:
    frames = [_image(240, 320, 10 + k) for k in range(4)]
    two, four = engine.generate([
        Request("What happens?", frames[:2], is_video=True, max_new_tokens=MAX_NEW),
        Request("What happens?", frames, is_video=True, max_new_tokens=MAX_NEW),
    ])
    _ok(two)
    _ok(four)
    assert four.prompt_tokens > two.prompt_tokens


def test_stacked_clips_are_refused_alone(engine: VLLMEngine) -> None:
    """vLLM 0.32 sizes every frame of a video like its first: a 4.6 stack_frames clip (main frames plus
    larger composites) would get the wrong placeholders, so the request fails alone with the fix named."""
    frames = [_image(48, 64, 20 + k) for k in range(6)]  # a 3 s clip at stack_frames 2: 3 main + 3 sub
    stacked, plain = engine.generate([
        Request("What happens?", frames, is_video=True, max_new_tokens=MAX_NEW,
                stack=VideoStack(n=2, duration_s=3.0, max_num_frames=16)),
        Request("What happens?", frames[:3], is_video=True, max_new_tokens=MAX_NEW),
    ])
    assert stacked.error_type == "ValueError" and "engine.kind transformers" in stacked.error_message
    _ok(plain)


def test_max_num_seqs_reaches_the_scheduler(engine: VLLMEngine) -> None:
    """engine.vllm.max_num_seqs is vLLM's own per-step sequence cap (it was once accepted and dropped)."""
    assert engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == MAX_NUM_SEQS


def test_model_info(engine: VLLMEngine) -> None:
    info = engine.model_info()
    assert info["engine"] == "vllm" and info["family"] == engine.family and info["vllm_version"]


def test_guard_estimate_matches_the_engine(engine: VLLMEngine) -> None:
    """The prompt-length guard's estimate (tokenizer text count + slicing plan) is what vLLM counts."""
    from pipeline.guards import estimate_text_tokens, visual_tokens

    for h, w in ((200, 300), (600, 900)):
        reply = engine.generate([Request("Describe the image.", [_image(h, w, 7)], max_new_tokens=MAX_NEW)])[0]
        _ok(reply)
        text = estimate_text_tokens("Describe the image.", engine.count_text_tokens)
        visual = visual_tokens(engine.family, "image", w, h, 1)
        # The placeholder text the engine adds and its newline are not in the text-only count.
        assert abs(text + visual - reply.prompt_tokens) <= 8, (text, visual, reply.prompt_tokens)


def test_engine_reports_death() -> None:
    """VLLMEngine.dead is what InferStage checks before rebuilding it."""
    eng = VLLMEngine.__new__(VLLMEngine)
    eng._failed = None
    assert not eng.dead
    eng._failed = "EngineDeadError()"
    assert eng.dead
    with pytest.raises(RuntimeError, match="must be restarted"):
        eng.generate([Request("x")])


@pytest.mark.parametrize("version", ["2.6", "4.0"])
def test_older_remote_code_generations(version: str, tmp_path: Path) -> None:
    """2.6 (Qwen2) and 4.0 (Llama) run too; their resampler needs the CPU stream-capture patch."""
    from pipeline.tiny_legacy import build_tiny_legacy

    path = build_tiny_legacy(version, tmp_path / version)
    family = "minicpmv" + version.replace(".", "_")
    assert detect_family(path) == family
    eng = VLLMEngine(str(path), trust_remote_code=True, load_format="dummy", enforce_eager=True,
                     max_model_len=MAX_MODEL_LEN, max_images_per_prompt=1)
    try:
        reply = eng.generate([Request("Describe.", [_image(600, 900, 5)], max_new_tokens=MAX_NEW)])[0]
        _ok(reply)
        assert reply.prompt_tokens > 3 * 64  # overview plus slices of 64 query tokens each
    finally:
        eng.close()

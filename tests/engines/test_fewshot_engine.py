"""Few-shot examples and multi-image units through the transformers engine (tiny random 4.6 / 4.7 / OCR).

The prompt of a unit with examples is checked against the processor's own chat template (the
MiniCPM-V model card's few-shot layout: earlier user turns of image + question, assistant turns of
the answer) and its placeholder expansion against the pipeline's slicing plan, so that the prompt
guard and `cpmv inspect` count what the model sees. The engine stage reads each example image once
per actor (counted at `pipeline.storage.read_bytes`, the one read path of the pipeline).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.engines.base import Example, Request  # noqa: E402
from pipeline.engines.transformers import TransformersEngine  # noqa: E402
from pipeline.guards import visual_tokens  # noqa: E402
from pipeline.models import FAMILIES  # noqa: E402
from pipeline.tiny import build_tiny  # noqa: E402

NATIVE = sorted(name for name, spec in FAMILIES.items() if spec.native_transformers)
PROMPT = "What is the total?"


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=NATIVE)
def engine(request, tmp_path_factory) -> TransformersEngine:
    path = build_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return TransformersEngine(str(path), device="cpu", max_slice_nums=4)


def _request() -> Request:
    examples = [Example((_image(120, 90, 1),), PROMPT, "12.50"), Example((_image(900, 700, 2),), PROMPT, "7.00")]
    return Request(PROMPT, [_image(500, 640, 3)], max_new_tokens=3, examples=examples)


def test_examples_are_earlier_turns_in_the_processors_chat_template(engine: TransformersEngine) -> None:
    request = _request()
    # The model card's few-shot messages, rendered by the checkpoint's own template.
    card = []
    for ex in request.examples:
        card += [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
                 {"role": "assistant", "content": [{"type": "text", "text": ex.answer}]}]
    card.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]})
    reference = engine.processor.apply_chat_template(card, add_generation_prompt=True, tokenize=False,
                                                     enable_thinking=False)
    text = engine._render(request)
    assert text == reference
    # user(image, prompt) / assistant(answer) twice, then the unit's turn and the reply's start.
    token = re.escape(engine.processor.image_token)
    pattern = (rf"user\n{token}.*{PROMPT}.*assistant\n12\.50.*user\n{token}.*{PROMPT}.*assistant\n7\.00.*"
               rf"user\n{token}.*{PROMPT}.*assistant\n")
    assert re.search(pattern, text, re.S), text


def test_examples_images_expand_first_with_ids_in_order_and_the_plan_counts_them(engine: TransformersEngine) -> None:
    request = _request()
    options = engine._options(request)
    inputs = engine._preprocess(options, [request])
    ids = inputs["input_ids"][0].tolist()
    expanded = engine.tokenizer.decode(ids)
    # Image ids 0, 1 before the answers they precede, 2 for the unit's image (the processor's numbering).
    tags = [int(m) for m in re.findall(r"<image_id>(\d+)</image_id>", expanded)]
    assert tags == [0, 1, 2]
    assert expanded.index("<image_id>0") < expanded.index("12.50") < expanded.index("<image_id>1") \
        < expanded.index("7.00") < expanded.index("<image_id>2")
    # The guard's count for the whole prompt: every image, ids counting through them.
    sizes = [(90, 120), (700, 900), (640, 500)]
    planned = visual_tokens(engine.family, "image", None, None, 0, max_slice_nums=4, sizes=sizes,
                            downsample_mode=options.downsample_mode, use_image_id=True)
    text_only = engine.tokenizer(engine._render(request).replace(engine.processor.image_token, ""),
                                 add_special_tokens=False)["input_ids"]
    assert len(ids) - len(text_only) == planned


def test_examples_reach_the_model_and_batch_with_units_without_them(engine: TransformersEngine) -> None:
    with_examples = _request()
    plain = Request(PROMPT, [_image(500, 640, 3)], max_new_tokens=3)
    a, b = engine.generate([with_examples, plain])
    assert a.error_type is None and b.error_type is None, (a, b)
    assert a.prompt_tokens > b.prompt_tokens + 2 * 64  # two more images and turns


def test_multi_image_unit_sends_every_image(engine: TransformersEngine) -> None:
    one = Request(PROMPT, [_image(300, 200, 4)], max_new_tokens=2)
    two = Request(PROMPT, [_image(300, 200, 4), _image(200, 300, 5)], max_new_tokens=2)
    r1, r2 = engine.generate([one, two])
    assert r1.error_type is None and r2.error_type is None
    text = engine._render(two)
    assert text.count(engine.processor.image_token) == 2
    options = engine._options(two)
    extra = visual_tokens(engine.family, "image", None, None, 0, max_slice_nums=4, sizes=[(200, 300), (300, 200)],
                          downsample_mode=options.downsample_mode, use_image_id=True) - visual_tokens(
        engine.family, "image", None, None, 0, max_slice_nums=4, sizes=[(200, 300)],
        downsample_mode=options.downsample_mode, use_image_id=True)
    # The second image adds its placeholder tokens and the template's separator.
    assert r2.prompt_tokens - r1.prompt_tokens - extra in range(0, 3)


# -- the engine stage: examples read once per actor, page windows ------------------------------------


def _png(path: Path, h: int, w: int, seed: int) -> str:
    from PIL import Image

    Image.fromarray(_image(h, w, seed)).save(path)
    return str(path)


def _unit(i: int, frames: list[np.ndarray], tasks: list[str], pages: list[int] | None = None) -> dict:
    sizes = [[f.shape[1], f.shape[0]] for f in frames]
    return {"source_uri": f"/in/{i}.pdf", "source_id": f"s{i}", "size_bytes": 10, "media_type": "pdf",
            "tasks": tasks, "unit_index": i, "unit_kind": "page", "pixels": [f.tobytes() for f in frames],
            "width": sizes[0][0], "height": sizes[0][1], "num_frames": len(frames), "text_layer": None,
            "start_s": None, "end_s": None, "flags": [], "error_type": None, "error_message": None,
            "preprocess_ms": 1.0, "frame_sizes": sizes if len(frames) > 1 else None, "pages": pages}


def test_stage_reads_examples_once_per_actor_and_sends_page_windows(tmp_path, monkeypatch) -> None:
    from pipeline import storage
    from pipeline.config import load_job_data
    from pipeline.infer import InferStage, RunContext
    from pipeline.tasks import fingerprint, resolve_task
    from schemas.records import UNITS_SCHEMA, to_table

    ex1, ex2 = _png(tmp_path / "ex1.png", 80, 60, 11), _png(tmp_path / "ex2.png", 50, 70, 12)
    job = load_job_data({
        "input": {"uris": ["x"]}, "output": {"uri": str(tmp_path / "out")},
        "model": {"name": "tiny", "cache_dir": str(tmp_path / "cache"), "max_slice_nums": 2},
        "tasks": [{"name": "ocr", "max_new_tokens": 2},
                  {"name": "table", "max_new_tokens": 2,
                   "examples": [{"image": ex1, "answer": "| a |\n|---|\n| 1 |"}, {"image": ex2, "answer": ""}]}],
        "pdf": {"page_window": 2}, "checks": {"enabled": False},
    })
    tasks = {t.name: resolve_task(t) for t in job.tasks}
    assert tasks["table"].prompt_version.endswith("+fewshot2")
    ctx = RunContext("run", "tiny:minicpmv4_6", "minicpmv4_6", "transformers", tasks,
                     {n: fingerprint(t, job.model, "tiny:minicpmv4_6", job) for n, t in tasks.items()})
    reads: list[str] = []
    real = storage.read_bytes

    def counting(uri, *args, **kwargs):  # a spy on the real read: counts, then reads
        reads.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", counting)
    stage = InferStage(job, ctx)
    p0, p1, p2 = _image(200, 150, 1), _image(150, 200, 2), _image(200, 150, 3)
    batches = [
        [_unit(0, [p0], ["ocr"]), _unit(0, [p0, p1], ["table"], pages=[0, 1])],
        [_unit(1, [p1, p2], ["table"], pages=[1, 2]), _unit(2, [p2], ["table"], pages=[2])],
    ]
    rows = []
    for units in batches:
        rows += stage(to_table(units, UNITS_SCHEMA)).to_pylist()
    assert sorted(reads) == sorted([ex1, ex2])  # once per actor, not per unit or batch
    assert all(r["status"] == "ok" for r in rows), [(r["error_type"], r["error_message"]) for r in rows]
    by = {(r["unit_index"], r["task"]): r for r in rows}
    assert by[(0, "table")]["pages"] == [0, 1] and by[(1, "table")]["pages"] == [1, 2]
    assert by[(0, "ocr")]["pages"] is None
    # The window's second page and the two examples are in the prompt: more tokens than one page alone.
    assert by[(0, "table")]["prompt_tokens"] > by[(2, "table")]["prompt_tokens"] > by[(0, "ocr")]["prompt_tokens"]


def test_unreadable_example_makes_error_rows_not_a_crash(tmp_path) -> None:
    from pipeline.config import load_job_data
    from pipeline.examples import EXAMPLES_UNREADABLE
    from pipeline.infer import InferStage, RunContext
    from pipeline.tasks import resolve_task
    from schemas.records import UNITS_SCHEMA, to_table

    job = load_job_data({
        "input": {"uris": ["x"]}, "output": {"uri": str(tmp_path / "out")},
        "model": {"name": "tiny", "cache_dir": str(tmp_path / "cache"), "max_slice_nums": 2},
        "tasks": [{"name": "ocr", "max_new_tokens": 2},
                  {"name": "caption", "max_new_tokens": 2,
                   "examples": [{"image": str(tmp_path / "gone.png"), "answer": "a cat"}]}],
        "checks": {"enabled": False},
    })
    tasks = {t.name: resolve_task(t) for t in job.tasks}
    ctx = RunContext("run", "tiny:minicpmv4_6", "minicpmv4_6", "transformers", tasks, {"ocr": "f1", "caption": "f2"})
    rows = InferStage(job, ctx)(to_table([_unit(0, [_image(64, 64, 0)], ["ocr", "caption"])], UNITS_SCHEMA)).to_pylist()
    by = {r["task"]: r for r in rows}
    assert by["ocr"]["status"] == "ok"
    assert by["caption"]["status"] == "error" and by["caption"]["error_type"] == EXAMPLES_UNREADABLE
    assert "gone.png" in by["caption"]["error_message"]

"""Few-shot examples and multi-image units through vLLM (needs .venv-vllm).

* vLLM 0.32's own placeholder function (`MiniCPMVMultiModalProcessor.get_image_prompt_texts`, from
  ../shared/reference/vllm_0.32.0_minicpmv.py over the real remote-code image processors) expands the
  engine's 2.6/4.0/4.5 conversation: the i-th `(<image>./</image>)` with image_idx i. The guard's
  count of the whole prompt must be those tokens.
* The engine itself with tiny 4.6 (native) and 4.5 (remote code) checkpoints: a request with examples
  and a two-page unit runs, and vLLM's prompt count is the guard's estimate.
* The pipeline end to end (`cpmv run`, engine.kind vllm) over a real PDF with `pdf.page_window: 2` and
  a table task with examples.

`.venv-vllm/bin/python -m pytest tests/vllm/test_fewshot_vllm.py`
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.engines.base import Example, Request  # noqa: E402
from pipeline.engines.vllm import (LEGACY_IMAGE_PLACEHOLDER, VLLMEngine, conversation_turns,  # noqa: E402
                                   generation)
from pipeline.guards import estimate_text_tokens, visual_tokens  # noqa: E402
from tests.unit.test_reference_processors import count_tokens  # noqa: E402
from tests.vllm.test_reference_vllm import _processor  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Convert the table."
MAX_NEW = 4


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _request(example_sizes, unit_sizes) -> Request:
    examples = [Example((_image(h, w, k),), PROMPT, f"| a |\n|---|\n| {k} |") for k, (w, h) in enumerate(example_sizes)]
    return Request(PROMPT, [_image(h, w, 10 + k) for k, (w, h) in enumerate(unit_sizes)], max_new_tokens=MAX_NEW,
                   examples=examples)


@pytest.fixture(scope="module")
def vllm_minicpmv():
    from tests.reference import load

    return load("vllm_0.32.0_minicpmv", module_name="vllm.model_executor.models.cpmv_reference_minicpmv")


@pytest.mark.parametrize("family", ["minicpmv2_6", "minicpmv4_0", "minicpmv4_5"])
def test_vllm_expands_the_conversation_as_the_guard_counts(vllm_minicpmv, family):
    examples, unit = [(300, 200), (1200, 900)], [(640, 500), (500, 640)]  # a two-page unit
    request = _request(examples, unit)
    text = "".join(c if isinstance(c, str) else "" for _, c in conversation_turns(generation(family), request))
    assert text.count(LEGACY_IMAGE_PLACEHOLDER) == 4
    proc = _processor(vllm_minicpmv, family, 9)
    ImageSize = vllm_minicpmv.ImageSize
    # vLLM replaces the i-th placeholder of the prompt with image i's text (ids 0..3 in order).
    expanded = [proc.get_image_prompt_texts(ImageSize(width=w, height=h), i) for i, (w, h) in enumerate(examples + unit)]
    assert [f"<image_id>{i}</image_id>" in t for i, t in enumerate(expanded)] == [True] * 4
    ours = visual_tokens(family, "image", None, None, 0, max_slice_nums=9, use_image_id=True, sizes=examples + unit)
    assert ours == sum(count_tokens(t) for t in expanded)


def _build(family: str, out: Path) -> Path:
    if family == "minicpmv4_5":
        from pipeline.tiny_legacy import build_tiny_legacy

        return build_tiny_legacy("4.5", out)
    from pipeline.tiny import build_tiny

    return build_tiny(family, out)


@pytest.fixture(scope="module", params=["minicpmv4_6", "minicpmv4_5"])
def engine(request, tmp_path_factory):
    family = request.param
    eng = VLLMEngine(str(_build(family, tmp_path_factory.mktemp(family))), trust_remote_code=family == "minicpmv4_5",
                     load_format="dummy", enforce_eager=True, max_model_len=4096, max_images_per_prompt=4)
    yield eng
    eng.close()


def test_examples_and_two_page_units_run_and_the_guard_counts_them(engine):
    plain = _request([], [(300, 200)])
    full = _request([(120, 90), (400, 300)], [(300, 200), (200, 300)])
    r_plain, r_full = engine.generate([plain, full])
    for r in (r_plain, r_full):
        assert r.error_type is None, r.error_message
        assert 1 <= r.completion_tokens <= MAX_NEW
    opts = engine._options(full)

    def estimate(req: Request) -> int:
        sizes = [(im.shape[1], im.shape[0]) for im in req.all_images()]
        text = estimate_text_tokens(req.prompt, engine.count_text_tokens,
                                    tuple((ex.prompt, ex.answer) for ex in req.examples))
        return text + visual_tokens(engine.family, "image", None, None, 0, max_slice_nums=opts["max_slice_nums"],
                                    use_image_id=True, downsample_mode=opts.get("downsample_mode"), sizes=sizes)

    # vLLM's own count against the guard's: only the separator after each image placeholder is not
    # in the text-only count (one token per image at most).
    for req, reply in ((plain, r_plain), (full, r_full)):
        gap = reply.prompt_tokens - estimate(req)
        assert 0 <= gap <= len(req.all_images()), (engine.family, reply.prompt_tokens, estimate(req))
    assert r_full.prompt_tokens > r_plain.prompt_tokens + 3 * 64


JOB = """
name: fewshot-vllm
input: {{uris: ["{pdf}"]}}
output: {{uri: {out}}}
model: {{name: tiny, family: minicpmv4_5, trust_remote_code: true, cache_dir: {cache}}}
tasks:
  - name: ocr
    max_new_tokens: 3
  - name: table
    max_new_tokens: 3
    examples:
      - {{image: "{ex}", answer: "| item | price |\\n|---|---|\\n| tea | 2.00 |"}}
pdf: {{page_window: 2}}
engine:
  kind: vllm
  vllm: {{load_format: dummy, enforce_eager: true, max_model_len: 4096, cpu_kvcache_space_gib: 1}}
ray: {{num_cpus: 2}}
checks: {{enabled: false}}
"""


def test_pipeline_runs_page_windows_with_examples_through_vllm(tmp_path):
    import tempfile

    import pymupdf
    import pyarrow.parquet as pq
    from PIL import Image

    doc = pymupdf.open()
    for i in range(3):
        doc.new_page(width=400, height=300).insert_text((40, 40), f"| item | price |\n| row {i} | {i}.00 |")
    doc.save(tmp_path / "t.pdf")
    Image.fromarray(_image(120, 160, 1)).save(tmp_path / "ex.png")
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(pdf=tmp_path / "t.pdf", out=tmp_path / "out", cache=tmp_path / "cache",
                              ex=tmp_path / "ex.png"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp"),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = pq.read_table(tmp_path / "out" / "results").to_pylist()
    assert all(r["status"] == "ok" for r in rows), [(r["task"], r["error_message"]) for r in rows]
    table = sorted((r["unit_index"], r["pages"]) for r in rows if r["task"] == "table")
    assert table == [(0, [0, 1]), (1, [1, 2]), (2, [2])]
    ocr = {r["unit_index"]: r for r in rows if r["task"] == "ocr"}
    by = {r["unit_index"]: r for r in rows if r["task"] == "table"}
    assert sorted(ocr) == [0, 1, 2] and all(r["pages"] is None for r in ocr.values())
    # Two pages and the example's image: far more prompt tokens than the page alone.
    assert by[0]["prompt_tokens"] > by[2]["prompt_tokens"] > ocr[2]["prompt_tokens"]
    assert by[0]["prompt_version"] == "table-v1+fewshot1"

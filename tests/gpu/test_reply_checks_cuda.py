"""GPU checks of reply checks and `cpmv eval` (`pytest -m gpu`; deselected by default).

* The tiny model on CUDA: sampled retries at the schedule's temperatures, a real `reply_truncated`.
* `CPMV_GPU_CHECKPOINT=<dir or hub id>`: OCR of rendered text lines with a real checkpoint, scored
  with pipeline/evaluate.py; the figures go to `$CPMV_GPU_FIGURES` (default
  bench/results/gpu_eval.json). `CPMV_GPU_CHECKPOINT=tiny` runs the same path with the tiny random
  model (plumbing only: its CER means nothing, so no quality bound is asserted for it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
LINES = ["Invoice 2041 due 30 November 2026", "Total amount: 1,250.00 EUR", "Thank you for your business"]


@pytest.fixture(scope="module")
def cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


def _stage(tmp_path, name, tasks):
    from pipeline.config import load_job_data
    from pipeline.infer import InferStage, RunContext
    from pipeline.tasks import fingerprint, resolve_task

    job = load_job_data({"input": {"uris": ["x"]}, "output": {"uri": "o"},
                         "model": {"name": name, "cache_dir": str(tmp_path / "cache"), "max_slice_nums": 1},
                         "engine": {"kind": "transformers", "device": "cuda"}, "tasks": tasks})
    resolved = {t.name: resolve_task(t) for t in job.tasks}
    ctx = RunContext("gpu", name, "minicpmv4_6", "transformers", resolved,
                     {n: fingerprint(t, job.model, name) for n, t in resolved.items()})
    return InferStage(job, ctx)


def _units(images):
    from schemas.records import UNITS_SCHEMA, to_table

    return to_table([{"source_uri": f"/gpu/{i}.png", "source_id": f"g{i}", "size_bytes": 1, "media_type": "image",
                      "tasks": None, "unit_index": 0, "unit_kind": "image", "pixels": [im.tobytes()],
                      "width": im.shape[1], "height": im.shape[0], "num_frames": 1, "flags": [], "error_type": None,
                      "preprocess_ms": 0.0} for i, im in enumerate(images)], UNITS_SCHEMA)


def _text_image(line: str) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (896, 112), "white")
    ImageDraw.Draw(img).text((24, 30), line, fill="black", font=ImageFont.load_default(size=36))
    return np.asarray(img)


def test_tiny_model_retries_sample_on_cuda_then_reply_truncated(cuda, tmp_path):
    stage = _stage(tmp_path, "tiny", [{"name": "caption", "max_new_tokens": 3, "retries": 2,
                                       # same cap: with more tokens the greedy path may reach a stop token
                                       "retry_temperatures": [0.05, 0.1]}])
    cuda.manual_seed(0)  # seeds CUDA too; near-greedy retries; a 512-token vocabulary could still draw a stop token
    units = _units([np.random.default_rng(i).integers(0, 255, (64, 96, 3), dtype=np.uint8) for i in range(4)])
    units = units.set_column(units.schema.get_field_index("tasks"), "tasks", pa.array([["caption"]] * 4))
    rows = stage(units).to_pylist()
    assert len(rows) == 4
    # The greedy first replies run to the cap; a random model's bf16 logits are nearly flat, so even
    # temperature 0.05 changes the reply on CUDA and a retry may reach a stop token (seen on an H200).
    assert any(r["attempts"] > 1 for r in rows), rows
    for r in rows:
        if r["status"] == "error":
            assert r["error_type"] == "reply_truncated", r["error_message"]
            assert r["attempts"] == 3 and r["completion_tokens"] == 3 and "0, 0.05, 0.1" in r["error_message"]
        else:
            assert r["finish_reason"] == "stop" and r["text"].strip()
            assert len(r["retry_reasons"]) == r["attempts"] - 1


def test_checkpoint_ocr_scored_with_cpmv_eval(cuda, tmp_path):
    from pipeline.evaluate import evaluate

    name = os.environ.get("CPMV_GPU_CHECKPOINT")
    if not name:
        pytest.skip("set CPMV_GPU_CHECKPOINT to a MiniCPM-V 4.6 checkpoint (or `tiny` for the path alone)")
    stage = _stage(tmp_path, name, [{"name": "ocr", "max_new_tokens": 64, "retries": 2}])
    units = _units([_text_image(line) for line in LINES])
    units = units.set_column(units.schema.get_field_index("tasks"), "tasks", pa.array([["ocr"]] * len(LINES)))
    rows = stage(units).to_pylist()
    truth = [{"source_uri": f"/gpu/{i}.png", "unit_index": 0, "task": "ocr", "expected": line}
             for i, line in enumerate(LINES)]
    report = evaluate(rows, truth)
    report["checkpoint"] = name
    report["rows"] = [{k: r[k] for k in ("source_uri", "status", "error_type", "attempts", "retry_reasons", "text")}
                      for r in rows]
    out = Path(os.environ.get("CPMV_GPU_FIGURES", ROOT / "bench" / "results" / "gpu_eval.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report["overall"]))
    o = report["overall"]
    assert o["units"] == len(LINES) and o["text"]["cer"] is not None
    if name != "tiny":
        assert o["text"]["cer"] < 0.5, report["rows"]

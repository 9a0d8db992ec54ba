"""GPU checks: run only where CUDA exists (`pytest -m gpu`); deselected by default."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.engines.base import Request

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


@pytest.mark.parametrize("family", ["minicpmv4_6", "minicpmv4_7", "minicpm_ocr"])
def test_tiny_model_generates_on_cuda_in_bfloat16(cuda, family, tmp_path):
    from pipeline.engines.transformers import TransformersEngine
    from pipeline.tiny import build_tiny

    engine = TransformersEngine(str(build_tiny(family, tmp_path / family)), device="auto", dtype="auto")
    info = engine.model_info()
    assert info["device"].startswith("cuda") and info["dtype"] == "bfloat16"
    img = np.random.default_rng(0).integers(0, 255, (700, 1000, 3), dtype=np.uint8)
    replies = engine.generate([Request("Describe.", [img], max_new_tokens=8)] * 4)
    assert all(r.error_type is None and r.completion_tokens >= 1 for r in replies)

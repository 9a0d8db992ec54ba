"""Engine choice per family and cluster; clear errors when nothing can serve a job."""

import pytest

from pipeline.config import ConfigError
from pipeline.engines import factory


def test_auto_prefers_vllm_on_gpu_clusters(monkeypatch):
    monkeypatch.setattr(factory, "vllm_installed", lambda: True)
    assert factory.resolve_kind("auto", "minicpmv4_6", cluster_gpus=8) == "vllm"
    assert factory.resolve_kind("auto", "minicpmv4_6", cluster_gpus=0) == "transformers"
    # no vLLM model for MiniCPM-OCR 1.0 in vLLM 0.32: transformers serves it even on GPUs
    assert factory.resolve_kind("auto", "minicpm_ocr", cluster_gpus=8) == "transformers"
    assert factory.resolve_kind("auto", "minicpmv4_5", cluster_gpus=0) == "vllm"


def test_explicit_kind_must_serve_the_family(monkeypatch):
    monkeypatch.setattr(factory, "vllm_installed", lambda: True)
    with pytest.raises(ConfigError, match="MiniCPM-V 4.5 is served by vllm, openai"):
        factory.resolve_kind("transformers", "minicpmv4_5")
    with pytest.raises(ConfigError, match="MiniCPM-OCR 1.0 is served by transformers, openai"):
        factory.resolve_kind("vllm", "minicpm_ocr")
    # 2.0 through a vLLM OpenAI server: refused with the reason and the engine that serves it
    with pytest.raises(ConfigError, match=r"MiniCPM-V 2\.0 is served by vllm \(a vLLM OpenAI server cannot render"):
        factory.resolve_kind("openai", "minicpmv2_0")


def test_vllm_missing_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(factory, "vllm_installed", lambda: False)
    with pytest.raises(ConfigError, match="setup_vllm_env.sh"):
        factory.resolve_kind("vllm", "minicpmv4_6")
    with pytest.raises(ConfigError, match="vLLM is not installed"):
        factory.resolve_kind("auto", "minicpmv4_5")

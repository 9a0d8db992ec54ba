"""Where the engine is decided on a cluster: vLLM is looked for on a GPU worker, not on the driver.

Real local Ray; the GPU is a logical resource (`num_gpus=1` on a CPU machine), which is all Ray's
scheduler needs to place the probe task where an engine actor would go.
"""

from __future__ import annotations

import os
import tempfile

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_local(monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp"))
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray

    yield ray
    ray.shutdown()


def test_vllm_is_looked_for_on_a_gpu_worker(ray_local):
    from pipeline.config import ConfigError
    from pipeline.engines.factory import resolve_kind
    from pipeline.resources import vllm_on_gpu_workers

    ray_local.init(num_cpus=1, num_gpus=1, include_dashboard=False)
    assert vllm_on_gpu_workers(timeout_s=60) is False  # this test env has no vLLM, like a CPU image
    with pytest.raises(ConfigError, match="where the engine runs"):
        resolve_kind("vllm", "minicpmv4_6", 1.0, installed=vllm_on_gpu_workers)
    # `auto` on a cluster with a GPU but without vLLM there: transformers, not a crash on the head.
    assert resolve_kind("auto", "minicpmv4_6", 1.0, installed=vllm_on_gpu_workers) == "transformers"


def test_no_gpu_worker_in_time_is_a_message(ray_local):
    from pipeline.config import ConfigError
    from pipeline.resources import vllm_on_gpu_workers

    ray_local.init(num_cpus=1, num_gpus=0, include_dashboard=False)
    with pytest.raises(ConfigError, match="no GPU worker joined"):
        vllm_on_gpu_workers(timeout_s=3)

"""Resource wiring: what the planner asks Ray for, on small and GPU clusters."""

from pipeline.config import load_job_data
from pipeline.resources import WRITE_CPUS, plan_stages

BASE = {"input": {"uris": ["x"]}, "output": {"uri": "o"}}


def _total_cpus(plan):
    pre, inf = plan.preprocess, plan.infer
    return pre["compute"].min_size * pre["num_cpus"] + inf["compute"].min_size * inf["num_cpus"] + WRITE_CPUS


def test_two_core_machine_fits_every_stage():
    """Actors holding whole CPUs must leave room for write tasks, or the plan deadlocks."""
    plan = plan_stages(load_job_data(BASE), num_sources=100, resources={"CPU": 2.0})
    assert _total_cpus(plan) <= 2.0
    assert "num_gpus" not in plan.infer and plan.infer["batch_size"] == 4


def test_gpu_cluster_gets_one_gpu_per_replica_by_default():
    job = load_job_data({**BASE, "engine": {"replicas": 4, "batch_size": 16}})
    plan = plan_stages(job, num_sources=1000, resources={"CPU": 64.0, "GPU": 4.0})
    assert plan.infer["num_gpus"] == 1.0 and plan.infer["compute"].min_size == 4
    assert plan.preprocess["compute"].min_size == 64 - 4 - 1  # the rest of the cores preprocess
    assert plan.preprocess["num_cpus"] == 1.0


def test_fractional_gpus_and_explicit_preprocess_concurrency():
    job = load_job_data({**BASE, "engine": {"replicas": 2, "gpus_per_replica": 0.5},
                         "ray": {"preprocess_concurrency": 3}})
    plan = plan_stages(job, num_sources=10, resources={"CPU": 16.0, "GPU": 1.0})
    assert plan.infer["num_gpus"] == 0.5 and plan.preprocess["compute"].min_size == 3


def test_few_sources_few_actors():
    plan = plan_stages(load_job_data(BASE), num_sources=2, resources={"CPU": 32.0})
    assert plan.preprocess["compute"].min_size == 2 and plan.num_source_blocks == 2


def test_openai_engine_takes_no_gpu():
    job = load_job_data({**BASE, "engine": {"kind": "openai", "openai": {"base_url": "http://127.0.0.1:9"}}})
    plan = plan_stages(job, num_sources=10, resources={"CPU": 8.0, "GPU": 8.0}, engine="openai")
    assert "num_gpus" not in plan.infer


def test_tensor_parallel_replicas_get_placement_groups():
    job = load_job_data({**BASE, "engine": {"kind": "vllm", "replicas": 2, "vllm": {"tensor_parallel_size": 4}}})
    plan = plan_stages(job, num_sources=10, resources={"CPU": 64.0, "GPU": 8.0}, engine="vllm")
    assert "num_gpus" not in plan.infer and callable(plan.infer["ray_remote_args_fn"])
    assert plan.infer["compute"].min_size == 2


def test_local_ray_runs_the_replicas_it_can_hold(monkeypatch):
    """A cluster job file (8 replicas) on a 2-core laptop: 1 replica, not a wait forever for CPUs."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job = load_job_data({**BASE, "engine": {"replicas": 8}})
    plan = plan_stages(job, num_sources=10, resources={"CPU": 2.0})
    assert plan.infer["compute"].min_size == 1 and _total_cpus(plan) <= 2.0
    plan = plan_stages(job, num_sources=100, resources={"CPU": 16.0, "GPU": 2.0})
    assert plan.infer["compute"].min_size == 2  # two GPUs: two replicas of one GPU each
    # A joined cluster keeps the job's number: its autoscaler brings the nodes.
    joined = load_job_data({**BASE, "engine": {"replicas": 8}, "ray": {"address": "ray://head:10001"}})
    assert plan_stages(joined, num_sources=10, resources={"CPU": 2.0}).infer["compute"].min_size == 8
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert plan_stages(job, num_sources=10, resources={"CPU": 2.0}).infer["compute"].min_size == 8


def test_local_ray_without_the_gpus_a_job_pins_fails_fast(monkeypatch):
    import pytest

    from pipeline.config import ConfigError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job = load_job_data({**BASE, "engine": {"gpus_per_replica": 1}})
    with pytest.raises(ConfigError, match="gpus_per_replica"):
        plan_stages(job, num_sources=10, resources={"CPU": 2.0})
    assert plan_stages(job, num_sources=10, resources={"CPU": 8.0, "GPU": 1.0}).infer["num_gpus"] == 1

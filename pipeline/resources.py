"""The one place that turns a job's settings into Ray resources and starts or joins Ray.

Stages never choose their own CPUs, GPUs or concurrency: they receive the kwargs built here, so a
reader can see every resource decision of a job in this file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from pipeline.config import JobConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagePlan:
    """Ray Data kwargs of every stage."""

    num_source_blocks: int
    preprocess: dict[str, Any]
    infer: dict[str, Any]
    infer_batch_size: int
    write: dict[str, Any]


# Writing Parquet is I/O bound; a fraction of a CPU keeps write tasks from waiting behind actors
# that hold whole CPUs (on a 2-core machine that wait would be forever).
WRITE_CPUS = 0.25
#: Target size of a Ray Data block in this pipeline's plans (see init_ray).
BLOCK_BYTES = 8 * 2**20
#: Most sources in one input block of the expand stage (see plan_stages).
SOURCES_PER_BLOCK = 16


def ray_address(job: JobConfig) -> str | None:
    """The cluster to join: `ray.address`, else RAY_ADDRESS, else None (start a local Ray)."""
    return job.ray.address or os.environ.get("RAY_ADDRESS") or None


def init_ray(job: JobConfig, progress_bars: bool | None = None) -> None:
    """Join the configured cluster (job, then RAY_ADDRESS) or start a local one pinned to 127.0.0.1.

    `progress_bars`: Ray Data's per-operator bars (None: only when CPMV_PROGRESS=1).
    """
    address = ray_address(job)
    if address is None:
        # A local cluster must not bind the machine's external interface (Ray's default; with this
        # variable every node of a local cluster uses 127.0.0.1, tests/ray_cluster.py); it must be
        # set before ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address is not None:
        check_reachable(address)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address is None:
        kwargs["num_cpus"] = job.ray.num_cpus or os.cpu_count() or 1
        if job.ray.metrics_export_port:
            kwargs["_metrics_export_port"] = job.ray.metrics_export_port
    else:
        kwargs["address"] = address
    ray.init(**kwargs)
    ctx = __import__("ray.data", fromlist=["DataContext"]).DataContext.get_current()
    # Bars flood CI logs and kubectl logs: the CLI asks for them on a terminal only (pipeline/progress.py
    # logs a line every few seconds otherwise).
    if progress_bars is None:
        progress_bars = os.environ.get("CPMV_PROGRESS", "0") == "1"
    ctx.enable_progress_bars = progress_bars
    # Ray Data merges what a task yields into blocks of up to target_max_block_size (128 MiB by
    # default) and hands a block on only when it is full or the task ends. Units of small images
    # then travelled ~200 to a block, the engine stage answered a whole block per task, and the
    # driver saw no result of 800 sources until 694 were done (bench/resume.py): nothing could be
    # committed. Blocks of a few MiB keep results flowing to the commit windows; a large page is
    # one block either way.
    ctx.target_max_block_size = BLOCK_BYTES


#: How long `check_reachable` waits for a cluster's port to accept a connection.
CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within `timeout_s` when a `host:port` or `ray://host:port` address does not accept a TCP
    connection; `ray.init` itself keeps retrying an absent GCS for a minute or more with no word.

    `auto`/`local` are left to Ray (it reads the address of a cluster started on this machine and
    fails at once when there is none). Raises exits.ClusterUnreachable naming the address and the fix.
    """
    import socket
    from urllib.parse import urlsplit

    from pipeline.exits import ClusterUnreachable

    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port or (10001 if parts.scheme == "ray" else 6379)
    except ValueError:
        raise ClusterUnreachable(f"ray.address {address!r} is not host:port or ray://host:port") from None
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            # A port that accepts TCP but never speaks gRPC (a wrong port, a stuck proxy) hangs
            # ray.init for minutes. The GCS and the Ray Client server are gRPC (HTTP/2) servers, which
            # answer a client's connection preface with a SETTINGS frame (RFC 9113 section 3.4); grpcio
            # is not a Ray dependency, so these few bytes are written by hand.
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            head = sock.recv(9)
        why = None if len(head) == 9 and head[3] == 0x04 else "it does not answer as a Ray GCS or Ray Client server"
    except socket.timeout:
        why = "it accepts connections but does not answer as a Ray GCS or Ray Client server"
    except OSError as err:
        why = err.strerror or type(err).__name__
    if why is not None:
        raise ClusterUnreachable(
            f"Ray cluster at {address} is unreachable ({why}; waited at most {timeout_s:.0f} s): check "
            "ray.address / RAY_ADDRESS, or unset both to run on a local Ray"
        )


#: How long the vLLM check waits for a GPU worker (an autoscaled GPU node takes minutes to come up).
GPU_WORKER_WAIT_S = 1200.0


def vllm_on_gpu_workers(timeout_s: float = GPU_WORKER_WAIT_S) -> bool:
    """Whether vLLM is importable on a GPU worker of the joined cluster (a task asking for one GPU,
    so an autoscaler brings a GPU node up for it). The driver, on a CPU head or submitter pod, has no
    vLLM; the engine actors run where this task runs. Raises ConfigError when no GPU comes in time.
    """
    import importlib.util

    import ray

    from pipeline.config import ConfigError

    probe = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(lambda: importlib.util.find_spec("vllm") is not None)
    ref = probe.remote()
    try:
        return bool(ray.get(ref, timeout=timeout_s))
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise ConfigError(f"engine.kind vllm/auto: no GPU worker joined the cluster within {timeout_s:.0f} s; check "
                          "the GPU worker group (maxReplicas, node pool, nvidia.com/gpu quota)") from None


def cluster_resources() -> dict[str, float]:
    import ray

    return ray.cluster_resources()


def plan_stages(job: JobConfig, num_sources: int, resources: dict[str, float], engine: str = "transformers") -> StagePlan:
    """Decide CPU actor counts, engine pool size and per-actor resources from the job and the cluster."""
    cpus = int(resources.get("CPU", 1))
    gpus = float(resources.get("GPU", 0))
    e = job.engine
    tp = e.vllm.tensor_parallel_size if engine == "vllm" else 1
    if engine == "openai":
        gpus_per_replica = 0.0  # the server holds the GPUs; the actor only sends requests
    elif e.gpus_per_replica is not None:
        gpus_per_replica = e.gpus_per_replica
    else:
        gpus_per_replica = float(tp) if gpus >= 1 else 0.0
    replicas = e.replicas
    if ray_address(job) is None and gpus_per_replica > gpus:
        from pipeline.config import ConfigError

        # A local Ray never gains GPUs: the engine actors would wait forever, with no word.
        raise ConfigError(f"engine.gpus_per_replica is {gpus_per_replica:g} but the local Ray has {gpus:g} GPUs: "
                          "unset it (1 GPU per replica where the cluster has GPUs, else none), or join a GPU "
                          "cluster with --address / RAY_ADDRESS")
    if ray_address(job) is None:
        replicas = _local_replicas(e.replicas, e.cpus_per_replica, gpus_per_replica, cpus, gpus)
    if gpus_per_replica > 0 and gpus < gpus_per_replica * replicas:
        log.warning(
            "engine asks for %d replicas x %.2f GPU but the cluster has %.2f GPUs; replicas will wait for GPUs",
            replicas, gpus_per_replica, gpus,
        )
    # Leave the engine replicas and the writers their CPUs; the rest preprocess (at least one actor,
    # on a fraction of a CPU when the cluster is that small).
    free_cpus = max(0.5, cpus - replicas * e.cpus_per_replica - WRITE_CPUS)
    pre = job.ray.preprocess_concurrency or max(1, min(int(free_cpus), num_sources))
    pre_cpus = min(1.0, free_cpus / pre)
    from ray.data import ActorPoolStrategy

    infer: dict[str, Any] = {
        "compute": ActorPoolStrategy(size=replicas),
        "num_cpus": e.cpus_per_replica,
        "batch_size": e.batch_size,
    }
    # A dead engine process is restarted a bounded number of times (Ray Data's default is forever,
    # so an input that kills the process every time would loop). Its tasks are retried without a
    # count of their own: while a lost node is being declared dead (~15 s) every call fails fast
    # as "actor unavailable", which burnt a small retry budget in a second and failed the run
    # (tests/faults/test_durable_runs.py); the restart bound still ends a crash loop.
    # Ray 2.60 has no named parameter for max_restarts (Ray Data's own docs say to pass it as a
    # remote arg), so this one deprecated remote arg stays, its warning silenced in graph.py, and
    # pyproject pins ray below 2.64, where it would go. Ray Data sets max_task_retries=-1 itself
    # whenever max_restarts is not 0.
    infer["max_restarts"] = e.max_restarts
    if engine == "vllm":
        # Overlapping batches in each engine actor (pipeline/infer_async.py): enough calls in flight
        # to keep vLLM's scheduler full, so the engine never drains at a batch's longest reply.
        k = max(4, -(-e.vllm.max_num_seqs // e.batch_size))
        infer["compute"] = ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=2 * k,
                                             max_concurrent_calls_per_actor=k)
    if tp > 1 and gpus_per_replica > 0:
        # vLLM spreads one replica over `tp` GPUs with Ray workers of its own: the actor takes no GPU
        # itself and each replica gets a placement group of `tp` GPU bundles on one node.
        infer["ray_remote_args_fn"] = _tp_placement(tp, e.cpus_per_replica)
    elif gpus_per_replica > 0:
        infer["num_gpus"] = gpus_per_replica
    return StagePlan(
        # Several blocks per preprocess actor so one large PDF does not hold up the others, and at
        # most SOURCES_PER_BLOCK sources per block: a block is one task, whose output is complete
        # (committable) only when it ends.
        num_source_blocks=max(1, min(num_sources, max(pre * 4, -(-num_sources // SOURCES_PER_BLOCK)))),
        preprocess={"compute": ActorPoolStrategy(size=pre), "num_cpus": round(pre_cpus, 3)},
        infer=infer,
        infer_batch_size=e.batch_size,
        write={"num_cpus": WRITE_CPUS},
    )


def _local_replicas(replicas: int, cpus_per: float, gpus_per: float, cpus: float, gpus: float) -> int:
    """Engine replicas a local Ray (started by the run, never autoscaled) can hold at once.

    A job file written for a cluster (`engine.replicas: 8`) then runs on a laptop with fewer copies
    instead of waiting forever for CPUs or GPUs that will never come; on a joined cluster the job's
    number stands (an autoscaler adds the nodes).
    """
    fit = int((cpus - WRITE_CPUS - 0.5) // cpus_per)  # leave a writer and half a preprocess CPU
    if gpus_per > 0:
        fit = min(fit, int(gpus // gpus_per))
    fit = max(1, fit)
    if fit < replicas:
        log.warning("engine.replicas is %d but the local Ray (%g CPUs, %g GPUs) holds %d at a time: running %d "
                    "(on a cluster, set ray.address or RAY_ADDRESS)", replicas, cpus, gpus, fit, fit)
    return min(replicas, fit)


def _tp_placement(tp: int, cpus: float):
    """`ray_remote_args_fn` giving each engine actor its own placement group of `tp` GPUs (one node)."""

    def remote_args() -> dict[str, Any]:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = placement_group([{"CPU": cpus, "GPU": 1.0}] + [{"GPU": 1.0}] * (tp - 1), strategy="STRICT_PACK")
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)}

    return remote_args


def registry_options() -> dict[str, Any]:
    """Ray options of the run's content registry actor (input.dedup content; pipeline/dedup.py): no
    CPU reserved (one dict lookup per source, it must never wait behind the stages' actors), and no
    restarts: a restarted registry would have forgotten its claims (sources then infer themselves)."""
    return {"num_cpus": 0, "max_restarts": 0}

"""Engine selection: a table of constructors, not a chain of `if backend == ...`."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from pipeline.config import ConfigError, JobConfig
from pipeline.engines.base import Engine


def _transformers(job: JobConfig, model_dir: Path | None, family: str) -> Engine:
    from pipeline.engines.transformers import TransformersEngine

    m = job.model
    return TransformersEngine(
        str(model_dir), family=family, device=job.engine.device, dtype=m.dtype,
        trust_remote_code=m.trust_remote_code, max_slice_nums=m.max_slice_nums,
        use_image_id=m.use_image_id, downsample_mode=m.downsample_mode,
    )


def _vllm(job: JobConfig, model_dir: Path | None, family: str) -> Engine:
    from pipeline.engines.vllm import VLLMEngine
    from pipeline.examples import images_per_prompt

    m, v = job.model, job.engine.vllm
    return VLLMEngine(
        str(model_dir), family=family, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
        max_slice_nums=m.max_slice_nums, use_image_id=m.use_image_id, downsample_mode=m.downsample_mode,
        max_model_len=v.max_model_len, tensor_parallel_size=v.tensor_parallel_size,
        gpu_memory_utilization=v.gpu_memory_utilization, load_format=v.load_format,
        enforce_eager=v.enforce_eager, cpu_kvcache_space_gib=v.cpu_kvcache_space_gib,
        max_images_per_prompt=max(8, images_per_prompt(job)),  # few-shot examples and page windows
        max_num_seqs=v.max_num_seqs,
    )


def _openai(job: JobConfig, model_dir: Path | None, family: str) -> Engine:
    from pipeline.engines.openai_http import OpenAIEngine

    o = job.engine.openai
    return OpenAIEngine(
        base_url=o.base_url, model=o.served_model or job.model.name, api_key_env=o.api_key_env,
        concurrency=o.concurrency, timeout_s=o.timeout_s, max_retries=o.max_retries, family=family,
    )


ENGINES: dict[str, Callable[[JobConfig, Path | None, str], Engine]] = {
    "transformers": _transformers, "vllm": _vllm, "openai": _openai,
}
#: Engines that load the checkpoint themselves (the HTTP engine talks to a server that has it).
LOADS_WEIGHTS = {"transformers", "vllm"}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_kind(kind: str, family: str, cluster_gpus: float = 0.0,
                 installed: "Callable[[], bool] | None" = None) -> str:
    """The engine a job runs: `auto` is vLLM where GPUs and vLLM exist and vLLM serves the family,
    else transformers where it serves the family, else vLLM. Fails fast when nothing can serve it.

    `installed` says whether vLLM is importable where the engine runs: this process by default; on
    a cluster, the GPU workers (resources.vllm_on_gpu_workers), since the head and the driver run a
    CPU image without vLLM.
    """
    from pipeline.models import get_family

    installed = installed or vllm_installed

    spec = get_family(family)
    if not spec.engines:
        raise ConfigError(f"model: no engine serves {spec.display} yet: {spec.note}")
    if kind == "auto":
        if cluster_gpus > 0 and "vllm" in spec.engines and installed():
            kind = "vllm"
        elif "transformers" in spec.engines:
            kind = "transformers"
        else:
            kind = "vllm"
    if kind not in spec.engines:
        why = f" ({spec.note})" if spec.note else ""
        raise ConfigError(
            f"engine.kind {kind}: {spec.display} is served by {', '.join(spec.engines)}{why}; "
            f"set engine.kind to one of them"
        )
    if kind == "vllm" and not installed():
        raise ConfigError(
            "engine.kind vllm: vLLM is not installed where the engine runs; install the `vllm` extra (GPU nodes: "
            "the image's gpu target) or, for CPU tests, run scripts/setup_vllm_env.sh and use .venv-vllm"
        )
    return kind


def check_job(job: JobConfig, family: str, kind: str) -> None:
    """Job settings that only some generations or engines serve, checked once the engine is known."""
    from pipeline.media.stacking import STACK_FAMILIES
    from pipeline.models import check_thinking, check_use_image_id, get_family

    try:
        check_use_image_id(family, kind, job.model.use_image_id)
    except ValueError as err:
        raise ConfigError(f"engine.kind {kind}: {err}") from None
    from pipeline.examples import check_examples

    check_examples(job, family)
    try:
        check_thinking(family, [t.key for t in job.tasks if t.thinking])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if job.video.stack_frames > 1:
        if family not in STACK_FAMILIES:
            raise ConfigError(
                f"video.stack_frames={job.video.stack_frames}: {get_family(family).display} has no stacked-frame "
                f"video input (MiniCPM-V 4.6 and MiniCPM-OCR 1.0 have); set video.stack_frames: 1"
            )
        if kind != "transformers":
            raise ConfigError(
                f"video.stack_frames={job.video.stack_frames} needs engine.kind transformers: vLLM 0.32 sizes every "
                f"frame of a video like its first, and the per-second composites differ in size from the main "
                f"frames (engine.kind is {kind}); set engine.kind: transformers or video.stack_frames: 1"
            )


def make_engine(job: JobConfig, model_dir: Path | None, family: str, kind: str) -> Engine:
    """Build the (already resolved) engine `kind` over a local checkpoint directory."""
    return ENGINES[kind](job, model_dir, family)

"""Engine selection: a table of constructors, not a chain of `if backend == ...`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import JobConfig
from pipeline.engines.base import Engine


def _transformers(job: JobConfig, model_dir: Path, family: str) -> Engine:
    from pipeline.engines.transformers import TransformersEngine

    m = job.model
    return TransformersEngine(
        str(model_dir), family=family, device=job.engine.device, dtype=m.dtype,
        trust_remote_code=m.trust_remote_code, max_slice_nums=m.max_slice_nums,
        use_image_id=m.use_image_id, downsample_mode=m.downsample_mode,
    )


ENGINES: dict[str, Callable[[JobConfig, Path, str], Engine]] = {"transformers": _transformers}


def resolve_kind(kind: str) -> str:
    """`auto` picks the best engine present (vLLM joins this table in its own issue)."""
    return "transformers" if kind == "auto" else kind


def make_engine(job: JobConfig, model_dir: Path, family: str) -> Engine:
    """Build the job's engine over a local checkpoint directory."""
    return ENGINES[resolve_kind(job.engine.kind)](job, model_dir, family)

"""Builds the job's Ray Data plan, in one place: sources -> expand (CPU actors) -> engine pool.

The plan streams: expansion, inference and writing overlap, and no stage waits for the previous
one to finish over the whole corpus.
"""

from __future__ import annotations

import warnings
from typing import Any

from pipeline.config import JobConfig
from pipeline.expand import ExpandSource
from pipeline.infer import InferStage, RunContext
from pipeline.resources import StagePlan


def build_plan(job: JobConfig, sources: list[dict[str, Any]], ctx: RunContext, plan: StagePlan,
               pixel_budget: int, state_uri: str | None = None, dedup_registry: str | None = None) -> Any:
    """Return the (lazy) results stream for `sources` (rows with source_uri, source_id, size, tasks):
    blocks of schemas.records.STREAM_SCHEMA, result rows plus each source's end marker.

    `state_uri`: where preprocess workers record the units they were stopped on (pipeline/watchdog.py).
    `dedup_registry`: the run's content registry actor (input.dedup content; pipeline/dedup.py).
    """
    import ray.data

    ds = ray.data.from_items(sources, override_num_blocks=plan.num_source_blocks)
    return apply_stages(ds, job, ctx, plan, pixel_budget, state_uri, dedup_registry)


def apply_stages(ds: Any, job: JobConfig, ctx: RunContext, plan: StagePlan, pixel_budget: int,
                 state_uri: str | None = None, dedup_registry: str | None = None) -> Any:
    """The pipeline's stages (expand on CPU actors, then the engine pool) applied to a Ray Dataset of
    source rows (source_uri, source_id, size, tasks); the stream `build_plan` describes."""
    task_kinds = {name: sorted(t.unit_kinds) for name, t in ctx.tasks.items()}
    ds = ds.map_batches(
        ExpandSource,
        fn_constructor_kwargs={"job": job, "pixel_budget": pixel_budget, "task_kinds": task_kinds,
                               "family": ctx.family, "actor": True, "state_uri": state_uri,
                               "end_markers": True, "dedup_registry": dedup_registry},
        batch_size=1,  # one source per call: a slow PDF never holds up a batch of others
        batch_format="pyarrow",
        **plan.preprocess,
    )
    # vLLM gets the async stage (batches overlap inside the engine); other engines the plain one.
    stage = InferStage
    if ctx.engine == "vllm":
        from pipeline.infer_async import AsyncInferStage

        stage = AsyncInferStage
    with warnings.catch_warnings():
        # max_restarts (and, with tensor parallelism, ray_remote_args_fn) have no named parameter in
        # Ray 2.60; pipeline/resources.py says why they stay and pyproject.toml pins ray < 2.64.
        warnings.filterwarnings("ignore", message=r"`ray_remote_args(_fn)?` is deprecated")
        ds = ds.map_batches(
            stage,
            fn_constructor_kwargs={"job": job, "ctx": ctx},
            batch_format="pyarrow",
            **plan.infer,
        )
    return ds

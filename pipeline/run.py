"""Runs one job: check the model, discover sources, skip committed ones, run the plan, commit."""

from __future__ import annotations

import logging
import platform
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.config import ConfigError, JobConfig

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a run did, for the CLI's summary and the run record."""

    run_id: str
    output_uri: str
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    documents: list[dict[str, Any]] = field(default_factory=list)
    result_files: list[str] = field(default_factory=list)


def new_run_id(job: JobConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return job.run_id or f"{job.name}-{stamp}-{secrets.token_hex(2)}"


def resolve_family(job: JobConfig, storage_check: bool = True) -> str:
    """The job's family, or the one the checkpoint's config.json names (fails fast when unusable)."""
    from pipeline.model_source import ModelUnavailable, check_model
    from pipeline.models import family_from_config

    openai = job.engine.kind == "openai"
    if job.model.family != "auto" and (openai or not storage_check):
        return job.model.family  # the HTTP engine's server holds the weights, not us
    try:
        config = check_model(job.model, job.storage)
    except ModelUnavailable:
        if openai:
            raise ConfigError("engine.kind openai: set model.family (the server's checkpoint is not readable here)")
        raise
    if job.model.family != "auto":
        return job.model.family
    try:
        return family_from_config(config)
    except ValueError as err:
        raise ConfigError(f"model.name {job.model.name}: {err} (set model.family if it is one of these)") from None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("cpmv-batch", "ray", "pyarrow", "transformers", "torch", "pymupdf", "av", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def run_job(job: JobConfig) -> RunSummary:
    """Run `job` end to end and return its summary. Raises ConfigError/ModelUnavailable before any work."""
    from pipeline import resources, sink
    from pipeline.engines.factory import check_job, resolve_kind
    from pipeline.graph import build_plan
    from pipeline.infer import RunContext
    from pipeline.model_source import TINY
    from pipeline.models import get_family, pixel_budget
    from pipeline.sources import discover
    from pipeline.tasks import fingerprint, resolve_task

    t_start = time.perf_counter()
    started = datetime.now(timezone.utc)
    family = resolve_family(job)
    spec = get_family(family)
    # An explicit engine is checked now, before any listing; `auto` needs the cluster's GPUs (below).
    engine = None if job.engine.kind == "auto" else resolve_kind(job.engine.kind, family)
    if engine is not None:
        check_job(job, family, engine)
    model_id = f"tiny:{family}" if job.model.name == TINY else job.model.name
    tasks = {t.name: resolve_task(t) for t in job.tasks}
    fps = {name: fingerprint(t, job.model, model_id, job) for name, t in tasks.items()}
    run_id = new_run_id(job)

    sources = discover(job.input, job.storage)
    layout = sink.Layout(job.output.uri, job.storage)
    done = sink.committed(layout)
    todo: list[dict[str, Any]] = []
    for s in sources:
        need = [name for name in tasks if fps[name] not in done.get(s.source_id, ())]
        if need:
            todo.append({"source_uri": s.uri, "source_id": s.source_id, "size": s.size, "tasks": need})
    summary = RunSummary(run_id, job.output.uri)
    summary.counts.update(sources=len(sources), skipped_committed=len(sources) - len(todo), processed=len(todo))
    log.info("run %s: %d sources, %d already committed, %d to process",
             run_id, len(sources), len(sources) - len(todo), len(todo))
    t_plan = time.perf_counter()
    cluster: dict[str, float] = {}
    if todo:
        resources.init_ray(job)
        cluster = resources.cluster_resources()
    engine = engine or resolve_kind("auto", family, cluster.get("GPU", 0.0))
    check_job(job, family, engine)
    ctx = RunContext(run_id, model_id, family, engine, tasks, fps)
    if todo:
        plan = resources.plan_stages(job, len(todo), cluster, engine)
        budget = pixel_budget(spec, job.model.max_slice_nums or spec.image_max_slice_nums)
        ds = build_plan(job, todo, ctx, plan, budget)
        sink.write_results(ds, layout, run_id, job.output.rows_per_file, job.output.compression, plan.write)
    t_written = time.perf_counter()
    documents = sink.build_documents(layout, run_id, todo, fps, with_text=True)
    summary.documents = documents.to_pylist()
    _count(summary, documents)
    summary.timings.update(
        discover_s=round(t_plan - t_start, 3), pipeline_s=round(t_written - t_plan, 3),
    )
    record = {
        "run_id": run_id, "job": job.name, "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "model": {"name": model_id, "family": family, "display": spec.display, "engine": ctx.engine},
        "tasks": {n: {"prompt_version": t.prompt_version, "fingerprint": fps[n]} for n, t in tasks.items()},
        "counts": summary.counts, "timings": summary.timings, "versions": _versions(),
        # SecretStr fields dump as '**********': credentials never reach the run record.
        "config": job.model_dump(mode="json"),
    }
    # Always publish a run record, also when every source was already committed (an audit trail).
    summary.result_files = sink.commit(layout, run_id, documents, record)
    summary.timings["total_s"] = round(time.perf_counter() - t_start, 3)
    return summary


def _count(summary: RunSummary, documents: Any) -> None:
    c = summary.counts
    for d in documents.to_pylist():
        c[f"documents_{d['status']}"] = c.get(f"documents_{d['status']}", 0) + 1
        c["units"] = c.get("units", 0) + d["num_units"]
        c["results_ok"] = c.get("results_ok", 0) + d["results_ok"]
        c["results_failed"] = c.get("results_failed", 0) + d["results_failed"]

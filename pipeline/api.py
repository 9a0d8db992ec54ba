"""The Python API: run a job, or apply the pipeline's stages to a Ray Dataset of your own.

    from pipeline import load_job, run_job, process_dataset

    summary = run_job(load_job("jobs/demo.yaml", ["model.name=tiny"]))   # as `cpmv run` does
    results = process_dataset(ray.data.from_items([{"uri": "s3://b/a.pdf"}]), load_job("job.yaml"))

`process_dataset` is for notebooks and other pipelines (as `ray.data.llm` processors are): it reads
each URI, expands it into units (pages, images, tiles, clips) on CPU actors and runs the engine
pool over them, returning a lazy Dataset of results rows (schemas.records.RESULTS_SCHEMA). It
neither commits nor resumes: what to write, and where, is the caller's (`run_job` does both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import JobConfig, load_job, load_job_data
from pipeline.retry import RetryPolicy
from pipeline.stop import StopRequest

__all__ = ["load_job", "load_job_data", "run_job", "process_dataset"]

#: Stands in for the corpus size when sizing the preprocess pool of a Dataset of unknown length.
_UNKNOWN_SOURCES = 1_000_000


def run_job(job: JobConfig | str | Path, overrides: list[str] | None = None, retry: RetryPolicy | None = None,
            stop: StopRequest | None = None) -> Any:
    """Run a job (a JobConfig, or the path of a job file with `overrides`) end to end, as `cpmv run`.

    Returns the RunSummary (status complete, interrupted or failed; counts; timings). Raises
    ConfigError before any work for a job that cannot run, and the errors pipeline/exits.py lists.
    """
    from pipeline.run import run_job as _run

    if not isinstance(job, JobConfig):
        job = load_job(job, overrides)
    return _run(job, retry, stop)


def process_dataset(ds: Any, job: JobConfig, uri_column: str = "uri") -> Any:
    """Results rows for the URIs in `ds[uri_column]` (a ray.data.Dataset), lazily.

    Uses the job's model, engine, tasks and media settings; `job.input` and `job.output` are not
    used (give them any value). One row per unit and task, errors included as rows with status
    `error`; a URI that cannot be read becomes an error row, not an exception. Starts or joins Ray
    as `run_job` does (pipeline/resources.py).
    """
    from pipeline import resources
    from pipeline.engines.factory import check_job, resolve_kind
    from pipeline.graph import apply_stages
    from pipeline.infer import RunContext
    from pipeline.model_source import TINY
    from pipeline.models import get_family, pixel_budget
    from pipeline.run import resolve_family
    from pipeline.tasks import fingerprint, resolve_task
    from schemas.records import MARKER_KIND, NO_ROW_KIND, RESULTS_SCHEMA

    family = resolve_family(job)
    resources.init_ray(job)
    cluster = resources.cluster_resources()
    engine = resolve_kind(job.engine.kind, family, cluster.get("GPU", 0.0))
    check_job(job, family, engine)
    model_id = f"tiny:{family}" if job.model.name == TINY else job.model.name
    tasks = {t.key: resolve_task(t) for t in job.tasks}
    fps = {name: fingerprint(t, job.model, model_id, job) for name, t in tasks.items()}
    ctx = RunContext(job.run_id or job.name, model_id, family, engine, tasks, fps)
    plan = resources.plan_stages(job, _UNKNOWN_SOURCES, cluster, engine)
    spec = get_family(family)
    budget = pixel_budget(spec, job.model.max_slice_nums or spec.image_max_slice_nums)
    # The two light steps around the stages take a writer's fraction of a CPU (plan.write): at Ray's
    # default of 1 CPU they waited forever behind the actors on a 2-core machine.
    sources = ds.map(_SourceRow(job, uri_column, list(tasks)), **plan.write)
    stream = apply_stages(sources, job, ctx, plan, budget)
    return stream.map_batches(_results_only, batch_format="pyarrow", **plan.write,
                              fn_kwargs={"hidden": (MARKER_KIND, NO_ROW_KIND), "names": RESULTS_SCHEMA.names})


class _SourceRow:
    """A user's row -> the plan's source row (size and a source_id from the object's metadata)."""

    def __init__(self, job: JobConfig, column: str, tasks: list[str]):
        self.storage, self.column, self.tasks = job.storage, column, tasks

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from pipeline import sources, storage

        uri = str(row[self.column])
        try:
            info = storage.info(uri, self.storage)
        except Exception:  # noqa: BLE001 - unreadable: the expand stage turns it into an error row
            info = {}
        size = info.get("size")
        etag = sources._etag(info) if info else None
        mtime = sources._mtime(info) if info else None
        return {"source_uri": uri, "source_id": sources.source_id(uri, etag, size, mtime), "size": size,
                "tasks": self.tasks}


def _results_only(batch: Any, hidden: tuple[str, ...], names: list[str]) -> Any:
    """Drop the stream's internal rows (end markers) and columns."""
    import pyarrow.compute as pc

    keep = pc.invert(pc.is_in(batch.column("unit_kind"), value_set=__import__("pyarrow").array(list(hidden))))
    return batch.filter(keep).select(names)

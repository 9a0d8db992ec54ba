"""Runs one job: hold the prefix, recover a dead run's commit, skip what is published, stream, commit.

A run is a loop over the engine stage's output on the driver: rows are gathered into complete
sources (pipeline/collect.py), and complete sources are published in windows (pipeline/commit.py)
every `output.commit_every_s` seconds or `output.commit_every_units` units. A crash loses at most
one window; a stop request (SIGINT, SIGTERM: `StopRequest`) publishes what is complete and ends
the run as `interrupted`.
"""

from __future__ import annotations

import json
import logging
import platform
import queue
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.config import ConfigError, JobConfig, public_dump
from pipeline.retry import RetryPolicy
from pipeline.stop import StopRequest

log = logging.getLogger(__name__)

#: Sources looked up in the committed index at a time (bounds the driver's transient memory).
LOOKUP_CHUNK = 10_000
#: After a stop request, how long the driver waits for the block being computed before it stops Ray.
STOP_GRACE_S = 15.0


@dataclass
class RunSummary:
    """What a run did, for the CLI's summary and the run record."""

    run_id: str
    output_uri: str
    attempt: str = ""
    status: str = "complete"  # complete | interrupted | failed
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    documents: list[dict[str, Any]] = field(default_factory=list)  # the first documents rows, for the screen
    errors: dict[str, int] = field(default_factory=dict)  # failed result rows by error type
    flags: dict[str, int] = field(default_factory=dict)  # documents by flag (pdf_repaired, lost_units, ...)
    retried: dict[str, int] = field(default_factory=dict)  # re-run sources by the error type that made them
    message: str | None = None  # why a run failed or stopped
    reports: dict[str, str] = field(default_factory=dict)  # json/html -> URI of the run record and report


def new_attempt(job: JobConfig) -> tuple[str, str]:
    """(run_id, attempt): the attempt id is unique per start, also when the job fixes its run_id."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    token = secrets.token_hex(2)
    if job.run_id:
        return job.run_id, f"{job.run_id}-{stamp}-{token}"
    attempt = f"{job.name}-{stamp}-{token}"
    return attempt, attempt


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


def run_job(job: JobConfig, retry: RetryPolicy | None = None, stop: StopRequest | None = None,
            progress: Any = None, html: bool = True) -> RunSummary:
    """Run `job` end to end and return its summary (status complete, interrupted or failed).

    `progress`: pipeline.progress.ProgressOptions (default: auto); `html`: also write the HTML
    report beside the run record (pipeline/html_report.py).

    Raises ConfigError/ModelUnavailable before any work, PrefixBusy when another run holds the
    output prefix.
    """
    from pipeline import commit, outputs, resources, sink
    from pipeline.engines.factory import check_job, resolve_kind
    from pipeline.lease import Lease
    from pipeline.model_source import TINY
    from pipeline.models import get_family
    from pipeline.progress import ProgressLog, ProgressOptions
    from pipeline.runstats import RunStats
    from pipeline.structured import json_columns
    from pipeline.tasks import fingerprint, resolve_task

    retry = retry or RetryPolicy()
    progress = progress or ProgressOptions()
    stats = RunStats()
    meter = ProgressLog(stats, progress)
    stop = stop or StopRequest()
    t_start = time.perf_counter()
    started = datetime.now(timezone.utc)
    if (address := resources.ray_address(job)) is not None:
        resources.check_reachable(address)  # seconds, before any listing or lock
    outputs.check_output(job.output, job.storage)  # a missing bucket or refused credentials: before any work
    family = resolve_family(job)
    spec = get_family(family)
    # An explicit engine is checked now, before any listing; `auto` needs the cluster's GPUs (below).
    # On a cluster the engine runs on GPU workers, not here: whether vLLM is there is asked there,
    # once Ray is up (_stream); here only the family and the settings are checked.
    on_cluster = resources.ray_address(job) is not None
    engine = None if job.engine.kind == "auto" else resolve_kind(
        job.engine.kind, family, installed=(lambda: True) if on_cluster else None)
    if engine is not None:
        check_job(job, family, engine)
    model_id = f"tiny:{family}" if job.model.name == TINY else job.model.name
    tasks = {t.key: resolve_task(t) for t in job.tasks}
    fps = {name: fingerprint(t, job.model, model_id, job) for name, t in tasks.items()}
    run_id, attempt = new_attempt(job)
    layout = sink.Layout(job.output.uri, job.storage, tuple(job.output.partition_by))
    summary = RunSummary(run_id, job.output.uri, attempt)
    record: dict[str, Any] = {
        "run_id": run_id, "attempt": attempt, "job": job.name, "status": "running",
        "started_at": started.isoformat(), "finished_at": None,
        "model": {"name": model_id, "family": family, "display": spec.display, "engine": engine},
        "tasks": {n: {"prompt_version": t.prompt_version, "fingerprint": fps[n]} for n, t in tasks.items()},
        "retry_policy": retry.describe(), "counts": summary.counts, "timings": summary.timings,
        "errors": summary.errors, "flags": summary.flags, "retried": summary.retried, "versions": _versions(),
        # SecretStr fields and credential-like storage options are masked: credentials never reach the record.
        "config": public_dump(job),
    }
    with Lease(layout, attempt):
        _take_over(layout, attempt, summary)
        sink.check_partitioning(layout)  # before any work: a prefix keeps its partitioning
        work, rows = _plan_work(job, layout, fps, retry, summary)
        _write_record(layout, record)
        t_plan = time.perf_counter()
        publisher = commit.Publisher(layout, attempt, run_id, fps, job.output.compression,
                                     max_failed_unit_share=job.documents.max_failed_unit_share,
                                     min_rows_per_file=job.output.min_rows_per_file,
                                     rows_per_file=job.output.rows_per_file, rows=rows,
                                     json_columns=json_columns(tasks.values()))
        try:
            if work and not stop.is_set():
                record["model"]["engine"] = _stream(job, work, family, model_id, engine, tasks, fps, attempt,
                                                    layout, publisher, summary, stop, stats, meter, progress.bars)
            elif stop.is_set():
                summary.status = "interrupted"
        except BaseException as err:  # noqa: BLE001 - the record says how the run ended, then it re-raises
            summary.status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            summary.message = f"{type(err).__name__}: {err}"
            _finish(layout, record, summary, publisher, t_start, t_plan, work, stats, html)
            raise
        _finish(layout, record, summary, publisher, t_start, t_plan, work, stats, html)
    return summary


def _take_over(layout: Any, attempt: str, summary: RunSummary) -> None:
    """Roll forward a dead run's decided commit, then drop every dead run's staging and mark its record."""
    from pipeline import commit, storage

    rolled = commit.recover(layout)
    dead = commit.discard_staging(layout, keep=attempt)
    for name in dead:
        for uri in (layout.run_record(name), layout.legacy_run_record(name)):
            try:
                rec = json.loads(storage.read_bytes(uri, layout.storage, max_bytes=64 * 2**20))
                break
            except (FileNotFoundError, ValueError):
                continue
        else:
            continue
        if rec.get("status") == "running":
            rec["status"] = "abandoned"
            rec["abandoned_by"] = attempt
            storage.write_bytes(uri, json.dumps(rec, indent=2, default=str).encode(), layout.storage)
    if rolled or dead:
        log.info("took over from dead runs: %d commit(s) rolled forward, %d staging dir(s) removed",
                 len(rolled), len(dead))
    summary.counts.update(rolled_forward=len(rolled), dead_runs_cleaned=len(dead))


def _plan_work(job: JobConfig, layout: Any, fps: dict[str, str], retry: RetryPolicy,
               summary: RunSummary) -> tuple[dict[str, Any], Any]:
    """The sources this run processes (source_id -> SourceWork), looked up in chunks, and the
    manifest's per-row data (pipeline/rowdata.py RowData)."""
    from pipeline import sink
    from pipeline.collect import SourceWork
    from pipeline import rowdata
    from pipeline.sources import discover, read_manifest_table

    manifest = read_manifest_table(job.input.manifest, job.storage) if job.input.manifest else None
    sources = discover(job.input, job.storage, manifest=manifest)
    rows = rowdata.load(job.input, manifest, "the manifest")
    index = sink.CommittedIndex.load(layout)
    work: dict[str, SourceWork] = {}
    retried: Counter[str] = Counter()
    for i in range(0, len(sources), LOOKUP_CHUNK):
        chunk = sources[i:i + LOOKUP_CHUNK]
        states = index.lookup([s.source_id for s in chunk])
        for s in chunk:
            prompt, prompt_error = rows.prompt(s.manifest_row)
            own = {t: rowdata.row_fingerprint(fp, prompt) for t, fp in fps.items()}
            state = sink.with_legacy_commitments(states.get(s.source_id), own)
            need = sink.tasks_to_do(state, own, retry)
            if not need:
                continue
            if state is not None:
                for f in state["failures"] or []:
                    if f["task"] in need and retry.retries(f["error_type"]):
                        retried[f["error_type"]] += 1
            work[s.source_id] = SourceWork(s.uri, s.source_id, s.size, tuple(need), sink.prior_of(state),
                                           s.manifest_row, prompt, prompt_error, s.parts)
    summary.retried.update(retried)
    summary.counts.update(sources=len(sources), skipped_committed=len(sources) - len(work), processed=len(work),
                          retried_sources=sum(1 for w in work.values() if w.prior is not None))
    log.info("run %s: %d sources, %d already committed, %d to process (%d re-run: %s)", summary.attempt,
             len(sources), len(sources) - len(work), len(work), summary.counts["retried_sources"],
             dict(retried) or "new tasks")
    return work, rows


_END = object()


def _stream(job: JobConfig, work: dict[str, Any], family: str, model_id: str, engine: str | None,
            tasks: dict[str, Any], fps: dict[str, str], attempt: str, layout: Any, publisher: Any,
            summary: RunSummary, stop: StopRequest, stats: Any, meter: Any, bars: bool = False) -> str:
    """Run the plan and publish complete sources in windows; returns the engine kind used.

    When the plan fails (an engine actor out of restarts, Ray Data giving up on a task), the
    sources already complete stay and the plan is rebuilt for the others, `ray.plan_restarts`
    times, before the run ends as `failed`.
    """
    from pipeline import resources
    from pipeline.collect import Collector
    from pipeline.engines.factory import check_job, resolve_kind
    from pipeline.infer import RunContext
    from pipeline.sink import lost

    stats.start(len(work), {})  # the clock of progress and of the time series: Ray's start included
    resources.init_ray(job, progress_bars=bars)
    stop.reassert()  # ray.init replaces the SIGTERM handler
    from pipeline.metrics import RunMetrics

    metrics = RunMetrics.create(job.name)
    if metrics is not None:
        stats.listeners.append(metrics)
    cluster = resources.cluster_resources()
    if resources.ray_address(job) is not None and (engine or job.engine.kind) in ("vllm", "auto"):
        engine = resolve_kind(engine or "auto", family, cluster.get("GPU", 0.0), installed=resources.vllm_on_gpu_workers)
    engine = engine or resolve_kind("auto", family, cluster.get("GPU", 0.0))
    check_job(job, family, engine)
    ctx = RunContext(summary.run_id, model_id, family, engine, tasks, fps)
    dedup = job.input.dedup == "content"
    registry = None  # held for the run: the actor lives while this handle does
    if dedup:
        from pipeline.dedup import start_registry

        registry = start_registry(f"cpmv-dedup-{attempt}", resources.registry_options())
    collector = Collector(work, observe=stats.rows, dedup=dedup)
    window = _Window(publisher, job.output, summary, stats)
    remaining = dict(work)
    for restart in range(job.ray.plan_restarts + 1):
        failure = _run_plan(job, remaining, ctx, cluster, attempt, layout, collector, window, stop, meter,
                            dedup_registry=f"cpmv-dedup-{attempt}" if registry is not None else None)
        if failure is None or stop.is_set():
            break
        remaining = {sid: w for sid, w in remaining.items() if not collector.is_done(sid)}
        summary.counts["plan_restarts"] = restart + 1
        if restart < job.ray.plan_restarts and remaining:
            log.error("the pipeline failed (%s); rebuilding it for the %d sources not yet complete (%d of %d "
                      "restarts)", _short(failure), len(remaining), restart + 1, job.ray.plan_restarts)
            collector.forget_open()
            continue
        summary.status, summary.message = "failed", _short(failure)
        log.error("the pipeline failed: %s; published sources stay, the rest is redone by the next run",
                  summary.message)
    if stop.is_set():
        summary.status = "interrupted"
    if summary.status == "complete":
        drained = collector.drain()
        stats.sources_done(drained)
        window.add(drained)
        window.add([lost(w) for w in collector.never_seen()])
    summary.counts["duplicates_dropped"] = collector.duplicates
    if collector.dedup is not None:  # input.dedup content: copies made instead of inference
        book = collector.dedup
        summary.counts.update(dedup_sources=book.sources, dedup_rows_copied=book.rows, dedup_units_saved=book.units)
    summary.counts["unpublished_in_flight"] = collector.in_flight()
    window.flush()
    meter.tick(force=True)
    stats.queues({"results": 0, "open": collector.in_flight(), "window": 0}, force=True)
    if summary.status != "complete":
        _stop_ray()
    return engine


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:500]}"


class _Window:
    """Complete sources waiting for the next commit, and when to commit them."""

    def __init__(self, publisher: Any, out: Any, summary: RunSummary, stats: Any = None):
        self.publisher, self.out, self.summary, self.stats = publisher, out, summary, stats
        self.sources: list[Any] = []
        self.added: list[float] = []  # when each source joined the window (commit lag)
        self.units = self.rows = 0
        self.opened = time.monotonic()

    def add(self, sources: list[Any]) -> None:
        for src in sources:
            self.sources.append(src)
            self.added.append(time.monotonic())
            self.units += src.units
            self.rows += len(src.rows)

    def due(self) -> bool:
        o = self.out
        return bool(self.sources) and (self.units >= o.commit_every_units or self.rows >= o.rows_per_file
                                       or time.monotonic() - self.opened >= o.commit_every_s)

    def flush(self) -> None:
        t0 = time.monotonic()
        _publish(self.publisher, self.sources, self.out.commit_retry_s, self.summary)
        now = time.monotonic()
        if self.stats is not None and self.sources:
            self.stats.committed(now - t0, [now - t for t in self.added])
        self.sources, self.added, self.units, self.rows, self.opened = [], [], 0, 0, now


def _run_plan(job: JobConfig, work: dict[str, Any], ctx: Any, cluster: dict[str, float], attempt: str,
              layout: Any, collector: Any, window: _Window, stop: StopRequest, meter: Any,
              dedup_registry: str | None = None) -> BaseException | None:
    """One Ray Data plan over `work`, its output consumed on the driver; the plan's failure or None."""
    from pipeline import resources
    from pipeline.graph import build_plan
    from pipeline.models import get_family, pixel_budget

    plan = resources.plan_stages(job, len(work), cluster, ctx.engine)
    meter.stats.workers.update(preprocess=_pool_size(plan.preprocess), infer=_pool_size(plan.infer))
    if ctx.engine == "vllm":
        meter.stats.engine_busy_basis = "per-request latency of overlapping requests (an upper bound)"
    spec = get_family(ctx.family)
    budget = pixel_budget(spec, job.model.max_slice_nums or spec.image_max_slice_nums)
    ds = build_plan(job, [w.item() for w in work.values()], ctx, plan, budget,
                    state_uri=layout.staging(attempt, "timeouts"), dedup_registry=dedup_registry)
    # No prefetch: with 2, Ray 2.60 hands over a block only once two more are ready, which held
    # finished results back from the commit windows (bench/resume.py). The plan itself still runs
    # ahead; the queue only decouples the driver's commits from Ray's iterator.
    blocks: queue.Queue = queue.Queue(maxsize=8)

    def produce() -> None:
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                while not stop.is_set():
                    try:
                        blocks.put(block, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            blocks.put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the driver loop, which decides
            blocks.put(err)

    producer = threading.Thread(target=produce, name="cpmv-results", daemon=True)
    producer.start()
    failure: BaseException | None = None
    while not stop.is_set():
        try:
            item = blocks.get(timeout=0.5)
        except queue.Empty:
            item = None
        if item is _END:
            break
        if isinstance(item, BaseException):
            failure = item
            break
        if item is not None:
            done = collector.add(item)
            meter.stats.sources_done(done)
            window.add(done)
        if window.due():
            window.flush()
        meter.tick()
        meter.stats.queues({"results": blocks.qsize(), "open": collector.in_flight(), "window": len(window.sources)})
    if stop.is_set() or failure is not None:
        # Let the producer close Ray Data's iterator (it stops the plan's executor) before going on:
        # Ray Data threads that outlive Ray would start a new Ray instance to report their stats.
        producer.join(timeout=STOP_GRACE_S)
    return failure


def _pool_size(stage: dict[str, Any]) -> int:
    """Actors of a stage's ActorPoolStrategy (1 when the stage runs as tasks)."""
    return int(getattr(stage.get("compute"), "max_size", None) or 1)


def _publish(publisher: Any, window: list[Any], retry_s: float, summary: RunSummary) -> None:
    """Publish one window, retrying with backoff while the output store fails (bounded by retry_s)."""
    from pipeline import storage

    if not window:
        return
    deadline = time.monotonic() + retry_s
    delay = 1.0
    while True:
        try:
            stats = publisher.publish(window)
            break
        except Exception as err:  # noqa: BLE001 - the store is down: wait and retry, then give up
            if time.monotonic() + delay > deadline:
                raise
            log.warning("commit failed (%s); retrying in %.0f s", storage.redact(err), delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    log.info("committed %s: %d sources, %d result rows", stats.stem, stats.sources, stats.rows)


def _stop_ray() -> None:
    """Stop the plan's work (actors, tasks) when the run ends early."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception as err:  # noqa: BLE001
        log.warning("stopping Ray failed: %s", err)


def _write_record(layout: Any, record: dict[str, Any]) -> None:
    from pipeline import storage

    storage.write_bytes(layout.run_record(record["attempt"]), json.dumps(record, indent=2, default=str).encode(),
                        layout.storage)


def _finish(layout: Any, record: dict[str, Any], summary: RunSummary, publisher: Any, t_start: float,
            t_plan: float, work: dict[str, Any], stats: Any = None, html: bool = True) -> None:
    """Final counts and the run record (status complete, interrupted or failed); drop this run's staging."""
    from pipeline import storage

    c = summary.counts
    c.update({k: v for k, v in publisher.counts.items()})
    summary.errors.update(publisher.errors)
    summary.flags.update(publisher.flags)
    summary.documents = publisher.shown
    summary.timings.update(discover_s=round(t_plan - t_start, 3), pipeline_s=round(time.perf_counter() - t_plan, 3),
                           total_s=round(time.perf_counter() - t_start, 3))
    record.update(status=summary.status, message=summary.message,
                  finished_at=datetime.now(timezone.utc).isoformat())
    if stats is not None:
        record.update(stats.report(summary.timings["pipeline_s"], summary.timings["discover_s"], summary.retried,
                                   summary.counts))
    try:
        _write_record(layout, record)
        summary.reports["json"] = layout.run_record(record["attempt"])
        storage.rm(layout.staging(summary.attempt), layout.storage, recursive=True)
    except Exception as err:  # noqa: BLE001 - the record is best effort when the store is down
        log.warning("could not write the run record: %s", storage.redact(err, layout.storage))
    if html:
        try:
            from pipeline.html_report import write_html

            summary.reports["html"] = write_html(layout, record)
        except Exception as err:  # noqa: BLE001 - a report that cannot be drawn never fails the run
            log.warning("could not write the HTML report: %s", storage.redact(err, layout.storage))

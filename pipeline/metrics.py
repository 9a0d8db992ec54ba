"""Prometheus metrics of a run, through Ray's metrics API (`ray.util.metrics`).

Ray exports them with every other Ray metric on each node's metrics endpoint
(`http://<node>:<metrics_export_port>/metrics`; a local cluster's port is `ray.metrics_export_port`,
a KubeRay pod's is the operator's, 8080 by default), with the prefix `ray_`, so a Prometheus that
scrapes Ray already has them (Ray adds its own labels: SessionName, NodeAddress, WorkerId). The driver records them, as it receives the result rows (pipeline/
runstats.py calls the `on_*` hooks); the dashboard in infra/grafana-cpmv.json plots them.

Names as exported (counters get `_total`), all tagged `cpmv_job` (the job's name):

| metric | type | tags | meaning |
|---|---|---|---|
| ray_cpmv_units_total | counter | kind | units done (page, image, clip; tiles count apiece) |
| ray_cpmv_frames_total | counter | | video frames in the clips done |
| ray_cpmv_results_total | counter | task, status | result rows (ok, error, skipped) |
| ray_cpmv_errors_total | counter | stage, error_type | error rows (stage: preprocess or infer) |
| ray_cpmv_prompt_tokens_total | counter | | prompt tokens of ok model replies |
| ray_cpmv_completion_tokens_total | counter | | output tokens of ok model replies |
| ray_cpmv_sources_done_total | counter | | sources whose every row arrived |
| ray_cpmv_sources_planned | gauge | | sources this run processes |
| ray_cpmv_queue_depth | gauge | queue | blocks waiting for the driver (results), sources in flight (open), complete sources waiting for a commit (window) |
| ray_cpmv_engine_occupancy | gauge | | engine busy fraction over the last TICK_S seconds (per replica) |
| ray_cpmv_windows_committed_total | counter | | commit windows published |
| ray_cpmv_commit_lag_seconds | histogram | | a source's wait from completion to its commit |

Metrics are best effort: if Ray's metrics API is unavailable (a minimal Ray install) the run goes on
without them, with one warning.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)

#: Least seconds between two updates of the gauges.
TICK_S = 5.0
LAG_BOUNDARIES = [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600]


class RunMetrics:
    """The run's Ray metrics; create after Ray is initialised (`create`)."""

    def __init__(self, job: str):
        from ray.util.metrics import Counter as RayCounter
        from ray.util.metrics import Gauge, Histogram

        # Not `job`: Prometheus sets its own `job` label on every scraped series (the exported one
        # would be renamed `exported_job`).
        self.tags = {"cpmv_job": job}
        j = ("cpmv_job",)
        self.units = RayCounter("cpmv_units", "Units done, by kind", tag_keys=j + ("kind",))
        self.frames = RayCounter("cpmv_frames", "Video frames in the clips done", tag_keys=j)
        self.results = RayCounter("cpmv_results", "Result rows, by task and status", tag_keys=j + ("task", "status"))
        self.errors = RayCounter("cpmv_errors", "Error rows, by stage and error type",
                                 tag_keys=j + ("stage", "error_type"))
        self.prompt = RayCounter("cpmv_prompt_tokens", "Prompt tokens of ok model replies", tag_keys=j)
        self.completion = RayCounter("cpmv_completion_tokens", "Output tokens of ok model replies", tag_keys=j)
        self.sources = RayCounter("cpmv_sources_done", "Sources whose every result row arrived", tag_keys=j)
        self.planned = Gauge("cpmv_sources_planned", "Sources this run processes", tag_keys=j)
        self.queue = Gauge("cpmv_queue_depth", "Items waiting, by queue (results, open, window)",
                           tag_keys=j + ("queue",))
        self.occupancy = Gauge("cpmv_engine_occupancy", "Engine busy fraction over the last interval", tag_keys=j)
        self.windows = RayCounter("cpmv_windows_committed", "Commit windows published", tag_keys=j)
        self.lag = Histogram("cpmv_commit_lag_seconds", "Seconds from a source's completion to its commit",
                             boundaries=LAG_BOUNDARIES, tag_keys=j)
        self._last_tick = -TICK_S
        self._last_busy = (0.0, 0.0)  # (t, engine busy seconds) at the last tick

    @classmethod
    def create(cls, job: str) -> "RunMetrics | None":
        try:
            return cls(job)
        except Exception as err:  # noqa: BLE001 - metrics never stop a run
            log.warning("Prometheus metrics are off: %s", err)
            return None

    def _inc(self, metric: Any, counts: Counter, keys: tuple[str, ...]) -> None:
        # One call per distinct tag set: a call per row would cost the driver more than the row.
        for values, n in counts.items():
            if n:
                metric.inc(n, tags={**self.tags, **dict(zip(keys, values))})

    def on_rows(self, stats: Any, rows: list[dict[str, Any]], new_units: list[bool]) -> None:
        kinds: Counter = Counter()
        results: Counter = Counter()
        errors: Counter = Counter()
        prompt = completion = frames = 0
        for r, new in zip(rows, new_units):
            results[(r["task"], r["status"])] += 1
            if new and r["unit_index"] >= 0:
                kinds[(r["unit_kind"],)] += 1
                if r["unit_kind"] == "clip":
                    frames += r["num_frames"] or 0
            if r["status"] == "error":
                stage = "infer" if r["infer_ms"] is not None else "preprocess"
                errors[(stage, r["error_type"] or "unknown")] += 1
            elif r["status"] == "ok" and r["output_source"] == "model":
                prompt += r["prompt_tokens"] or 0
                completion += r["completion_tokens"] or 0
        self._inc(self.units, kinds, ("kind",))
        self._inc(self.results, results, ("task", "status"))
        self._inc(self.errors, errors, ("stage", "error_type"))
        for metric, n in ((self.prompt, prompt), (self.completion, completion), (self.frames, frames)):
            if n:
                metric.inc(n, tags=self.tags)

    def on_sources(self, stats: Any, n: int) -> None:
        if n:
            self.sources.inc(n, tags=self.tags)

    def on_commit(self, stats: Any, busy_s: float, lags_s: list[float]) -> None:
        self.windows.inc(1, tags=self.tags)
        for lag in lags_s:
            self.lag.observe(lag, tags=self.tags)

    def on_tick(self, stats: Any, depths: dict[str, int], force: bool = False) -> None:
        """Gauges: queue depths now, engine occupancy since the last tick (at most every TICK_S)."""
        t = stats.now()
        if not force and t - self._last_tick < TICK_S:
            return
        self._last_tick = t
        if stats.sources_total is not None:
            self.planned.set(stats.sources_total, tags=self.tags)
        for name, n in depths.items():
            self.queue.set(n, tags={**self.tags, "queue": name})
        busy = stats.totals["engine_busy_s"]
        t0, b0 = self._last_busy
        if t > t0:
            replicas = max(1, stats.workers.get("infer", 1))
            self.occupancy.set(min(1.0, (busy - b0) / ((t - t0) * replicas)), tags=self.tags)
        self._last_busy = (t, busy)

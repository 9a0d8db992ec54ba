"""What a run did, measured on the driver from the result rows it receives: counts, busy times,
token and latency distributions, and a time series; the figures behind progress, report and metrics.

The driver sees every result row once (pipeline/collect.py drops duplicates before they get here),
so every count here equals the count of this run's rows in `results/`. Memory is bounded whatever
the run's length: counters, a time series of at most MAX_BUCKETS buckets (buckets double in width
when it fills), a reservoir sample of SAMPLE values per distribution, the SLOWEST sources, and
EXAMPLES messages per error type.

Busy times come from the rows' own timings: `preprocess_ms` (once per unit; the unit's task rows
repeat it) and `infer_ms`. The plain engine stage gives each row its batch's time divided by the
batch's requests, so their sum is the engine's busy time; vLLM's overlapping stage gives each row its
own request latency (requests overlap), so there the sum over-counts and occupancy is capped at 1
(`engine_busy_basis` says which).
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: Most buckets in the time series; past it, neighbours merge and the bucket width doubles.
MAX_BUCKETS = 480
#: Values kept per distribution (reservoir sample; exact below this many).
SAMPLE = 20_000
#: Error messages kept per error type.
EXAMPLES = 3
#: Sources listed as the slowest.
SLOWEST = 10
#: Series kept per bucket (all sums over the rows that arrived in the bucket).
SERIES = ("units", "pages", "images", "frames", "rows", "errors", "prompt_tokens", "completion_tokens",
          "engine_busy_s", "preprocess_busy_s", "sources_done")


@dataclass
class _Reservoir:
    """Uniform sample of at most SAMPLE values, plus exact count, sum and max."""

    seed: int = 0
    values: list[float] = field(default_factory=list)
    count: int = 0
    total: float = 0.0
    peak: float = 0.0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def add(self, v: float) -> None:
        self.count += 1
        self.total += v
        self.peak = max(self.peak, v)
        if len(self.values) < SAMPLE:
            self.values.append(v)
        else:
            j = self._rng.randrange(self.count)
            if j < SAMPLE:
                self.values[j] = v

    def describe(self, bins: int = 30) -> dict[str, Any]:
        """count, mean, p50/p90/p99 (of the sample), max, and a histogram (edges, counts) of the sample."""
        import numpy as np

        if not self.count:
            return {"count": 0}
        a = np.asarray(self.values, dtype=float)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        counts, edges = np.histogram(a, bins=min(bins, max(1, len(np.unique(a)))))
        return {"count": self.count, "mean": round(self.total / self.count, 3), "p50": round(float(p50), 3),
                "p90": round(float(p90), 3), "p99": round(float(p99), 3), "max": round(self.peak, 3),
                "sampled": len(self.values), "hist": {"edges": [round(float(e), 3) for e in edges],
                                                     "counts": counts.tolist()}}


class RunStats:
    """Figures of one run, fed by the driver: `rows` per accepted result row, `sources_done` per
    completed source, `committed` per window; read by progress, the run record and metrics.

    `clock` is time.monotonic (tests may pass another); all times are seconds from `start()`.
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.t0 = clock()
        self.t_last = 0.0  # time of the last row seen
        self.bucket_s = 1.0
        self.buckets: list[dict[str, float]] = []
        self.totals: Counter[str] = Counter()
        self.results: Counter[str] = Counter()  # status -> rows
        self.errors: Counter[str] = Counter()  # error_type -> rows
        self.errors_by_stage: Counter[tuple[str, str]] = Counter()  # (stage, error_type) -> rows
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self.dist = {k: _Reservoir(i) for i, k in enumerate(("completion_tokens", "prompt_tokens", "infer_ms",
                                                              "preprocess_ms"))}
        self._slowest: list[tuple[float, str, dict[str, Any]]] = []  # min-heap of the SLOWEST
        self.sources_total: int | None = None
        self.workers: dict[str, int] = {}
        self.commits = 0
        self.commit_busy_s = 0.0
        self.commit_lag = _Reservoir(9)  # seconds from a source's completion to its commit
        self.engine_busy_basis = "batch time split over its requests"
        # objects with on_rows, on_sources, on_commit, on_tick (pipeline/metrics.py)
        self.listeners: list[Any] = []

    def start(self, sources_total: int, workers: dict[str, int]) -> None:
        """The pipeline starts now, over `sources_total` sources with `workers` per stage."""
        self.t0 = self.clock()
        self.sources_total = sources_total
        self.workers.update(workers)

    def now(self) -> float:
        return self.clock() - self.t0

    # -- feeding ------------------------------------------------------------------------------

    def rows(self, rows: list[dict[str, Any]], new_units: list[bool]) -> None:
        """Result rows accepted by the collector (RESULTS_SCHEMA dicts; no markers, no duplicates);
        `new_units[i]`: row i is the first row of its unit (unit_index, tile_index) to arrive."""
        if not rows:
            return
        t = self.now()
        self.t_last = t
        b: Counter[str] = Counter()
        engine_ms = 0.0
        for r, new_unit in zip(rows, new_units, strict=True):
            b["rows"] += 1
            self.results[r["status"]] += 1
            if r["unit_index"] >= 0 and new_unit:
                b["units"] += 1
                kind = r["unit_kind"]
                if kind == "page" and not r["tile_index"]:  # a tiled page counts once (tile 0)
                    b["pages"] += 1
                elif kind == "image":
                    b["images"] += 1
                elif kind == "clip":
                    b["frames"] += r["num_frames"] or 0
                if r["preprocess_ms"] is not None:
                    b["preprocess_busy_s"] += r["preprocess_ms"] / 1000.0
                    self.dist["preprocess_ms"].add(r["preprocess_ms"])
            if r["infer_ms"] is not None:
                engine_ms += r["infer_ms"]
                self.dist["infer_ms"].add(r["infer_ms"])
            if r["status"] == "ok" and r["output_source"] == "model":
                b["prompt_tokens"] += r["prompt_tokens"] or 0
                b["completion_tokens"] += r["completion_tokens"] or 0
                self.dist["completion_tokens"].add(r["completion_tokens"] or 0)
                self.dist["prompt_tokens"].add(r["prompt_tokens"] or 0)
            if r["status"] == "error":
                b["errors"] += 1
                etype = r["error_type"] or "unknown"
                self.errors[etype] += 1
                # A row without an engine time never reached the engine: its error is preprocessing's.
                self.errors_by_stage[("infer" if r["infer_ms"] is not None else "preprocess", etype)] += 1
                ex = self.examples.setdefault(etype, [])
                if len(ex) < EXAMPLES:
                    ex.append({"source_uri": r["source_uri"], "unit_index": r["unit_index"], "task": r["task"],
                               "message": (r["error_message"] or "")[:300]})
        b["engine_busy_s"] = engine_ms / 1000.0
        self.totals.update(b)
        self._add(t, b, spread_s=b["engine_busy_s"], spread_key="engine_busy_s")
        for listener in self.listeners:
            listener.on_rows(self, rows, new_units)

    def sources_done(self, sources: list[Any]) -> None:
        """Sources the collector completed (pipeline.collect.Complete): the slowest are kept."""
        if not sources:
            return
        t = self.now()
        for src in sources:
            units: dict[tuple[int, Any], float] = {}
            infer = 0.0
            for r in src.rows:
                units[(r["unit_index"], r["tile_index"])] = r["preprocess_ms"] or 0.0
                infer += r["infer_ms"] or 0.0
            pre = sum(units.values())
            entry = {"source_uri": src.work.uri, "units": src.units, "rows": len(src.rows),
                     "preprocess_s": round(pre / 1000, 3), "infer_s": round(infer / 1000, 3),
                     "busy_s": round((pre + infer) / 1000, 3)}
            item = ((pre + infer) / 1000, src.work.source_id, entry)
            if len(self._slowest) < SLOWEST:
                heapq.heappush(self._slowest, item)
            elif item > self._slowest[0]:
                heapq.heapreplace(self._slowest, item)
        self.totals["sources_done"] += len(sources)
        self._add(t, Counter(sources_done=len(sources)))
        for listener in self.listeners:
            listener.on_sources(self, len(sources))

    def committed(self, busy_s: float, lags_s: list[float]) -> None:
        """A window was published in `busy_s`; its sources had waited `lags_s` since completion."""
        self.commits += 1
        self.commit_busy_s += busy_s
        for lag in lags_s:
            self.commit_lag.add(lag)
        for listener in self.listeners:
            listener.on_commit(self, busy_s, lags_s)

    def queues(self, depths: dict[str, int], force: bool = False) -> None:
        """The driver's queue depths now (results blocks, open sources, window sources)."""
        for listener in self.listeners:
            listener.on_tick(self, depths, force)

    # -- time series --------------------------------------------------------------------------

    def _bucket(self, t: float) -> dict[str, float]:
        i = int(max(t, 0.0) // self.bucket_s)
        while i >= MAX_BUCKETS:
            self._merge()
            i = int(max(t, 0.0) // self.bucket_s)
        while len(self.buckets) <= i:
            self.buckets.append(dict.fromkeys(SERIES, 0.0))
        return self.buckets[i]

    def _merge(self) -> None:
        merged = []
        for i in range(0, len(self.buckets), 2):
            pair = self.buckets[i:i + 2]
            merged.append({k: sum(p[k] for p in pair) for k in SERIES})
        self.buckets = merged
        self.bucket_s *= 2

    def _add(self, t: float, values: Counter, spread_s: float = 0.0, spread_key: str = "") -> None:
        """Add `values` at time t; `spread_key`'s value is spread over [t - spread_s, t] (busy time
        ends when its rows arrive: a batch's engine time is attributed to the seconds it ran)."""
        if spread_key and spread_s > 0:
            start = max(0.0, t - spread_s)
            span = t - start
            pos = start
            while pos < t and span > 0:
                bucket_end = (int(pos // self.bucket_s) + 1) * self.bucket_s
                step = min(bucket_end, t) - pos
                self._bucket(pos)[spread_key] += values[spread_key] * step / span
                pos += step
            if span <= 0:
                self._bucket(t)[spread_key] += values[spread_key]
        bucket = self._bucket(t)
        for k, v in values.items():
            if k != spread_key:
                bucket[k] += v

    # -- reading ------------------------------------------------------------------------------

    def units_done(self) -> int:
        return int(self.totals["units"])

    def snapshot(self) -> dict[str, Any]:
        """Totals so far (for progress lines and metrics)."""
        return {"t": self.now(), **{k: self.totals[k] for k in SERIES}, "errors_by_type": dict(self.errors),
                "sources_total": self.sources_total}

    def report(self, wall_s: float, discover_s: float, retried: dict[str, int], counts: dict[str, int]) -> dict[str, Any]:
        """The run record's figures: `wall_s` is the pipeline's time (plan start to last commit)."""
        tot = self.totals
        wall = max(wall_s, 1e-9)
        replicas = max(1, self.workers.get("infer", 1))
        pre_workers = max(1, self.workers.get("preprocess", 1))

        def rate(x: float) -> float:
            return round(x / wall, 4)

        stages = {
            "discover": {"busy_s": round(discover_s, 3), "wall_s": round(discover_s, 3), "workers": 1},
            "preprocess": {"busy_s": round(tot["preprocess_busy_s"], 3), "wall_s": round(wall_s, 3),
                           "workers": pre_workers,
                           "occupancy": round(min(1.0, tot["preprocess_busy_s"] / (wall * pre_workers)), 4)},
            "infer": {"busy_s": round(tot["engine_busy_s"], 3), "wall_s": round(wall_s, 3), "workers": replicas,
                      "occupancy": round(min(1.0, tot["engine_busy_s"] / (wall * replicas)), 4),
                      "busy_basis": self.engine_busy_basis},
            "commit": {"busy_s": round(self.commit_busy_s, 3), "wall_s": round(wall_s, 3), "workers": 1,
                       "windows": self.commits},
        }
        series = {"bucket_s": self.bucket_s, **{k: [round(b[k], 4) for b in self.buckets] for k in SERIES}}
        series["engine_occupancy"] = [round(min(1.0, b["engine_busy_s"] / (self.bucket_s * replicas)), 4)
                                      for b in self.buckets]
        series["preprocess_occupancy"] = [round(min(1.0, b["preprocess_busy_s"] / (self.bucket_s * pre_workers)), 4)
                                          for b in self.buckets]
        return {
            "stages": stages,
            "throughput": {
                "seconds": round(wall_s, 3), "basis": "pipeline wall time: plan start to last commit",
                "units": int(tot["units"]), "pages": int(tot["pages"]), "images": int(tot["images"]),
                "frames": int(tot["frames"]), "rows": int(tot["rows"]),
                "prompt_tokens": int(tot["prompt_tokens"]), "completion_tokens": int(tot["completion_tokens"]),
                "units_per_s": rate(tot["units"]), "pages_per_s": rate(tot["pages"]),
                "images_per_s": rate(tot["images"]), "frames_per_s": rate(tot["frames"]),
                "prompt_tokens_per_s": rate(tot["prompt_tokens"]),
                "completion_tokens_per_s": rate(tot["completion_tokens"]),
            },
            "engine_occupancy": stages["infer"]["occupancy"],
            "results_by_status": dict(self.results),
            "retries": {"sources_rerun_by_error_type": dict(retried),
                        "plan_restarts": counts.get("plan_restarts", 0),
                        "duplicate_rows_dropped": counts.get("duplicates_dropped", 0)},
            "error_types": [{"error_type": k, "count": n, "by_stage": {s: m for (s, e), m in self.errors_by_stage.items()
                                                                        if e == k},
                             "examples": self.examples.get(k, [])} for k, n in self.errors.most_common()],
            "distributions": {**{k: r.describe() for k, r in self.dist.items()},
                              "commit_lag_s": self.commit_lag.describe()},
            "slowest_sources": [e for _, _, e in sorted(self._slowest, reverse=True)],
            "timeseries": series,
        }

"""`cpmv plan JOB`: size a job before running it, from a sample of its inputs.

It lists the job's sources, draws `--sample N` of them (seeded; all of them when N covers the
corpus, and then the figures are exact), runs the real preprocessing on them (the `cpmv inspect`
path: pipeline/inspect_units.py) timing each source's CPU, and scales by sources:

- units (pages, images, clips, frames), failed units, visual and placeholder tokens (per family:
  `--family` may be given several times),
- engine requests (unit x applicable task) and output tokens (each task's `max_new_tokens`, an
  upper bound, unless `--output-tokens TASK=N` states an expected length),
- engine GPU-seconds and GPU-hours at stated per-GPU rates (`--gpu-rate [FAMILY:]KIND=N`, pages/s,
  images/s, video frames/s; else the rates bench/cpu_per_gpu.py wrote to bench/results), and cost at
  `--usd-per-gpu-hour`,
- CPU cores per GPU that keep the engine fed: the GPU rate x CPU seconds one unit took here.

Scaling by source count assumes the sample is like the rest (stated in the JSON as `scaled_by`).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

#: GPU rate keys, per unit kind (a clip's rate is per frame, as in bench/cpu_per_gpu.py).
KINDS = {"page": "pdf", "image": "image", "clip": "video"}
BENCH_RATES = Path("bench/results/cpu_per_gpu.json")


def register(sub: Any) -> None:
    """Add `plan` to the CLI's subcommands."""
    p = sub.add_parser("plan", help="estimate units, tokens, GPU-hours, cost and CPU per GPU from a sample of a "
                       "job's inputs (real preprocessing; no model is run)")
    p.add_argument("job", help="YAML job file")
    p.add_argument("--sample", type=int, default=50, metavar="N", help="sources to preprocess (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--family", action="append", default=[], metavar="FAMILY",
                   help="model family to plan for (repeatable; default: the job's)")
    p.add_argument("--gpu-rate", action="append", default=[], metavar="[FAMILY:]KIND=N",
                   help="engine units per GPU-second: pdf (pages), image, video (frames); default: "
                   f"{BENCH_RATES}")
    p.add_argument("--output-tokens", action="append", default=[], metavar="TASK=N",
                   help="expected output tokens per request of TASK (default: its max_new_tokens, an upper bound)")
    p.add_argument("--usd-per-gpu-hour", type=float, default=None, help="price of one GPU-hour, for the cost")
    p.add_argument("--json", default=None, metavar="PATH", help="where to write the plan (default plan-<job>.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a job field")
    p.set_defaults(func=cmd_plan)


def parse_rates(items: list[str], bench: Path = BENCH_RATES) -> tuple[dict[str, dict[str, float]], str]:
    """{family or '*': {pdf|image|video: units/s}} and where they came from; ValueError when none."""
    rates: dict[str, dict[str, float]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        fam, _, kind = key.rpartition(":")
        if not sep or kind not in KINDS.values():
            raise ValueError(f"--gpu-rate {item!r}: expected [FAMILY:]KIND=N with KIND one of pdf, image, video")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"--gpu-rate {item!r}: {value!r} is not a number") from None
        if rate <= 0:
            raise ValueError(f"--gpu-rate {item!r}: a rate must be > 0")
        rates.setdefault(fam or "*", {})[kind] = rate
    if rates:
        return rates, "--gpu-rate"
    if bench.is_file():
        g = json.loads(bench.read_text())["assumptions"]["gpu_rates_per_gpu"]
        return ({"*": {"pdf": g["pdf_pages_per_s"], "image": g["image_per_s"], "video": g["video_frames_per_s"]}},
                str(bench))
    raise ValueError(f"no GPU rates: pass --gpu-rate pdf=N image=N video=N (units per GPU-second) or run "
                     f"`python -m bench.cpu_per_gpu` to write {bench}")


def _kv_ints(items: list[str], flag: str) -> dict[str, int]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not v.strip().isdigit():
            raise ValueError(f"{flag} {item!r}: expected TASK=N")
        out[k] = int(v)
    return out


def sample_sources(sources: list[Any], n: int, seed: int) -> list[Any]:
    """`n` sources drawn without replacement (seeded), in listing order; all when n >= len(sources)."""
    if n < 1:
        raise ValueError("--sample must be >= 1")
    if n >= len(sources):
        return list(sources)
    keep = set(random.Random(seed).sample(range(len(sources)), n))
    return [s for i, s in enumerate(sources) if i in keep]


def measure(job: Any, family: str, sample: list[Any]) -> dict[str, Any]:
    """Preprocess the sample for `family`: totals and CPU seconds by unit kind, and the records' summary."""
    from pipeline.inspect_units import inspect_sources, summarize
    from pipeline.tasks import resolve_task

    tasks = [resolve_task(t) for t in job.tasks]
    units: Counter[str] = Counter()
    cpu_s: Counter[str] = Counter()
    requests: Counter[str] = Counter()
    frames = 0
    records: list[dict[str, Any]] = []
    it = inspect_sources(job, family, sample)
    while True:
        t0 = time.process_time()
        try:
            _, recs = next(it)
        except StopIteration:
            break
        spent = time.process_time() - t0
        records.extend(recs)
        kinds = Counter(r["unit_kind"] for r in recs if r["unit_index"] >= 0 and r["error_type"] is None)
        for r in recs:
            if r["unit_index"] < 0 or r["error_type"] is not None:
                continue
            units[r["unit_kind"]] += 1
            frames += (r["frames"] or 0) if r["unit_kind"] == "clip" else 0
            for t in tasks:
                if t.applies_to(r["unit_kind"]):
                    requests[t.name] += 1
        # A source's CPU time goes to the kind of its units (a source has one media type).
        kind = kinds.most_common(1)[0][0] if kinds else "failed"
        cpu_s[kind] += spent
    s = summarize(records)
    return {"units": dict(units), "frames": frames, "requests": dict(requests), "cpu_s": dict(cpu_s),
            "failed_units": s["failed"], "visual_tokens": s["visual_tokens"],
            "placeholder_tokens": s["placeholder_tokens"], "summary": s}


def estimate(job: Any, family: str, m: dict[str, Any], factor: float, rates: dict[str, float],
             out_tokens: dict[str, int], usd: float | None) -> dict[str, Any]:
    """Scale a sample's measurement by `factor` and price it at `rates` (units per GPU-second)."""
    per_task = {t.name: out_tokens.get(t.name, t.max_new_tokens) for t in job.tasks}
    engine_units = {KINDS[k]: (m["frames"] if k == "clip" else n) for k, n in m["units"].items()}
    gpu_s = 0.0
    cores: dict[str, float] = {}
    missing = []
    for kind, n in engine_units.items():
        if kind not in rates:
            missing.append(kind)
            continue
        gpu_s += n * factor / rates[kind]
        cpu_kind = {v: k for k, v in KINDS.items()}[kind]
        if n and m["cpu_s"].get(cpu_kind):
            # CPU seconds per engine unit x engine units per GPU-second = cores one GPU keeps busy
            cores[kind] = round(m["cpu_s"][cpu_kind] / n * rates[kind], 2)
    if missing:
        raise ValueError(f"{family}: no GPU rate for {', '.join(missing)} (add --gpu-rate {missing[0]}=N)")
    gpu_h = gpu_s / 3600
    return {
        "family": family,
        "units": {k: round(n * factor) for k, n in m["units"].items()},
        "units_total": round(sum(m["units"].values()) * factor),
        "frames": round(m["frames"] * factor),
        "failed_units": round(m["failed_units"] * factor),
        "visual_tokens": round(m["visual_tokens"] * factor),
        "placeholder_tokens": round(m["placeholder_tokens"] * factor),
        "requests": {t: round(n * factor) for t, n in m["requests"].items()},
        "output_tokens_per_request": per_task,
        "output_tokens": round(sum(n * per_task[t] for t, n in m["requests"].items()) * factor),
        "gpu_rates": rates,
        "engine_gpu_s": round(gpu_s, 1),
        "gpu_hours": round(gpu_h, 4),
        "usd": None if usd is None else round(gpu_h * usd, 2),
        "cpu_cores_per_gpu": cores,
        "sample": m,
    }


def _warm_up(job: Any, family: str, sample: list[Any]) -> None:
    """Preprocess one source of each file type untimed: the first of a kind pays imports and
    library start-up (pymupdf, PyAV), which would otherwise inflate its CPU per unit many times."""
    from pipeline.inspect_units import inspect_sources

    firsts = {}
    for s in sample:
        firsts.setdefault(Path(s.uri).suffix.lower(), s)
    for _ in inspect_sources(job, family, list(firsts.values())):
        pass


def plan(job: Any, families: list[str], sample_n: int, seed: int, rate_items: list[str],
         out_items: list[str], usd: float | None) -> dict[str, Any]:
    from pipeline.sources import discover

    rates, rates_from = parse_rates(rate_items)
    out_tokens = _kv_ints(out_items, "--output-tokens")
    unknown = sorted(set(out_tokens) - {t.name for t in job.tasks})
    if unknown:
        raise ValueError(f"--output-tokens: {unknown} not among the job's tasks {[t.name for t in job.tasks]}")
    sources = discover(job.input, job.storage)
    sample = sample_sources(sources, sample_n, seed)
    factor = len(sources) / len(sample)
    out = {"job": job.name, "sources": len(sources), "sampled": len(sample), "seed": seed,
           "scaled_by": f"source count x{factor:.3f}" if factor != 1 else "none: every source was preprocessed",
           "bytes_total": sum(s.size or 0 for s in sources), "bytes_sampled": sum(s.size or 0 for s in sample),
           "gpu_rates_from": rates_from, "usd_per_gpu_hour": usd, "families": []}
    _warm_up(job, families[0], sample)
    for fam in families:
        r = {**rates.get("*", {}), **rates.get(fam, {})}
        out["families"].append(estimate(job, fam, measure(job, fam, sample), factor, r, out_tokens, usd))
    return out


def table(p: dict[str, Any]) -> str:
    """The plan as a plain-text table (one column per family)."""
    fams = p["families"]
    rows = [("units", lambda f: f["units_total"]), ("  pages", lambda f: f["units"].get("page", 0)),
            ("  images", lambda f: f["units"].get("image", 0)), ("  clips", lambda f: f["units"].get("clip", 0)),
            ("  frames", lambda f: f["frames"]), ("failed units", lambda f: f["failed_units"]),
            ("visual tokens", lambda f: f["visual_tokens"]), ("requests", lambda f: sum(f["requests"].values())),
            ("output tokens", lambda f: f["output_tokens"]), ("engine GPU-s", lambda f: f["engine_gpu_s"]),
            ("GPU-hours", lambda f: f["gpu_hours"]), ("cost USD", lambda f: "-" if f["usd"] is None else f["usd"])]
    rows += [(f"CPU cores/GPU {k}", lambda f, k=k: f["cpu_cores_per_gpu"].get(k, "-"))
             for k in sorted({k for f in fams for k in f["cpu_cores_per_gpu"]})]
    w = max(16, *(len(f["family"]) + 2 for f in fams))
    lines = [f"plan {p['job']}: {p['sources']} sources, {p['sampled']} preprocessed ({p['scaled_by']}); "
             f"GPU rates from {p['gpu_rates_from']}",
             f"{'':<18}" + "".join(f"{f['family']:>{w}}" for f in fams)]
    for name, get in rows:
        lines.append(f"{name:<18}" + "".join(f"{get(f)!s:>{w}}" for f in fams))
    return "\n".join(lines)


def cmd_plan(args: Any) -> int:
    from pipeline.config import ConfigError, load_job
    from pipeline.inspect_units import resolve_family
    from pipeline.sources import NoMatchError

    try:
        job = load_job(args.job, args.set)
        families = args.family or [resolve_family(job)]
        for fam in args.family:
            resolve_family(job, fam)  # ValueError naming the known families
        p = plan(job, families, args.sample, args.seed, args.gpu_rate, args.output_tokens, args.usd_per_gpu_hour)
    except (ConfigError, NoMatchError, ValueError) as err:
        print(f"cpmv: {err}", file=sys.stderr)
        return 2
    path = Path(args.json or f"plan-{job.name}.json")
    path.write_text(json.dumps(p, indent=2))
    print(table(p))
    print(f"plan written to {path}")
    return 0

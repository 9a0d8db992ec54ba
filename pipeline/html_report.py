"""The HTML report of a run: one self-contained file beside its run record, viewable offline.

Plots are drawn with matplotlib (Agg, no display) as PNGs embedded as base64 `data:` URIs: no
script, stylesheet or font is fetched, so the file opens the same on a laptop, in a mail or on an
air-gapped cluster. Every plot is an `<img>` with `data-plot="<name>"` (tests decode them by name).

Input: a run record (`_runs/<attempt>.json`, written by pipeline/run.py from pipeline/runstats.py);
a record of an older run without the figures renders its counts and says what is missing.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

#: Plots the report draws, in order: name -> title.
PLOTS = {
    "throughput": "Throughput over time",
    "occupancy": "Stage occupancy over time",
    "errors": "Errors by type",
    "output_length": "Output length (completion tokens per result)",
    "slowest": "Slowest sources (busy seconds)",
}


def html_uri(layout: Any, attempt: str) -> str:
    """The report's URI: the run record's, with .html for .json (Layout owns the record's path)."""
    return layout.run_record(attempt).removesuffix(".json") + ".html"


def write_html(layout: Any, record: dict[str, Any]) -> str:
    """Render `record` and write it beside the run record; returns the report's URI."""
    from pipeline import storage

    uri = html_uri(layout, record["attempt"])
    storage.write_bytes(uri, render_html(record).encode(), layout.storage)
    return uri


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figures(rec: dict[str, Any]) -> dict[str, str | None]:
    """name -> base64 PNG (None when the record has no data for it)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    out: dict[str, str | None] = dict.fromkeys(PLOTS)
    ts = rec.get("timeseries") or {}
    n = len(ts.get("units") or [])
    if n:
        w = ts["bucket_s"]
        t = [(i + 0.5) * w for i in range(n)]
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.plot(t, [u / w for u in ts["units"]], label="units/s")
        ax.plot(t, [u / w for u in ts["pages"]], label="pages/s")
        if any(ts["frames"]):
            ax.plot(t, [u / w for u in ts["frames"]], label="frames/s")
        ax.set_xlabel("seconds since the pipeline started")
        ax.set_ylabel("per second")
        ax2 = ax.twinx()
        ax2.plot(t, [u / w for u in ts["completion_tokens"]], color="tab:red", alpha=0.6, label="output tokens/s")
        ax2.set_ylabel("output tokens/s")
        fig.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
        out["throughput"] = _png(fig)

        fig, ax = plt.subplots(figsize=(8, 3))
        ax.plot(t, ts["engine_occupancy"], label="engine (infer)")
        ax.plot(t, ts["preprocess_occupancy"], label="preprocess")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("seconds since the pipeline started")
        ax.set_ylabel("busy fraction")
        ax.legend(fontsize=8)
        out["occupancy"] = _png(fig)
    errors = rec.get("error_types") or []
    if errors:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(errors) + 1))
        ax.barh([e["error_type"] for e in errors][::-1], [e["count"] for e in errors][::-1], color="tab:red")
        ax.set_xlabel("result rows")
        out["errors"] = _png(fig)
    hist = ((rec.get("distributions") or {}).get("completion_tokens") or {}).get("hist")
    if hist and hist["counts"]:
        e = hist["edges"]
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.bar(e[:-1], hist["counts"], width=[b - a for a, b in zip(e, e[1:])] or 1, align="edge",
               edgecolor="white")
        ax.set_xlabel("completion tokens")
        ax.set_ylabel("results")
        out["output_length"] = _png(fig)
    slow = rec.get("slowest_sources") or []
    if slow:
        names = [s["source_uri"].rsplit("/", 1)[-1][:40] for s in slow][::-1]
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(slow) + 1))
        ax.barh(names, [s["preprocess_s"] for s in slow][::-1], label="preprocess")
        ax.barh(names, [s["infer_s"] for s in slow][::-1], left=[s["preprocess_s"] for s in slow][::-1],
                label="engine")
        ax.set_xlabel("busy seconds")
        ax.legend(fontsize=8)
        out["slowest"] = _png(fig)
    return out


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...] | None = None) -> str:
    e = html.escape
    h = "<tr>" + "".join(f"<th>{e(str(c))}</th>" for c in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{h}{body}</table>"


def render_html(rec: dict[str, Any]) -> str:
    """The report of one run record, as a self-contained HTML page."""
    e = html.escape
    figs = _figures(rec)
    c = rec.get("counts") or {}
    tp = rec.get("throughput") or {}
    parts = [f"<h1>Run {e(str(rec.get('run_id')))}</h1>",
             _table([("attempt", rec.get("attempt")), ("job", rec.get("job")), ("status", rec.get("status")),
                     ("message", rec.get("message") or ""), ("started", rec.get("started_at")),
                     ("finished", rec.get("finished_at")),
                     ("model", (rec.get("model") or {}).get("name")),
                     ("engine", (rec.get("model") or {}).get("engine"))])]
    parts.append("<h2>Counts</h2>" + _table(sorted(c.items()), ("count", "value")))
    if tp:
        parts.append("<h2>Throughput</h2><p>over " + e(f"{tp['seconds']} s ({tp['basis']})") + "</p>" + _table(
            [(k, v) for k, v in tp.items() if k not in ("seconds", "basis")], ("figure", "value")))
    else:
        parts.append("<p>This run record has no throughput figures (written before reports existed).</p>")
    stages = rec.get("stages") or {}
    if stages:
        parts.append("<h2>Stages</h2>" + _table(
            [(n, s.get("busy_s"), s.get("wall_s"), s.get("workers"), s.get("occupancy", "")) for n, s in stages.items()],
            ("stage", "busy s", "wall s", "workers", "occupancy")))
        basis = (stages.get("infer") or {}).get("busy_basis")
        if basis:
            parts.append(f"<p>Engine busy time: {e(basis)}.</p>")
    for name, title in PLOTS.items():
        if figs[name]:
            parts.append(f"<h2>{e(title)}</h2><img data-plot=\"{name}\" alt=\"{e(title)}\" "
                         f"src=\"data:image/png;base64,{figs[name]}\">")
    errors = rec.get("error_types") or []
    if errors:
        parts.append("<h2>Errors</h2>" + _table(
            [(x["error_type"], x["count"], json.dumps(x.get("by_stage", {})),
              " | ".join(f"{m['source_uri']}#{m['unit_index']} {m['task']}: {m['message']}" for m in x["examples"]))
             for x in errors], ("type", "rows", "by stage", "examples")))
    dist = rec.get("distributions") or {}
    if dist:
        parts.append("<h2>Distributions</h2>" + _table(
            [(k, d.get("count"), d.get("mean", ""), d.get("p50", ""), d.get("p90", ""), d.get("p99", ""),
              d.get("max", "")) for k, d in dist.items()], ("figure", "count", "mean", "p50", "p90", "p99", "max")))
    slow = rec.get("slowest_sources") or []
    if slow:
        parts.append("<h2>Slowest sources</h2>" + _table(
            [(s["source_uri"], s["units"], s["preprocess_s"], s["infer_s"]) for s in slow],
            ("source", "units", "preprocess s", "engine s")))
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}"
             "img{max-width:100%}")
    title = e(f"cpmv run {rec.get('attempt')}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")

"""The one-screen summary printed at the end of a run."""

from __future__ import annotations

from collections import Counter

from pipeline.run import RunSummary


def render(summary: RunSummary) -> str:
    """Plain-text summary: where results are, counts, failures by type, timings."""
    c = summary.counts
    lines = [
        f"run {summary.run_id} ({summary.attempt}): {summary.status}"
        + (f": {summary.message}" if summary.message else ""),
        f"  output     {summary.output_uri}  (results/, documents/, _runs/{summary.attempt}.json)",
        f"  sources    {c.get('sources', 0)} found, {c.get('processed', 0)} processed, "
        f"{c.get('skipped_committed', 0)} skipped (already committed)"
        + (f", {c['retried_sources']} re-run ({', '.join(f'{k} x{v}' for k, v in sorted(summary.retried.items()))})"
           if c.get("retried_sources") else ""),
        f"  units      {c.get('units', 0)}; results ok {c.get('results_ok', 0)}, failed {c.get('results_failed', 0)}",
        "  documents  " + ", ".join(f"{k.removeprefix('documents_')} {v}" for k, v in sorted(c.items())
                                    if k.startswith("documents_")) if any(k.startswith("documents_") for k in c)
        else "  documents  none this run",
    ]
    errors = Counter(summary.errors)
    if errors:
        lines.append("  errors     " + ", ".join(f"{k} x{v}" for k, v in errors.most_common()) + " (result rows)")
    flags = Counter(summary.flags)
    if flags:
        lines.append("  flags      " + ", ".join(f"{k} x{v}" for k, v in flags.most_common()) + " (documents)")
    width = max((len(d["source_uri"]) for d in summary.documents), default=0)
    for d in summary.documents[:20]:
        detail = f"{d['units_ok']}/{d['num_units']} units ok"
        if d["error_type"]:
            detail += f"; {d['error_type']}: {(d['error_message'] or '')[:80]}"
        lines.append(f"    {d['status']:<8} {d['source_uri']:<{width}}  {detail}")
    shown_total = sum(v for k, v in c.items() if k.startswith("documents_"))
    if shown_total > len(summary.documents):
        lines.append(f"    ... {shown_total - len(summary.documents)} more in documents/")
    t = summary.timings
    lines.append(f"  time       {t.get('total_s', 0):.1f} s (pipeline {t.get('pipeline_s', 0):.1f} s)")
    for kind, uri in summary.reports.items():
        lines.append(f"  report     {uri}" if kind == "html" else f"  record     {uri}")
    return "\n".join(lines)

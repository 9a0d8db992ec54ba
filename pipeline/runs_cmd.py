"""`cpmv runs OUT` (the runs of an output prefix, newest last) and `cpmv report OUT [RUN_ID]` (render
the HTML report of a past run beside its record, then print both paths).

Run records are found through `sink.Layout.run_record`, so wherever the layout keeps them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pipeline.config import StorageConfig

#: Largest run record read (a record holds bounded series: pipeline/runstats.py).
MAX_RECORD_BYTES = 64 * 2**20


def _layout(out: str, storage: StorageConfig | None = None) -> Any:
    from pipeline.sink import Layout

    return Layout(out, storage or StorageConfig())


def run_records(layout: Any) -> list[dict[str, Any]]:
    """Every readable run record under the layout, oldest first (by start time, then attempt)."""
    from pipeline import storage

    dirs = [layout.run_record("x").rsplit("/", 1)[0]]
    if hasattr(layout, "legacy_run_record"):  # records of runs before `_runs/` (sink.Layout)
        dirs.append(layout.legacy_run_record("x").rsplit("/", 1)[0])
    out = []
    for uri in (u for d in dirs for u in storage.list_files(d, layout.storage)):
        if not uri.endswith(".json"):
            continue
        try:
            out.append(json.loads(storage.read_bytes(uri, layout.storage, max_bytes=MAX_RECORD_BYTES)))
        except (ValueError, OSError) as err:
            print(f"cpmv: skipping unreadable run record {storage.redact(uri)}: {storage.redact(err)}",
                  file=sys.stderr)
    return sorted((r for r in out if isinstance(r, dict) and "attempt" in r),
                  key=lambda r: (r.get("started_at") or "", r["attempt"]))


def find_run(records: list[dict[str, Any]], run: str | None) -> dict[str, Any]:
    """The newest record whose attempt or run_id is `run` (None: the newest of all); ValueError if none."""
    if not records:
        raise ValueError("no run records here (_runs/ and runs/ are empty or missing)")
    if run is None:
        return records[-1]
    hits = [r for r in records if run in (r["attempt"], r.get("run_id"))]
    if not hits:
        known = ", ".join(r["attempt"] for r in records[-5:])
        raise ValueError(f"no run {run!r} here; the newest are: {known}")
    return hits[-1]


def cmd_runs(args: Any) -> int:
    try:
        records = run_records(_layout(args.out))
    except (ValueError, OSError) as err:
        print(f"cpmv: {err}", file=sys.stderr)
        return 2
    head = f"{'attempt':<44} {'status':<11} {'started':<20} {'time s':>8} {'sources':>7} {'units':>7} " \
           f"{'ok':>7} {'failed':>7}"
    print(head)
    for r in records:
        c, t = r.get("counts") or {}, r.get("timings") or {}
        print(f"{r['attempt']:<44} {r.get('status', '?'):<11} {(r.get('started_at') or '')[:19]:<20} "
              f"{t.get('total_s', 0):>8.1f} {c.get('processed', 0):>7} {c.get('units', 0):>7} "
              f"{c.get('results_ok', 0):>7} {c.get('results_failed', 0):>7}")
    print(f"{len(records)} run(s)")
    return 0


def cmd_report(args: Any) -> int:
    from pipeline.html_report import write_html

    layout = _layout(args.out)
    try:
        rec = find_run(run_records(layout), args.run_id)
    except (ValueError, OSError) as err:
        print(f"cpmv: {err}", file=sys.stderr)
        return 2
    html = write_html(layout, rec)
    print(f"run record  {layout.run_record(rec['attempt'])}\nreport      {html}")
    return 0

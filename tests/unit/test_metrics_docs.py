"""The metrics pipeline/metrics.py defines, its documented table and the Grafana dashboard agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline import metrics

ROOT = Path(__file__).resolve().parents[2]


def exported_names() -> dict[str, str]:
    """Prometheus base names (ray_ prefix, counters with _total) of the RunMetrics instruments -> type."""
    m = metrics.RunMetrics("x")  # ray.util.metrics instruments can be made before Ray starts
    out = {}
    for v in vars(m).values():
        name = getattr(v, "_name", None)
        if name:
            kind = type(v).__name__.lower()
            out[f"ray_{name}" + ("_total" if kind == "counter" else "")] = kind
    return out


def test_documented_table_lists_every_metric_with_its_type():
    rows = re.findall(r"^\| (ray_cpmv_\w+) \| (\w+) \|", metrics.__doc__, re.M)
    assert dict(rows) == exported_names()


def test_readme_lists_every_metric():
    readme = (ROOT / "README.md").read_text()
    assert all(name in readme for name in exported_names())


def test_dashboard_queries_only_known_metrics_and_covers_them():
    dash = json.loads((ROOT / "infra" / "grafana-cpmv.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"ray_cpmv_\w+", e)}
    assert used == set(exported_names())
    assert all('cpmv_job=~"$cpmv_job"' in e for e in exprs)

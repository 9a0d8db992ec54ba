"""The run's Prometheus metrics (pipeline/metrics.py), scraped from a local Ray node's metrics
endpoint after a real tiny run, agree with the run record and the result rows."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

JOB = """
name: metrics
input: {{uris: ["{corpus}/"]}}
output: {{uri: "{out}", commit_every_units: 2, commit_every_s: 600}}
model: {{name: tiny, max_slice_nums: 1, cache_dir: "{cache}"}}
tasks:
  - {{name: ocr, max_new_tokens: 12}}
engine: {{batch_size: 2}}
ray: {{num_cpus: 2, metrics_export_port: {port}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name -> [(labels, value)] of every sample in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(found: dict, name: str, **labels: str) -> float:
    return sum(v for lab, v in found.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_scraped_metrics_equal_the_run(tmp_path):
    import pymupdf

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        doc = pymupdf.open()
        for p in range(2):
            doc.new_page(width=300, height=400).insert_text((30, 60), f"doc {i} page {p}", fontsize=14)
        doc.save(corpus / f"doc{i}.pdf")
    (corpus / "empty.pdf").write_bytes(b"")
    port = free_port()
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(corpus=corpus, out=tmp_path / "out", cache=tmp_path / "cache", port=port))
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp"),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "RAY_metrics_report_interval_ms": "1000"}
    env.pop("RAY_ADDRESS", None)
    scrape = tmp_path / "scrape.txt"
    proc = subprocess.run([sys.executable, "-m", "tests.metrics_driver", str(job), str(scrape)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = samples(scrape.read_text())
    (rec_path,) = (tmp_path / "out" / "_runs").glob("*.json")
    rec = json.loads(rec_path.read_text())
    rows = [r for r in pq.read_table(tmp_path / "out" / "results").to_pylist()]
    tags = {"cpmv_job": "metrics"}
    assert total(found, "ray_cpmv_units_total", kind="page", **tags) == rec["throughput"]["pages"] == 6
    for (task, status), n in Counter((r["task"], r["status"]) for r in rows).items():
        assert total(found, "ray_cpmv_results_total", task=task, status=status) == n
    errors = Counter(r["error_type"] for r in rows if r["status"] == "error")
    assert errors and all(total(found, "ray_cpmv_errors_total", error_type=e) == n
                          for e, n in errors.items())
    assert total(found, "ray_cpmv_completion_tokens_total") == rec["throughput"]["completion_tokens"] > 0
    assert total(found, "ray_cpmv_prompt_tokens_total") == rec["throughput"]["prompt_tokens"]
    assert total(found, "ray_cpmv_sources_done_total") == 4
    assert total(found, "ray_cpmv_windows_committed_total") == rec["stages"]["commit"]["windows"] >= 2
    assert total(found, "ray_cpmv_commit_lag_seconds_count") == 4
    # gauges, as scraped while the run went on (Ray's agent drops a gauge soon after its last update)
    during = samples(Path(str(scrape) + ".during").read_text())
    assert total(during, "ray_cpmv_sources_planned") == 4
    assert {lab["queue"] for lab, _ in during["ray_cpmv_queue_depth"]} == {"results", "open", "window"}
    assert all(v >= 0 for _, v in during["ray_cpmv_queue_depth"])
    assert len(during["ray_cpmv_engine_occupancy"]) == 1 and 0 <= total(during, "ray_cpmv_engine_occupancy") <= 1

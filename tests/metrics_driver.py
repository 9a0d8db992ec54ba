"""Runs a job in this process, then scrapes the local Ray node's metrics endpoint until the run's
final figures are exported, and writes the scrape to OUT: `python -m tests.metrics_driver JOB OUT`.

The driver process must outlive the run for its last metrics to be exported (Ray pushes a
process's metrics every RAY_metrics_report_interval_ms); `cpmv run` exits at once, so the test
drives `run_job` itself. Gauges are dropped by Ray's agent two export intervals after their last
update, so a thread also scrapes during the run and OUT.during keeps the last scrape that had them.
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
from pathlib import Path


def main(job_path: str, out: str) -> int:
    import ray

    from pipeline.config import load_job
    from pipeline.progress import ProgressOptions
    from pipeline.run import run_job

    job = load_job(job_path)
    url = f"http://127.0.0.1:{job.ray.metrics_export_port}/metrics"
    done = threading.Event()

    def scrape_during() -> None:
        while not done.wait(0.5):
            try:
                text = urllib.request.urlopen(url, timeout=5).read().decode()
            except OSError:
                continue
            if "ray_cpmv_queue_depth{" in text:
                Path(out + ".during").write_text(text)

    scraper = threading.Thread(target=scrape_during, daemon=True)
    scraper.start()
    summary = run_job(job, progress=ProgressOptions("log", 1.0), html=False)
    done.set()
    scraper.join()
    want = "ray_cpmv_units_total{"
    body = ""
    deadline = time.monotonic() + 90
    units = summary.counts.get("units", 0)
    while time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            body = ""
        got = sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(want))
        if units and got >= units and "ray_cpmv_windows_committed_total{" in body:
            time.sleep(3)  # one more export, so every counter of the last batch is in
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            break
        time.sleep(1)
    Path(out).write_text(body)
    ray.shutdown()
    return 0 if summary.status == "complete" else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

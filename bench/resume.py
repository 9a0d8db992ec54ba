"""resume.json: what a run killed half-way costs the rerun (issue 14, "Measured").

- Input: N one-page PDFs (made with pymupdf, cached under the bench cache), one unit each, so
  sources = units = engine requests of a clean run.
- Job: `cpmv run` in a subprocess (its own RAY_TMPDIR, local Ray on 127.0.0.1, HF_HUB_OFFLINE), the
  tiny MiniCPM-V 4.6 (`model.name: tiny`, one slice), OCR with a few output tokens, commit windows of
  N/10 units (`--window-units`) so that several windows publish before the kill.
- Run 1 is killed with SIGKILL (its whole process group: driver, raylet, workers) once the engine has
  answered about half of the units (the CPMV_ENGINE_CALL_LOG file, one line per request, polled);
  the call count is read once orphaned workers have stopped adding to it. Run 2 runs to completion.
- Figures: engine requests of the rerun / N (goal <= 0.5 + one window's share, i.e. 0.5 +
  window_units / N), all requests of both runs / N (goal <= 1.1), duplicated and missing keys
  (source_id, unit_index, tile_index, task) over results/*.parquet (goal 0 and 0), published sources
  at the kill, wall times, window settings, and the run records' statuses.

No wall-clock assertions: the figures are printed and written to bench/results/resume.json.

    flock /tmp/cpmv-ray.lock .venv/bin/python -m bench.resume [--n 2500] [--window-units N/10] [--kill-at 0.5]

The helpers here (corpus, job file, running `cpmv run` with the driver's peak RSS, counting calls and
output keys) are shared with bench/scale.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import CACHE_DIR, machine, write_result

NAME = "resume"
ROOT = Path(__file__).resolve().parent.parent
GOAL_TOTAL = 1.1

JOB = """\
name: {name}
input: {{uris: ["{corpus}/"]}}
output: {{uri: "{out}", commit_every_units: {window_units}, commit_every_s: {window_s}}}
model: {{name: tiny, max_slice_nums: 1, cache_dir: "{cache}"}}
tasks:
  - {{name: ocr, max_new_tokens: {tokens}}}
engine: {{batch_size: {batch}}}
ray: {{num_cpus: 2}}
checks: {{enabled: false}}  # engine requests are counted: tiny replies run to the cap and would be retried
"""

# Runs pipeline.cli.main in this process and then writes the process's own peak RSS (the driver
# only: Ray's raylet, GCS and workers are other processes). VmHWM is reset by exec, ru_maxrss is
# not (Linux carries it over from the parent at fork), so both are recorded.
DRIVER = """\
import json, os, resource, sys
from pipeline.cli import main
rc = main(sys.argv[1:])
hwm = next((int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")), None)
with open(os.environ["CPMV_BENCH_RSS_OUT"], "w") as f:
    json.dump({"ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "vm_hwm_kb": hwm}, f)
sys.exit(rc)
"""


# --------------------------------------------------------------------------------------------------
# Inputs


def pdf_corpus(n: int, pages: int = 1) -> Path:
    """`n` small PDFs of `pages` pages (300x400 pt, one line of text), generated once under the cache."""
    d = CACHE_DIR / f"durable-{n}x{pages}p"
    done = d / ".complete"
    if done.is_file():
        return d / "pdfs"
    import pymupdf

    (d / "pdfs").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        doc = pymupdf.open()
        for p in range(pages):
            page = doc.new_page(width=300, height=400)
            page.insert_text((30, 60), f"document {i} page {p}", fontsize=14)
        doc.save(d / "pdfs" / f"doc{i:05d}.pdf")
        doc.close()
    done.write_text(str(n))
    return d / "pdfs"


def model_cache() -> Path:
    """Shared by every run, so the tiny checkpoint is built once."""
    p = CACHE_DIR / "tiny-model"
    p.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------------------------------
# One workspace: job file, environment, call log, output prefix


class Workspace:
    """A temp dir holding one job's file, output prefix, call log and run logs."""

    def __init__(self, name: str, corpus: Path, window_units: int, window_s: float = 300.0, tokens: int = 2,
                 batch: int = 4, keep: bool = False):
        self.dir = Path(tempfile.mkdtemp(prefix=f"cpmv-bench-{name}-", dir=CACHE_DIR))
        self.out = self.dir / "out"
        self.call_log = self.dir / "calls.log"
        self.job = self.dir / "job.yaml"
        self.job.write_text(JOB.format(name=name, corpus=corpus, out=self.out, window_units=window_units,
                                       window_s=window_s, cache=model_cache(), tokens=tokens, batch=batch))
        self.keep = keep
        self.runs = 0

    def env(self) -> dict[str, str]:
        ray_tmp = tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "CPMV_ENGINE_CALL_LOG": str(self.call_log),
               "PYTHONUNBUFFERED": "1", "CPMV_BENCH_RSS_OUT": str(self.dir / f"rss-{self.runs}.json")}
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self) -> tuple[subprocess.Popen, Path, Path]:
        """Start `cpmv run` (driver wrapped to report its peak RSS) in a new process group."""
        self.runs += 1
        env = self.env()
        log = self.dir / f"run-{self.runs}.log"
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, "run", str(self.job)], env=env, cwd=self.dir,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        return proc, log, Path(env["CPMV_BENCH_RSS_OUT"])

    def run(self, timeout: float = 7200, sample_s: float = 0.5) -> dict[str, Any]:
        """One `cpmv run` to the end: exit code, wall seconds, driver peak RSS, engine requests made, and
        `calls_timeline`: (seconds since start, engine requests so far) each time the count moved;
        `rss_timeline`: (seconds, requests, driver RSS MiB, of which anonymous, of which shared memory:
        Ray's object store pages the driver mapped) every 5 s."""
        before = self.calls()
        proc, log, rss_file = self.start()
        t0 = time.perf_counter()
        timeline: list[tuple[float, int]] = [(0.0, 0)]
        rss_tl: list[tuple[float, int, float, float, float]] = []
        next_rss = 0.0
        while proc.poll() is None:
            elapsed = time.perf_counter() - t0
            if elapsed > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise SystemExit(f"cpmv run still running after {timeout} s; log {log}")
            now = self.calls() - before
            if now != timeline[-1][1]:
                timeline.append((round(elapsed, 2), now))
            if elapsed >= next_rss:
                mem = _proc_rss_mb(proc.pid)
                if mem:
                    rss_tl.append((round(elapsed, 1), now, *mem))
                next_rss += 5.0
            time.sleep(sample_s)
        rc = proc.returncode
        wall = time.perf_counter() - t0
        now = self.calls() - before
        if now != timeline[-1][1]:
            timeline.append((round(wall, 2), now))
        _reap(proc.pid)
        if rc != 0:
            raise SystemExit(f"cpmv run exited {rc}; log {log}:\n{log.read_text()[-3000:]}")
        rss = json.loads(rss_file.read_text()) if rss_file.is_file() else {}
        return {"exit_code": rc, "wall_s": round(wall, 2), "engine_requests": self.calls() - before,
                "driver_peak_rss_mb": round(rss["vm_hwm_kb"] / 1024, 1) if rss.get("vm_hwm_kb") else None,
                "driver_ru_maxrss_mb": round(rss["ru_maxrss_kb"] / 1024, 1) if rss.get("ru_maxrss_kb") else None,
                "log": str(log), "summary_tail": _summary(log), "calls_timeline": timeline,
                "rss_timeline": rss_tl}

    def calls(self) -> int:
        try:
            with open(self.call_log, "rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def settled_calls(self, quiet_s: float = 5.0) -> int:
        """The call count once orphaned workers of a killed run have stopped adding to it."""
        last, since = self.calls(), time.monotonic()
        while time.monotonic() - since < quiet_s:
            time.sleep(0.5)
            now = self.calls()
            if now != last:
                last, since = now, time.monotonic()
        return last

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.out / "_runs").glob("*.json"))]

    def cleanup(self) -> None:
        if not self.keep:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)


def _reap(pgid: int) -> None:
    """Kill what a finished run may have left in its process group (none expected)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _proc_rss_mb(pid: int) -> tuple[float, float, float] | None:
    """(VmRSS, RssAnon, RssShmem) of a running process in MiB, None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in lines if ln.startswith(("VmRSS:", "RssAnon:", "RssShmem:"))}
    if "VmRSS" not in kb:
        return None
    return round(kb["VmRSS"] / 1024, 1), round(kb.get("RssAnon", 0) / 1024, 1), round(kb.get("RssShmem", 0) / 1024, 1)


def _summary(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("run ")), None)
    return "\n".join(lines[start:start + 8]) if start is not None else ""


def output_keys(out: Path, expected_sources: list[str] | None = None) -> dict[str, Any]:
    """Keys (source_id, unit_index, tile_index, task) over results/*.parquet: duplicates, and sources of
    the corpus with no key (losses); documents rows per source."""
    import pyarrow.parquet as pq

    cols = ["source_id", "source_uri", "unit_index", "tile_index", "task", "status"]
    files = sorted((out / "results").glob("*.parquet"))
    keys: Counter = Counter()
    uris: set[str] = set()
    status: Counter = Counter()
    for f in files:
        t = pq.read_table(f, columns=cols)
        for sid, uri, u, tile, task, st in zip(*(t.column(c).to_pylist() for c in cols)):
            keys[(sid, u, tile, task)] += 1
            uris.add(uri)
            status[st] += 1
    docs = Counter()
    for f in sorted((out / "documents").glob("*.parquet")):
        docs.update(pq.read_table(f, columns=["source_id"]).column("source_id").to_pylist())
    res = {"result_files": len(files), "result_rows": sum(keys.values()), "distinct_keys": len(keys),
           "duplicate_keys": sum(v - 1 for v in keys.values() if v > 1), "results_by_status": dict(status),
           "documents_rows": sum(docs.values()), "documents_duplicates": sum(v - 1 for v in docs.values() if v > 1)}
    if expected_sources is not None:
        res["missing_sources"] = len(set(expected_sources) - {u.removeprefix("file://") for u in uris})
    return res


def corpus_uris(corpus: Path) -> list[str]:
    return sorted(str(p) for p in corpus.glob("*.pdf"))


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------------


def measure(n: int, window_units: int, kill_at: float, tokens: int, keep: bool) -> dict[str, Any]:
    corpus = pdf_corpus(n)
    ws = Workspace(NAME, corpus, window_units=window_units, tokens=tokens, keep=keep)
    try:
        # Run 1: killed with SIGKILL (driver and everything it started) at about kill_at of the units.
        target = int(round(n * kill_at))
        proc, log1, _ = ws.start()
        t0 = time.perf_counter()
        load_before = loadavg()
        while ws.calls() < target:
            if proc.poll() is not None:
                raise SystemExit(f"run 1 ended (exit {proc.returncode}) before {target} engine requests; "
                                 f"raise --n. Log {log1}:\n{log1.read_text()[-3000:]}")
            time.sleep(0.05)
        calls_at_kill = ws.calls()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_after = time.perf_counter() - t0
        first = ws.settled_calls()
        published = output_keys(ws.out)
        # Run 2: to completion.
        second = ws.run()
        load_after = loadavg()
        keys = output_keys(ws.out, corpus_uris(corpus))
        statuses = sorted(r["status"] for r in ws.records())
        rec2 = [r for r in ws.records() if r["status"] == "complete"]
    finally:
        ws.cleanup()
    rerun = second["engine_requests"]
    total = first + rerun
    goal_rerun = 0.5 + window_units / n
    result = {
        "n_sources": n,
        "units": n,
        "pages_per_source": 1,
        "window": {"commit_every_units": window_units, "commit_every_s": 300.0, "window_share": window_units / n},
        "model": "tiny (MiniCPM-V 4.6 architecture, random weights), max_slice_nums 1",
        "max_new_tokens": tokens,
        "kill": {"target_requests": target, "requests_when_killed": calls_at_kill,
                 "requests_settled": first, "killed_after_s": round(killed_after, 2),
                 "published_sources_at_kill": published["documents_rows"],
                 "published_result_rows_at_kill": published["result_rows"]},
        "rerun": {k: v for k, v in second.items() if k not in ("log", "calls_timeline", "rss_timeline")},
        "rerun_counts": rec2[0]["counts"] if rec2 else None,
        "engine_requests": {"run1": first, "rerun": rerun, "total": total},
        "rerun_requests_per_source": round(rerun / n, 4),
        "goal_rerun_per_source": round(goal_rerun, 4),
        "total_requests_per_source": round(total / n, 4),
        "goal_total_per_source": GOAL_TOTAL,
        "duplicate_keys": keys["duplicate_keys"],
        "missing_sources": keys["missing_sources"],
        "lost_keys": n - keys["distinct_keys"],
        "output": keys,
        "run_records": statuses,
        "wall_s": {"run1_until_kill": round(killed_after, 2), "rerun": second["wall_s"]},
        "loadavg": {"before": load_before, "after": load_after},
        "at_goal": {"rerun": rerun / n <= goal_rerun, "total": total / n <= GOAL_TOTAL,
                    "exactly_once": keys["duplicate_keys"] == 0 and n - keys["distinct_keys"] == 0
                    and keys["missing_sources"] == 0},
    }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2500, help="sources (one-page PDFs)")
    ap.add_argument("--window-units", type=int, default=None, help="output.commit_every_units (default N/10)")
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of the units answered at the kill")
    ap.add_argument("--tokens", type=int, default=2, help="max_new_tokens of the OCR task")
    ap.add_argument("--keep", action="store_true", help="keep the workspace (output, logs) under the cache dir")
    args = ap.parse_args(argv)
    window = args.window_units or max(1, args.n // 10)
    t0 = time.perf_counter()
    res = measure(args.n, window, args.kill_at, args.tokens, args.keep)
    res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    res["machine"] = machine()
    path = write_result(NAME, res)
    print(json.dumps({k: res[k] for k in ("n_sources", "window", "kill", "engine_requests",
                                          "rerun_requests_per_source", "goal_rerun_per_source",
                                          "total_requests_per_source", "duplicate_keys", "missing_sources",
                                          "lost_keys", "wall_s", "at_goal")}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

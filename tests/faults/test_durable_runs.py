"""Durable runs, end to end: `cpmv run` (real Ray, tiny MiniCPM-V 4.6) killed, interrupted, rerun.

Each test runs the console script in a subprocess with its own Ray temp dir, over a local corpus of
small PDFs, with commit windows of a few units so that a run publishes several windows. Engine work
is counted through the CPMV_ENGINE_CALL_LOG hook (one line per request).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
N_PDFS = 10
PAGES = 2

JOB = """
name: durable
{run_id}
input: {{uris: ["{corpus}/"]}}
output: {{uri: "{out}", commit_every_units: 4, commit_every_s: 600}}
model: {{name: tiny, max_slice_nums: 1, cache_dir: "{cache}"}}
tasks:
  - {{name: ocr, max_new_tokens: 24}}
engine: {{batch_size: 2}}
ray: {{num_cpus: 2}}
checks: {{enabled: false}}  # durability is tested here; tiny random replies run to the cap (tests/engines/test_reply_checks.py)
"""


def make_corpus(d: Path, n: int, start: int = 0) -> None:
    import pymupdf

    d.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        doc = pymupdf.open()
        for p in range(PAGES):
            page = doc.new_page(width=300, height=400)
            page.insert_text((30, 60), f"document {i} page {p}", fontsize=14)
        doc.save(d / f"doc{i:03d}.pdf")


@pytest.fixture
def env_dir(tmp_path):
    make_corpus(tmp_path / "corpus", N_PDFS)
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "CPMV_ENGINE_CALL_LOG": str(tmp_path / "calls.log"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return tmp_path, env


def job_file(tmp: Path, run_id: str | None = None, out: str | None = None) -> Path:
    p = tmp / "job.yaml"
    p.write_text(JOB.format(corpus=tmp / "corpus", out=out or tmp / "out", cache=tmp / "cache",
                            run_id=f"run_id: {run_id}" if run_id else ""))
    return p


def cpmv(tmp: Path, env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job_file(tmp)), *args], env=env,
                          cwd=tmp, capture_output=True, text=True, timeout=timeout)


def start(tmp: Path, env: dict, *args: str, out: str | None = None) -> subprocess.Popen:
    log = open(tmp / f"run-{time.time_ns()}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(job_file(tmp, out=out)), *args], env=env,
                            cwd=tmp, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_windows(out: Path, n: int, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        docs = list((out / "documents").glob("*.parquet")) if (out / "documents").exists() else []
        if len(docs) >= n:
            return
        assert proc.poll() is None, "the run ended before publishing a window"
        time.sleep(0.2)
    raise TimeoutError(f"no {n} windows published in {timeout} s")


def calls(tmp: Path) -> int:
    p = tmp / "calls.log"
    return len(p.read_text().splitlines()) if p.exists() else 0


def settled_calls(tmp: Path, quiet_s: float = 5.0) -> int:
    """The call count once the killed run's orphaned Ray workers have stopped adding to it."""
    last, since = calls(tmp), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.5)
        now = calls(tmp)
        if now != last:
            last, since = now, time.monotonic()
    return last


def output(tmp: Path) -> tuple[list[dict], list[dict]]:
    out = tmp / "out"
    return pq.read_table(out / "results").to_pylist(), pq.read_table(out / "documents").to_pylist()


def assert_exactly_once(tmp: Path) -> tuple[list[dict], list[dict]]:
    results, docs = output(tmp)
    keys = Counter((r["source_id"], r["unit_index"], r["tile_index"], r["task"]) for r in results)
    assert max(keys.values()) == 1, [k for k, v in keys.items() if v > 1]
    assert len(keys) == N_PDFS * PAGES and all(r["status"] == "ok" for r in results)
    assert len({d["source_id"] for d in docs}) == len(docs) == N_PDFS
    return results, docs


def records(tmp: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp / "out" / "_runs").glob("*.json"))]


def test_sigkill_mid_run_then_rerun_redoes_only_unpublished_sources(env_dir):
    tmp, env = env_dir
    proc = start(tmp, env)
    wait_for_windows(tmp / "out", 1, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    first_calls = settled_calls(tmp)
    _, docs_before = output(tmp)
    published = {d["source_id"] for d in docs_before}
    assert 0 < len(published) < N_PDFS
    assert (tmp / "out" / "_staging").exists()
    second = cpmv(tmp, env)
    assert second.returncode == 0, second.stderr[-3000:]
    _, docs = assert_exactly_once(tmp)
    rerun_calls = calls(tmp) - first_calls
    # the rerun made no engine call for a page of an already published source
    assert rerun_calls == (N_PDFS - len(published)) * PAGES, (rerun_calls, len(published))
    # the dead run's staging is gone and its record says it was abandoned
    assert not [p for p in (tmp / "out" / "_staging").rglob("*") if p.is_file()]
    statuses = sorted(r["status"] for r in records(tmp))
    assert statuses == ["abandoned", "complete"], statuses
    assert f"{len(published)} skipped (already committed)" in second.stdout


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_publishes_what_is_complete_and_exits_cleanly(env_dir, sig, code):
    tmp, env = env_dir
    proc = start(tmp, env)
    wait_for_windows(tmp / "out", 1, proc)
    t0 = time.monotonic()
    os.kill(proc.pid, sig)  # the driver only, as Kubernetes and a terminal's Ctrl-C do
    rc = proc.wait(timeout=120)
    stopped_in = time.monotonic() - t0
    log = next(iter(sorted(tmp.glob("run-*.log")))).read_text()
    assert rc == code, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    (rec,) = records(tmp)
    assert rec["status"] == "interrupted" and rec["finished_at"]
    _, docs = output(tmp)
    assert len(docs) >= 1
    assert stopped_in < 60, stopped_in  # the stated bound (README "Signals")
    second = cpmv(tmp, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_exactly_once(tmp)


def test_fixed_run_id_never_overwrites_earlier_runs(env_dir):
    tmp, env = env_dir
    for i in range(3):
        if i:
            make_corpus(tmp / "corpus", 1, start=N_PDFS + i - 1)
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job_file(tmp, "nightly"))],
                              env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    results, docs = output(tmp)
    assert len(docs) == len({d["source_id"] for d in docs}) == N_PDFS + 2
    assert {d["run_id"] for d in docs} == {"nightly"}
    assert len({d["attempt"] for d in docs}) == 3  # three attempts, each in its own files
    assert len(records(tmp)) == 3
    assert calls(tmp) == (N_PDFS + 2) * PAGES  # nothing redone


def test_transient_errors_are_retried_by_the_next_run_permanent_ones_on_request(env_dir):
    """Run 1's engine is an HTTP server that is down (connection errors: transient); run 2 has a
    working engine and redoes exactly those sources; an empty file (permanent) is redone only with
    --retry-errors."""
    import socket

    tmp, env = env_dir
    (tmp / "corpus" / "empty.pdf").write_bytes(b"")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = ["--set", "engine.kind=openai", "--set", f"engine.openai.base_url=http://127.0.0.1:{port}",
            "--set", "engine.openai.max_retries=0", "--set", "model.family=minicpmv4_6"]
    first = cpmv(tmp, env, *down)
    assert first.returncode == 0, first.stderr[-3000:]
    results, docs = output(tmp)
    assert {r["error_type"] for r in results if r["source_uri"].endswith("doc000.pdf")} == {"connection_error"}
    assert calls(tmp) == N_PDFS * PAGES  # one failed request per page

    second = cpmv(tmp, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{N_PDFS} re-run (connection_error x{N_PDFS})" in second.stdout, second.stdout
    results, docs = output(tmp)
    mine = [r for r in results if not r["source_uri"].endswith("empty.pdf")]
    keys = Counter((r["source_id"], r["unit_index"], r["tile_index"], r["task"]) for r in mine)
    assert max(keys.values()) == 1 and len(keys) == N_PDFS * PAGES
    assert all(r["status"] == "ok" for r in mine)
    empty = [d for d in docs if d["source_uri"].endswith("empty.pdf")]
    assert len(empty) == 1 and empty[0]["error_type"] == "empty_file" and len(docs) == N_PDFS + 1
    rec = sorted(records(tmp), key=lambda r: r["started_at"])[-1]
    assert rec["retried"] == {"connection_error": N_PDFS} and rec["counts"]["retried_sources"] == N_PDFS

    third = cpmv(tmp, env)  # nothing transient left: the empty file's permanent error stays committed
    assert "0 processed" in third.stdout, third.stdout
    fourth = cpmv(tmp, env, "--retry-errors", "empty_file")
    assert "1 processed" in fourth.stdout and "empty_file x1" in fourth.stdout, fourth.stdout
    _, docs = output(tmp)
    empty = [d for d in docs if d["source_uri"].endswith("empty.pdf")]
    latest = sorted(records(tmp), key=lambda r: r["started_at"])[-1]
    assert len(empty) == 1 and empty[0]["attempt"] == latest["attempt"]  # re-published by the fourth run
    assert len(docs) == N_PDFS + 1


def test_s3_server_restart_mid_run_is_ridden_out(env_dir, s3_server):
    """FAULT INJECTION at the store: the S3 server holding the output is killed after the first
    window and restarted 8 s later (same data, same port); commits retry and the run completes."""
    tmp, env = env_dir
    bucket = s3_server.make_bucket()
    env = {**env, **s3_server.env()}
    out = f"s3://{bucket}/out"
    proc = start(tmp, env, out=out)
    fs = s3_server.client()
    deadline = time.monotonic() + 400
    while not [k for k in fs.find(f"{bucket}/out/documents/") if k.endswith(".parquet")]:
        assert proc.poll() is None and time.monotonic() < deadline, "no window published"
        time.sleep(0.3)
    s3_server.crash()
    time.sleep(8)
    s3_server.start_again()
    rc = proc.wait(timeout=600)
    log = next(iter(sorted(tmp.glob("run-*.log")))).read_text()
    assert rc == 0, log[-4000:]
    # A commit that falls in the outage waits in the S3 client's own retries or in ours ("commit
    # failed ... retrying"); either way no window is lost and nothing is published twice.
    fs = s3_server.client()
    fs.get(f"{bucket}/out/", str(tmp / "out") + "/", recursive=True)
    assert_exactly_once(tmp)
    (rec,) = records(tmp)
    assert rec["status"] == "complete"


def test_engine_node_killed_on_a_3_node_cluster(env_dir):
    """The worker node that runs the engine actor is removed mid-run (its raylet and workers die);
    Ray restarts the actor on the other node and the run completes exactly once."""
    tmp, env = env_dir
    d = tmp / "cluster"
    d.mkdir()
    cluster = subprocess.Popen([sys.executable, "-m", "tests.ray_cluster", str(d)], env=env, cwd=ROOT,
                               stdout=open(tmp / "cluster.log", "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (d / "address").exists():
            assert cluster.poll() is None and time.monotonic() < deadline, (tmp / "cluster.log").read_text()[-3000:]
            time.sleep(0.2)
        proc = start(tmp, {**env, "RAY_ADDRESS": (d / "address").read_text()})
        wait_for_windows(tmp / "out", 1, proc)
        (d / "kill-engine-node").touch()
        deadline = time.monotonic() + 60
        while not (d / "killed").exists():
            assert time.monotonic() < deadline, "the engine node was not found"
            time.sleep(0.2)
        rc = proc.wait(timeout=600)
        log = next(iter(sorted(tmp.glob("run-*.log")))).read_text()
        assert rc == 0, log[-4000:]
    finally:
        (d / "stop").touch()
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(cluster.pid, signal.SIGKILL)
    assert_exactly_once(tmp)
    (rec,) = records(tmp)
    assert rec["status"] == "complete"


def test_engine_actor_out_of_restarts_rebuilds_the_plan_for_the_rest(env_dir):
    """The engine actor's process is killed with engine.max_restarts 0: Ray Data gives up on the
    plan; the run keeps what is complete and rebuilds the plan for the rest (ray.plan_restarts)."""
    import psutil

    tmp, env = env_dir
    proc = start(tmp, env, "--set", "engine.max_restarts=0")
    wait_for_windows(tmp / "out", 1, proc)
    engines = [p for p in psutil.process_iter(["pid", "cmdline"])
               if "MapBatches(InferStage)" in " ".join(p.info["cmdline"] or [])]
    assert engines
    for p in engines:
        p.kill()
    rc = proc.wait(timeout=600)
    log = next(iter(sorted(tmp.glob("run-*.log")))).read_text()
    assert rc == 0, log[-4000:]
    assert "rebuilding it for the" in log
    assert_exactly_once(tmp)
    (rec,) = records(tmp)
    assert rec["status"] == "complete" and rec["counts"]["plan_restarts"] == 1

"""The watchdog (pipeline/watchdog.py) on real processes: a child that blocks in C keeping the GIL, or
grows past its memory limit, is recorded and killed by its monitor; a child that works, pauses or
exits is left alone, and its monitor goes with it. The clocks of `SourceGuard` on a fake clock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.config import LimitsConfig
from pipeline.watchdog import SourceGuard, Stuck

ROOT = Path(__file__).resolve().parents[2]

# The child: a Watchdog with a monitor, one source, then the step under test. `block()` is a C call
# that never returns and keeps the GIL (ctypes.PyDLL does not release it), as a stuck MuPDF render.
CHILD = textwrap.dedent("""
    import ctypes, json, os, sys, time
    from pipeline.config import LimitsConfig, StorageConfig
    from pipeline.watchdog import Watchdog

    def block():
        pause = ctypes.PyDLL(None).pause
        while True:
            pause()

    args = json.loads(sys.argv[1])
    wd = Watchdog(LimitsConfig(**args["limits"]), args["state"], StorageConfig(), kill=True)
    print(json.dumps({"monitor": wd.monitor_pid}), flush=True)
    guard = wd.source("src-1")
""")


def _run(tmp_path: Path, step: str, timeout: float = 30, **limits) -> tuple[subprocess.CompletedProcess, list[dict], float]:
    state = tmp_path / "state"
    args = json.dumps({"limits": limits, "state": str(state)})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CHILD + textwrap.dedent(step), args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    elapsed = time.monotonic() - t0
    records = [json.loads(p.read_text()) for p in sorted(state.glob("*.json"))] if state.exists() else []
    return proc, records, elapsed


def _gone(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_unit_stuck_in_c_is_recorded_then_its_process_killed(tmp_path):
    proc, records, elapsed = _run(tmp_path, """
        guard.enter(3)
        block()
    """, page_timeout_s=0.5)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(records) == 1
    rec = records[0]
    assert (rec["source_id"], rec["unit_index"], rec["kind"], rec["value"]) == ("src-1", 3, "page_timeout", 0.5)
    assert 0.5 <= rec["observed"] < 5
    assert elapsed < 20
    assert _gone(json.loads(proc.stdout.splitlines()[0])["monitor"])


def test_a_source_past_its_limit_is_killed_after_the_grace(tmp_path):
    # Untimed units (video clips) have only the source's deadline; the kill waits SOURCE_GRACE (>= 1 s).
    proc, records, _ = _run(tmp_path, """
        guard.enter(0, timed=False)
        guard.pause()
        time.sleep(0.6)  # paused: waiting for the pipeline does not count
        guard.resume()
        guard.enter(1, timed=False)
        block()
    """, source_timeout_s=0.5)
    assert proc.returncode == -signal.SIGKILL
    assert [(r["unit_index"], r["kind"], r["value"]) for r in records] == [(1, "source_timeout", 0.5)]
    assert records[0]["elapsed_s"] >= 1.5  # the limit plus the grace, without the paused 0.6 s counted
    assert records[0]["elapsed_s"] < 1.5 + 0.6 + 3


def test_a_worker_over_its_memory_limit_is_recorded_then_killed(tmp_path):
    proc, records, _ = _run(tmp_path, """
        limit = wd.limits.max_worker_memory_mb
        guard.enter(7)
        hog = b"x" * ((limit + 200) * 2**20)  # touched pages: all of it resident
        block()
    """, max_worker_memory_mb=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [(r["unit_index"], r["kind"], r["value"]) for r in records] == [(7, "worker_memory", 300)]
    assert records[0]["observed"] > 300


def test_work_within_the_limits_and_pauses_are_left_alone(tmp_path):
    proc, records, _ = _run(tmp_path, """
        for i in range(4):
            guard.enter(i)
            time.sleep(0.2)  # each unit well within its 1 s
            guard.pause()
            time.sleep(1.5)  # waiting for the pipeline to take the output: not the unit's time
            guard.resume()
        guard.end()
        time.sleep(1.5)  # between sources nothing is watched
        wd.close()
        print("done")
    """, page_timeout_s=1.0, source_timeout_s=1.5)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "done" and records == []


def test_the_monitor_ends_with_its_process(tmp_path):
    proc, records, _ = _run(tmp_path, """
        guard.enter(0)
        os._exit(0)  # no close(): the monitor must notice by itself
    """)
    assert proc.returncode == 0 and records == []
    assert _gone(json.loads(proc.stdout.splitlines()[0])["monitor"])


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr("pipeline.watchdog.time.monotonic", c)
    return c


def _guard(records=(), **limits) -> SourceGuard:
    return SourceGuard(bytearray(4096), LimitsConfig(**limits), "s", list(records))


def test_the_source_clock_stops_while_paused_and_stops_the_source_between_units(clock):
    g = _guard(source_timeout_s=10)
    assert g.enter(-1, timed=False) and g.enter(0)
    clock.now += 6
    g.pause()
    clock.now += 100  # the output waited to be taken
    g.resume()
    assert g.enter(1)
    clock.now += 5
    assert not g.enter(2) and g.stopped_at == 2
    assert not g.enter(1) and g.stopped_at == 1  # the first unit not processed wins
    unit = g.stop_unit("page")
    assert (unit.unit_index, unit.error_type) == (1, "source_timeout")
    assert unit.error_message == ("the source ran past limits.source_timeout_s=10 s; "
                                  "page 2 and the pages after it were not processed")


def test_a_retry_replays_the_recorded_units_then_goes_on_from_the_stopped_attempts_time(clock):
    records = [Stuck("s", 4, "page_timeout", 60, 61, 55.0), Stuck("s", 2, "worker_memory", 100, 130, 20.0)]
    g = _guard(records, source_timeout_s=60)
    assert g.recorded(4).kind == "page_timeout" and g.recorded(2).kind == "worker_memory" and g.recorded(3) is None
    g.enter(-1, timed=False)
    for i in range(5):
        clock.now += 20  # slower than the stopped attempt: no cooperative stop among recorded units
        assert g.enter(i)
    assert g.enter(5)  # past the records: 60 - 55 = 5 s left
    clock.now += 6
    assert not g.enter(6) and g.stopped_at == 6


def test_a_recorded_source_timeout_stops_at_its_unit_whatever_the_time(clock):
    g = _guard([Stuck("s", 3, "source_timeout", 600, 630, 630)], source_timeout_s=600)
    g.n_units = 5
    assert all(g.enter(i) for i in range(-1, 3))
    assert not g.enter(3)
    unit = g.stop_unit("page")
    assert (unit.unit_index, unit.error_type) == (3, "source_timeout")
    assert unit.error_message == ("the source ran past limits.source_timeout_s=600 s at page 4 and the worker was "
                                  "stopped; pages 4-5 of 5 were not processed")

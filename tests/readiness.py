"""Waiting for a server a test started: as long as its process lives and makes progress.

A fixed timeout (240 s for a vLLM server) fails a healthy but slow start on a loaded machine (load
average 30: nine tests failed so). `wait_ready` instead waits while the process tree uses CPU or
its log grows, gives up after `idle_s` without either (a hang), and stops at a generous `cap_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psutil


def _progress(pid: int, log_path: Path | None) -> tuple[float, int]:
    """(CPU seconds of the process and its children, log size in bytes): grows while work is done."""
    cpu = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                cpu += t.user + t.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    size = log_path.stat().st_size if log_path is not None and log_path.exists() else 0
    return cpu, size


def wait_ready(ready: Callable[[], bool], pid: int, alive: Callable[[], bool], log_path: Path | None = None,
               idle_s: float = 180.0, cap_s: float = 1800.0, poll_s: float = 0.5) -> float:
    """Poll `ready()` until it returns True; returns the seconds waited.

    Raises TimeoutError when the process shows no progress (CPU time or log growth) for `idle_s`
    seconds or `cap_s` passes, and RuntimeError when `alive()` turns False first.
    """
    t0 = last_change = time.monotonic()
    last = _progress(pid, log_path)
    while True:
        if not alive():
            raise RuntimeError("the process exited before it was ready")
        if ready():
            return time.monotonic() - t0
        now = time.monotonic()
        seen = _progress(pid, log_path)
        # 0.05 CPU s: a server idling in a poll loop uses less than that between two checks.
        if seen[0] > last[0] + 0.05 or seen[1] != last[1]:
            last, last_change = seen, now
        if now - last_change > idle_s:
            raise TimeoutError(f"no progress (CPU or log) for {idle_s:.0f} s after {now - t0:.0f} s")
        if now - t0 > cap_s:
            raise TimeoutError(f"not ready after the cap of {cap_s:.0f} s")
        time.sleep(poll_s)

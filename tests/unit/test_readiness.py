"""tests/readiness.py: a wait that lasts while a process makes progress, and no longer."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.readiness import wait_ready


def test_ready_while_busy_and_stuck_when_idle(tmp_path):
    flag = tmp_path / "ready"
    # Busy for ~1.5 s (CPU), then ready: a fixed wait of 1 s would have failed it.
    busy = subprocess.Popen([sys.executable, "-c", f"import time, pathlib\nt=time.time()\nwhile time.time()-t<1.5: pass\n"
                             f"pathlib.Path({str(flag)!r}).touch()\ntime.sleep(30)"])
    try:
        waited = wait_ready(flag.exists, busy.pid, lambda: busy.poll() is None, idle_s=1.0, poll_s=0.1)
        assert waited >= 1.0
    finally:
        busy.kill()
    # Asleep (no CPU, no log) and never ready: given up after idle_s, long before the cap.
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)  # past the interpreter's start-up CPU
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="no progress"):
            wait_ready(lambda: False, idle.pid, lambda: idle.poll() is None, idle_s=1.0, cap_s=60, poll_s=0.1)
        assert time.monotonic() - t0 < 10
    finally:
        idle.kill()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.raises(RuntimeError):
        wait_ready(lambda: False, dead.pid, lambda: dead.poll() is None)

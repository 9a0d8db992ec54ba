"""One run at a time per output prefix: a lease file with a heartbeat.

Recovery (rolling forward a dead run's commit, deleting its staging) is only safe when no other run
is writing the prefix. `_lock.json` names the attempt that holds it, its host and pid, and a
heartbeat refreshed every HEARTBEAT_S by a daemon thread. A lease is free when it is absent, when
its heartbeat is older than STALE_S, or when it was taken on this host by a process that no longer
exists (a driver killed a moment ago). Otherwise a second run is refused with a message that says
which run holds the prefix and how to proceed.

Taking a free lease is a write then a read-back (object stores here lack a portable
compare-and-swap); two runs started within the same second on one prefix are not told apart.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.sink import Layout

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_S = 180.0


class PrefixBusy(ConfigError):
    """Another live run holds the output prefix."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_is_live(lease: dict[str, Any], now: float | None = None) -> bool:
    """Whether the run named in a lease file may still be running."""
    now = time.time() if now is None else now
    if now - float(lease.get("heartbeat", 0)) > STALE_S:
        return False
    if lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", -1))):
        return False
    return True


class Lease:
    """Hold the prefix for `attempt` (a context manager; the heartbeat runs while it is held)."""

    def __init__(self, layout: Layout, attempt: str):
        self.layout, self.attempt = layout, attempt
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.layout.lock(), self.layout.storage, max_bytes=2**20))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a torn or foreign file: treat as free

    def _write(self) -> None:
        body = {"attempt": self.attempt, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        storage.write_bytes(self.layout.lock(), json.dumps(body).encode(), self.layout.storage)

    def acquire(self) -> None:
        held = self._read()
        if held is not None and held.get("attempt") != self.attempt and holder_is_live(held):
            age = time.time() - float(held.get("heartbeat", 0))
            raise PrefixBusy(
                f"output.uri {storage.redact(self.layout.root)} is in use by run {held.get('attempt')} "
                f"(host {held.get('host')}, pid {held.get('pid')}, heartbeat {age:.0f} s ago): wait for it to "
                f"finish, or, if it is dead, delete {storage.redact(self.layout.lock())} (it frees itself "
                f"{STALE_S:.0f} s after its last heartbeat)")
        self._write()
        back = self._read()
        if back is None or back.get("attempt") != self.attempt:
            raise PrefixBusy(f"output.uri {storage.redact(self.layout.root)}: another run took the prefix at the "
                             f"same moment ({back and back.get('attempt')})")
        self._thread = threading.Thread(target=self._beat, name="cpmv-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except Exception as err:  # noqa: BLE001 - a missed beat is retried; the run goes on
                log.warning("lease heartbeat failed: %s", storage.redact(err, self.layout.storage))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held is not None and held.get("attempt") == self.attempt:
            storage.rm(self.layout.lock(), self.layout.storage)

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.release()
        except Exception as err:  # noqa: BLE001 - never mask the run's own outcome
            log.warning("releasing the lease failed: %s", storage.redact(err, self.layout.storage))

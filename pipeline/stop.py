"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM (Kubernetes preemption, `kill`).

The first signal sets a flag the driver loop polls (pipeline/run.py): the run publishes the sources
completed so far, writes its run record as `interrupted` and the CLI exits 128 + the signal number
(130, 143). A second signal raises KeyboardInterrupt: stop at once, leaving the window in progress
to the next run. `ray.init` installs a SIGTERM handler of its own, so the run re-asserts these
handlers once Ray is up (`reassert`).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("cpmv")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A flag the driver loop polls, set by a signal (after `install`) or directly (tests)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: int | None = None
        self._previous: dict[int, Any] | None = None

    def set(self, signum: int | None = None) -> None:
        self.signal = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def exit_code(self) -> int:
        return 128 + int(self.signal or signal.SIGINT)

    def _handle(self, signum: int, frame: object) -> None:
        if self.is_set():
            raise KeyboardInterrupt
        log.warning("%s: stopping; publishing the sources completed so far (send it again to stop at once)",
                    signal.Signals(signum).name)
        self.set(signum)

    def install(self) -> None:
        """Handle SIGINT and SIGTERM (main thread only) until `restore`."""
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        if self._previous is None:
            self._previous = previous

    def reassert(self) -> None:
        """Take the signals back after a library (ray.init) installed handlers of its own."""
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, self._handle)

    def restore(self) -> None:
        if self._previous is not None:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous = None

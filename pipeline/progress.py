"""Progress while a run streams: one log line every `every_s` seconds, and Ray Data's per-operator
bars on a terminal.

The line reports what an operator of a nightly job watches (olmOCR prints a similar table
periodically): sources done of the total, units done, recent units/pages/frames/token rates, errors
by type and an ETA from the source rate so far. Units' total is not known before the sources are
expanded (a PDF's page count is learnt by opening it), so done/total is given for sources; `cpmv
plan` estimates units before a run.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pipeline.progress")

MODES = ("auto", "bars", "log", "off")


@dataclass(frozen=True)
class ProgressOptions:
    """How a run shows progress: `bars` (Ray Data's bars plus the log line), `log` (the line only),
    `off`; `auto` is bars on a terminal and log otherwise."""

    mode: str = "auto"
    every_s: float = 30.0

    def resolved(self) -> str:
        if self.mode not in MODES:
            raise ValueError(f"--progress {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.every_s <= 0:
            raise ValueError(f"--progress-every {self.every_s}: expected seconds > 0")
        if self.mode == "auto":
            return "bars" if sys.stderr.isatty() else "log"
        return self.mode

    @property
    def bars(self) -> bool:
        return self.resolved() == "bars"


def _duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ProgressLog:
    """Call `tick()` often (the driver loop does, every 0.5 s at most); it logs when a line is due."""

    def __init__(self, stats: Any, options: ProgressOptions):
        self.stats, self.on = stats, options.resolved() != "off"
        self.every_s = options.every_s
        self._last_t = 0.0
        self._last: dict[str, float] = {}

    def tick(self, force: bool = False) -> str | None:
        """Log (and return) a progress line if one is due, or now when `force`."""
        if not self.on:
            return None
        t = self.stats.now()
        if not force and t - self._last_t < self.every_s:
            return None
        line = self.line(t)
        log.info("%s", line)
        return line

    def line(self, t: float) -> str:
        """The progress line at time t (seconds since the pipeline started); rates over the last interval."""
        snap = self.stats.snapshot()
        dt = max(t - self._last_t, 1e-9)
        last = self._last or dict.fromkeys(snap, 0.0)

        def rate(key: str) -> float:
            return (snap[key] - last.get(key, 0.0)) / dt

        total = snap["sources_total"]
        done = int(snap["sources_done"])
        parts = [f"progress {_duration(t)}:"]
        if total:
            parts.append(f"sources {done}/{total} ({100.0 * done / total:.0f}%),")
        else:
            parts.append(f"sources {done},")
        parts.append(f"units {int(snap['units'])} ({rate('units'):.2f}/s),")
        parts.append(f"pages {rate('pages'):.2f}/s, frames {rate('frames'):.1f}/s,")
        parts.append(f"tokens {rate('completion_tokens'):.0f}/s out {rate('prompt_tokens'):.0f}/s in;")
        errors = snap["errors_by_type"]
        parts.append("error rows " + (", ".join(f"{k} {v}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1]))
                                  if errors else "none") + ";")
        if total and done and done < total:
            parts.append(f"ETA {_duration((total - done) * t / done)}")
        elif total and done >= total:
            parts.append("all sources done")
        else:
            parts.append("ETA unknown (no source done yet)")
        self._last_t, self._last = t, {k: v for k, v in snap.items() if isinstance(v, (int, float))}
        return " ".join(parts)

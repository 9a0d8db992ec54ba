"""Bounded preprocessing: a unit that runs too long, or a worker that grows too large, is stopped, and
the unit becomes an error row instead of being tried again.

Why a second process: MuPDF keeps the GIL while it interprets or renders a page (measured: another
thread of the process ran 2 times, where ~400 were due, during a 0.44 s render), so no thread, timer
or signal handler of a stuck process can act. A preprocess actor (`Watchdog(kill=True)`) therefore
starts one small monitor process (`python -m pipeline.watchdog`: the standard library until it has a
record to write) and tells it, in a page of shared memory, which source and unit it is on and their
deadlines: one struct write per step (~0.3 us), no syscall, no lock. Every `POLL_S` the monitor reads
that page and the actor's RSS; when a deadline has passed or the RSS is over the limit it freezes the
actor (SIGSTOP), checks again, writes a `Stuck` record (one small JSON file under `state_uri`, through
pipeline/storage.py: a local path or s3://) and kills the actor (SIGKILL). Ray restarts the actor and
retries its task; the new process reads the records at start, and `SourceGuard` gives each recorded
unit its error row, whatever the timing of the retry. The monitor exits when the actor's end of
its stdin pipe closes (the actor exited or was killed).

Time counts only while the stage works on a source: `SourceGuard.pause` stops both clocks while its
output waits for the pipeline to take it. Between units, a source past `limits.source_timeout_s` stops
cooperatively (`enter` returns False; no kill); the monitor kills for it only when a unit is still
running `SOURCE_GRACE` past the limit. A retried source replays the units before its last recorded
one on a fresh clock (they finished before, and no cooperative stop may land among them, which keeps
the rows the same), then goes on from the time the stopped attempt had used (`Stuck.elapsed_s`), so
many stuck pages cannot make a source take many times its limit.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import LimitsConfig, StorageConfig
    from pipeline.media.base import MediaUnit

KINDS = ("page_timeout", "source_timeout", "worker_memory")
LIMIT = {"page_timeout": "page_timeout_s", "source_timeout": "source_timeout_s", "worker_memory": "max_worker_memory_mb"}
POLL_S = 0.25
SOURCE_GRACE = 0.05  # the monitor kills for source_timeout_s only this fraction past it (at least 1 s)
INF = math.inf

# The shared page: (unit_index, unit deadline, source deadline, source time left) written per step,
# then (generation, source id length) and the source id, written per source. Deadlines are
# time.monotonic() values (CLOCK_MONOTONIC: one clock for all processes); inf: no deadline.
_HOT = struct.Struct("<qddd")
_SRC = struct.Struct("<qH")
_SRC_AT = _HOT.size
_ID_AT = _SRC_AT + _SRC.size
_ID_MAX = 256
SHM_SIZE = 4096


@dataclass(frozen=True)
class Stuck:
    """What a stopped worker was on: the unit (-1: the source before its first unit), why, the limit's
    value then, what was observed (seconds on the unit or the source, or MiB), and the source's time."""

    source_id: str
    unit_index: int
    kind: str
    value: float
    observed: float
    elapsed_s: float

    @property
    def limit(self) -> str:
        return f"limits.{LIMIT[self.kind]}"

    def file_name(self) -> str:
        return f"{re.sub(r'[^A-Za-z0-9_-]', '_', self.source_id)}.{self.unit_index}.{self.kind}.json"


def write_record(state_uri: str, rec: Stuck, storage: "StorageConfig") -> None:
    from pipeline import storage as st

    st.write_bytes(st.join(state_uri, rec.file_name()), json.dumps(asdict(rec)).encode(), storage)


def read_records(state_uri: str, storage: "StorageConfig") -> dict[str, list[Stuck]]:
    """Every record under `state_uri`, by source id (one listing and one read per record)."""
    from pipeline import storage as st

    found: dict[str, list[Stuck]] = {}
    for uri in st.list_files(state_uri, storage):
        if uri.endswith(".json"):
            rec = Stuck(**json.loads(st.read_bytes(uri, storage, max_bytes=2**16)))
            found.setdefault(rec.source_id, []).append(rec)
    return found


class Watchdog:
    """The preprocess process's side: the records of earlier attempts, the shared page and (with `kill`
    and a `state_uri`) the monitor. Without a `state_uri` nothing is recorded and nothing is killed
    (`cpmv inspect`, tests): only the cooperative source deadline applies."""

    def __init__(self, limits: "LimitsConfig", state_uri: str | None, storage: "StorageConfig", kill: bool = False):
        self.limits = limits
        self.records = read_records(state_uri, storage) if state_uri else {}
        self._buf: Any = bytearray(SHM_SIZE)
        self._generation = 0
        self._proc: subprocess.Popen | None = None
        if kill and state_uri:
            self._start_monitor(state_uri, storage)

    def source(self, source_id: str) -> "SourceGuard":
        """Start watching one source (call `end` on the guard when it is done)."""
        self._generation += 1
        raw = source_id.encode()[:_ID_MAX]
        _HOT.pack_into(self._buf, 0, -1, INF, INF, 0.0)
        self._buf[_ID_AT:_ID_AT + len(raw)] = raw
        _SRC.pack_into(self._buf, _SRC_AT, self._generation, len(raw))
        return SourceGuard(self._buf, self.limits, source_id, self.records.get(source_id, []))

    def close(self) -> None:
        """Stop the monitor (it also stops by itself when this process ends)."""
        if self._proc is not None:
            self._proc.stdin.close()  # type: ignore[union-attr]
            self._proc.wait(timeout=5)
            self._proc = None

    def _start_monitor(self, state_uri: str, storage: "StorageConfig") -> None:
        import mmap

        fd = os.memfd_create("cpmv-watchdog") if hasattr(os, "memfd_create") else _temp_fd()
        os.ftruncate(fd, SHM_SIZE)
        self._buf = mmap.mmap(fd, SHM_SIZE)
        lim = self.limits
        cfg = {"pid": os.getpid(), "fd": fd, "state_uri": state_uri, "poll_s": POLL_S,
               "page_timeout_s": lim.page_timeout_s, "source_timeout_s": lim.source_timeout_s,
               "grace_s": max(1.0, SOURCE_GRACE * lim.source_timeout_s),
               "max_worker_memory_mb": lim.max_worker_memory_mb, "storage": _plain(storage)}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        # Its own session: a Ctrl-C meant for the driver's terminal does not reach it.
        self._proc = subprocess.Popen([sys.executable, "-m", "pipeline.watchdog"], stdin=subprocess.PIPE, env=env,
                                      pass_fds=(fd,), start_new_session=True)
        os.close(fd)
        self._proc.stdin.write(json.dumps(cfg, default=str).encode() + b"\n")  # type: ignore[union-attr]
        self._proc.stdin.flush()  # type: ignore[union-attr]

    @property
    def monitor_pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid


class SourceGuard:
    """One source's clocks and records, as the expand stage walks its units."""

    def __init__(self, buf: Any, limits: "LimitsConfig", source_id: str, records: list[Stuck]):
        self._buf, self._page_s, self.limit_s = buf, limits.page_timeout_s, limits.source_timeout_s
        self.source_id = source_id
        self.skips = {r.unit_index: r for r in sorted(records, key=lambda r: r.kind) if r.kind != "source_timeout"}
        stops = [r for r in records if r.kind == "source_timeout"]
        self.stop_record = min(stops, key=lambda r: r.unit_index) if stops else None
        self.replay_until = max((r.unit_index for r in records), default=-2)
        self._carried = max((r.elapsed_s for r in records), default=0.0)
        self._left, self._since, self._replaying = self.limit_s, None, True
        self.index = -1
        self.stopped_at: int | None = None  # the first unit not processed, once the source stopped
        self.n_units: int | None = None  # a PDF's page count, when known (for messages)

    def enter(self, index: int, timed: bool = True) -> bool:
        """About to work on unit `index` (`timed`: under limits.page_timeout_s). False: the source is
        out of time (or was stopped at or before this unit); emit `stop_unit` for it and go no further."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if self._replaying and index > self.replay_until:
            # Past every recorded unit: the clock goes on from where the stopped attempt left it.
            self._replaying, self._since, self._left = False, now, self.limit_s - self._carried
        deadline = self._since + self._left
        stop = self.stop_record is not None and index >= self.stop_record.unit_index
        if stop or (now > deadline and not self._replaying):
            self.stopped_at = index if self.stopped_at is None else min(self.stopped_at, index)
            return False
        self.index = index
        _HOT.pack_into(self._buf, 0, index, now + self._page_s if timed else INF, deadline, self._left)
        return True

    def pause(self) -> None:
        """The stage hands output over (it may wait there): the clocks stop until the next `enter`."""
        if self._since is not None:
            self._left -= time.monotonic() - self._since
            self._since = None
        _HOT.pack_into(self._buf, 0, self.index, INF, INF, self._left)

    def resume(self) -> None:
        """The stage goes on after handing output over: until the next `enter`, what it does belongs to
        the same unit, under the source's clock only."""
        now = time.monotonic()
        self._since = now
        _HOT.pack_into(self._buf, 0, self.index, INF, now + self._left, self._left)

    def end(self) -> None:
        """The source is done: the monitor has nothing to watch until the next one."""
        _HOT.pack_into(self._buf, 0, -1, INF, INF, 0.0)
        _SRC.pack_into(self._buf, _SRC_AT, 0, 0)

    def recorded(self, index: int) -> Stuck | None:
        """The record that makes unit `index` an error row without trying it (page_timeout, worker_memory)."""
        return self.skips.get(index)

    def skip_unit(self, rec: Stuck, unit_kind: str, ends_source: bool) -> "MediaUnit":
        """The error unit for a recorded page_timeout or worker_memory (`ends_source`: nothing after it
        is tried, as for an image frame or a clip, whose successors cannot be reached without it)."""
        from pipeline.media.base import MediaUnit

        what = _unit_name(unit_kind, rec.unit_index)
        if rec.kind == "page_timeout":
            step = "planning/rendering" if unit_kind == "page" else "decoding"
            msg = f"{what} did not finish {step} within {rec.limit}={rec.value:g} s; the worker was stopped"
        else:
            msg = (f"{what}: the preprocess worker's memory reached {rec.observed:.0f} MiB, over "
                   f"{rec.limit}={rec.value:g}; the worker was replaced")
        if ends_source:
            msg += f"; the {_plural(unit_kind)} after it were not processed"
        return MediaUnit(unit_index=rec.unit_index, unit_kind=unit_kind, error_type=rec.kind, error_message=msg)

    def stop_unit(self, unit_kind: str) -> "MediaUnit":
        """The one error unit, at `stopped_at`, that stands for every unit the source did not reach."""
        from pipeline.media.base import MediaUnit

        index = self.stopped_at if self.stopped_at is not None else self.index
        rec = self.stop_record
        if rec is not None and index >= rec.unit_index:
            why = (f"the source ran past limits.source_timeout_s={rec.value:g} s at "
                   f"{_unit_name(unit_kind, rec.unit_index)} and the worker was stopped")
        else:
            why = f"the source ran past limits.source_timeout_s={self.limit_s:g} s"
        return MediaUnit(unit_index=index, unit_kind=unit_kind, error_type="source_timeout",
                         error_message=f"{why}; {_not_processed(unit_kind, index, self.n_units)}")


def source_message(rec: Stuck) -> str:
    """The message of a record made before the source's first unit (reading or opening it)."""
    if rec.kind == "worker_memory":
        return (f"the preprocess worker's memory reached {rec.observed:.0f} MiB while reading or opening the source, "
                f"over {rec.limit}={rec.value:g}; the worker was replaced")
    return f"the source was not read and opened within {rec.limit}={rec.value:g} s; the worker was stopped"


_NAMES = {"page": ("page", 1), "image": ("frame", 0), "clip": ("clip", 1)}  # (word, first number) as elsewhere


def _unit_name(unit_kind: str, index: int) -> str:
    word, base = _NAMES.get(unit_kind, ("unit", 0))
    return f"{word} {index + base}"


def _plural(unit_kind: str) -> str:
    return _NAMES.get(unit_kind, ("unit", 0))[0] + "s"


def _not_processed(unit_kind: str, index: int, n_units: int | None) -> str:
    word, base = _NAMES.get(unit_kind, ("unit", 0))
    if n_units is not None and index + 1 < n_units:
        return f"{word}s {index + base}-{n_units - 1 + base} of {n_units} were not processed"
    if n_units is not None:
        return f"{word} {index + base} of {n_units} was not processed"
    return f"{word} {index + base} and the {word}s after it were not processed"


def _temp_fd() -> int:
    import tempfile

    with tempfile.TemporaryFile() as f:
        return os.dup(f.fileno())


def _plain(storage: "StorageConfig") -> dict[str, Any]:
    """The storage settings as JSON for the monitor (over its stdin pipe: no secret on a command line)."""
    from pydantic import SecretStr

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {k: reveal(v) for k, v in value.items()}
        return value

    return reveal(storage.model_dump())


# ---------------------------------------------------------------------------------------------
# The monitor process


def _snapshot(buf: Any) -> tuple | None:
    generation, n = _SRC.unpack_from(buf, _SRC_AT)
    if not generation:
        return None
    return (generation, bytes(buf[_ID_AT:_ID_AT + n]).decode(errors="replace"), *_HOT.unpack_from(buf, 0))


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except FileNotFoundError:
        import psutil  # no /proc (macOS)

        return psutil.Process(pid).memory_info().rss / 2**20


def _due(snap: tuple, cfg: dict[str, Any], now: float) -> Stuck | None:
    """The record to make for this state, or None when every limit holds."""
    _, source_id, index, unit_deadline, source_deadline, left = snap
    limit = cfg["source_timeout_s"]
    elapsed = limit - (source_deadline - now if source_deadline < INF else left)
    if now > unit_deadline:
        on_unit = now - (unit_deadline - cfg["page_timeout_s"])
        return Stuck(source_id, index, "page_timeout", cfg["page_timeout_s"], round(on_unit, 3), elapsed)
    if now > source_deadline + cfg["grace_s"]:
        return Stuck(source_id, index, "source_timeout", limit, round(elapsed, 3), elapsed)
    if source_deadline == INF:
        return None  # paused: what the process holds now is output waiting to be taken, not a unit's work
    rss = _rss_mb(cfg["pid"])
    if rss > cfg["max_worker_memory_mb"]:
        return Stuck(source_id, index, "worker_memory", cfg["max_worker_memory_mb"], round(rss, 1), elapsed)
    return None


def _stop(cfg: dict[str, Any], buf: Any, seen: tuple) -> bool:
    """Freeze the actor, make sure it is still over a limit, record it and kill the actor."""
    pid = cfg["pid"]
    os.kill(pid, signal.SIGSTOP)
    snap = _snapshot(buf)
    rec = _due(snap, cfg, time.monotonic()) if snap == seen else None
    if rec is None:  # it moved on (or below the limit) just in time
        os.kill(pid, signal.SIGCONT)
        return False
    for attempt in range(3):
        try:
            from pipeline.config import StorageConfig

            write_record(cfg["state_uri"], rec, StorageConfig.model_validate(cfg["storage"]))
            break
        except Exception as err:  # noqa: BLE001 - kill anyway: a stuck worker must not stay stuck
            print(f"pipeline.watchdog: could not record {rec}: {type(err).__name__}: {err}", file=sys.stderr)
            time.sleep(1 + attempt)
    print(f"pipeline.watchdog: stopping preprocess worker {pid}: {rec}", file=sys.stderr, flush=True)
    os.kill(pid, signal.SIGKILL)
    return True


def monitor(cfg: dict[str, Any], buf: Any, control: int = 0) -> None:
    """Watch process `cfg["pid"]` through `buf` until `control` (its pipe) closes or the process is gone."""
    while True:
        ready, _, _ = select.select([control], [], [], cfg["poll_s"])
        if ready and not os.read(control, 4096):
            return
        try:
            os.kill(cfg["pid"], 0)
        except ProcessLookupError:
            return
        snap = _snapshot(buf)
        if snap is not None and _due(snap, cfg, time.monotonic()) is not None and _stop(cfg, buf, snap):
            return


def _main() -> None:
    import mmap

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = json.loads(sys.stdin.buffer.readline())
    monitor(cfg, mmap.mmap(cfg["fd"], SHM_SIZE), sys.stdin.fileno())


if __name__ == "__main__":
    _main()

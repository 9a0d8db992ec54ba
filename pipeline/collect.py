"""The driver's side of the results stream: rows in, complete sources out.

The engine stage's output arrives in blocks in any order (several engine actors, retried tasks). A
source is complete once its end marker (pipeline/expand.py `end_marker`, passed on by the engine
stage) has arrived with the number of result rows the source makes, and that many distinct
(unit_index, tile_index, task) keys have arrived. Only then may it be published: a reader never
sees part of a source.

Rows seen twice (a preprocess or engine task that Ray retried after its worker died re-emits what
it had already sent) are dropped by key, so a retry never duplicates output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from schemas.records import EXPECTED_ROWS, MARKER_KIND, NO_ROW_KIND


@dataclass(frozen=True)
class Prior:
    """What earlier runs published of a source this run redoes (some of) the tasks of."""

    stem: str  # the window file pair (results/<stem>.parquet, documents/<stem>.parquet) holding it
    committed: tuple[tuple[str, str], ...]  # (task, fingerprint) committed so far


@dataclass(frozen=True)
class SourceWork:
    """One source this run processes: what the driver keeps of it until it is published (~0.3 KB)."""

    uri: str
    source_id: str
    size: int | None
    tasks: tuple[str, ...]  # the tasks this run (re)does for it
    prior: Prior | None = None
    manifest_row: int | None = None  # its manifest row (pass-through columns: pipeline/rowdata.py)
    prompt: str | None = None  # its per-row prompt (None: each task's own)
    prompt_error: str | None = None  # why its per-row prompt could not be made (an error row)
    parts: tuple[str, ...] = ()  # a multi-image manifest row's image URIs (pipeline/sources.py)

    def item(self) -> dict[str, Any]:
        """The source's row in the plan's input dataset."""
        return {"source_uri": self.uri, "source_id": self.source_id, "size": self.size, "tasks": list(self.tasks),
                "prompt": self.prompt, "prompt_error": self.prompt_error, "parts": list(self.parts)}

    def fingerprints(self, fingerprints: dict[str, str]) -> dict[str, str]:
        """The job's task fingerprints as they apply to this source (a per-row prompt changes them)."""
        from pipeline.rowdata import row_fingerprint

        return {t: row_fingerprint(fp, self.prompt) for t, fp in fingerprints.items()}


@dataclass
class _Open:
    expected: int | None = None
    dedup_of: str | None = None  # a duplicate's claimant (input.dedup content; pipeline/dedup.py)
    keys: set[tuple[Any, Any, str]] = field(default_factory=set)
    units: set[tuple[Any, Any]] = field(default_factory=set)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Complete:
    """A source whose every result row has arrived."""

    work: SourceWork
    rows: list[dict[str, Any]]  # results rows (RESULTS_SCHEMA columns), in arrival order
    units: int  # distinct (unit_index, tile_index): the window budget counts these
    complete: bool = True  # False: published at the end of a run with rows missing (lost_units)


class Collector:
    """Assembles complete sources from the results stream.

    Memory: the rows of sources still in flight (bounded by the plan's streaming window) plus one
    32-character id per source completed in this run (to drop late duplicates).
    """

    def __init__(self, work: dict[str, SourceWork], observe: Any = None, dedup: bool = False):
        """`dedup`: input.dedup content; duplicates get copies of their claimant's rows (pipeline/dedup.py)."""
        from pipeline.dedup import DedupBook

        self.work = work
        self.dedup = DedupBook(work) if dedup else None
        # observe(rows, new_units): every accepted result row of a block, and whether each is the
        # first row of its unit (pipeline/runstats.py counts units and tokens from these).
        self.observe = observe
        self._open: dict[str, _Open] = {}
        self._done: set[str] = set()
        self.duplicates = 0

    def add(self, table: pa.Table) -> list[Complete]:
        """Take one block of the stream (schemas.records.STREAM_SCHEMA); return the sources it completed."""
        touched: set[str] = set()
        seen: list[dict[str, Any]] = []
        new_units: list[bool] = []
        for row in table.to_pylist():
            sid = row["source_id"]
            if sid in self._done:
                self.duplicates += 1
                continue
            state = self._open.get(sid)
            if state is None:
                state = self._open[sid] = _Open()
            expected = row.pop(EXPECTED_ROWS, None)
            if row["unit_kind"] == MARKER_KIND:
                state.expected = expected
                state.dedup_of = row.get("dedup_of")
            else:
                key = (row["unit_index"], row["tile_index"], row["task"])
                if key in state.keys:
                    self.duplicates += 1
                    continue
                state.keys.add(key)
                if row["unit_kind"] != NO_ROW_KIND:
                    state.rows.append(row)
                    seen.append(row)
                    new_units.append(key[:2] not in state.units)
                state.units.add(key[:2])
            touched.add(sid)
        if self.observe is not None and seen:
            self.observe(seen, new_units)
        done = []
        for sid in touched:
            state = self._open[sid]
            if state.expected is not None and len(state.keys) >= state.expected:
                if state.dedup_of is not None and self.dedup is not None and state.dedup_of != sid:
                    del self._open[sid]  # a duplicate: complete once its claimant is (pipeline/dedup.py)
                    self.dedup.wait(sid, state.dedup_of)
                else:
                    done.append(self._close(sid))
        return done + self._copies()

    def _copies(self) -> list[Complete]:
        """Duplicates whose claimant is complete, with copies of its rows."""
        if self.dedup is None:
            return []
        out = []
        for dup, _, rows, units in self.dedup.ready():
            self._done.add(dup)
            self.dedup.closed(dup, None, units)
            out.append(Complete(self.work[dup], rows, units))
        return out

    def is_done(self, source_id: str) -> bool:
        """Whether every row of the source has arrived (it is published or waits in a window)."""
        return source_id in self._done

    def forget_open(self) -> None:
        """Drop the rows of sources still in flight (their plan failed; a new plan redoes them whole)."""
        self._open.clear()
        if self.dedup is not None:
            self.dedup.forget_waiting()

    def in_flight(self) -> int:
        return len(self._open)

    def drain(self) -> list[Complete]:
        """At the end of a stream: every source with rows but no complete set, marked incomplete."""
        out = [self._close(sid, complete=False) for sid in list(self._open)]
        return out

    def _close(self, sid: str, complete: bool = True) -> Complete:
        state = self._open.pop(sid)
        self._done.add(sid)
        units = len({(k[0], k[1]) for k in state.keys})
        if self.dedup is not None:
            self.dedup.closed(sid, state.rows if complete else None, units)
        return Complete(self.work[sid], state.rows, units, complete)

    def never_seen(self) -> list[SourceWork]:
        """Sources of this run that sent nothing at all (call after drain)."""
        return [w for sid, w in self.work.items() if sid not in self._done]

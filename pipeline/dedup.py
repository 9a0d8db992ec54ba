"""Content de-duplication (`input.dedup: content`): identical bytes under different URIs are inferred once.

How it fits the Ray Data plan, and why:

- The key is the sha256 of the source's bytes, computed by the preprocess actor that has just read
  them (pipeline/expand.py): no second read, no pass over the corpus before the plan starts. The
  key also holds the tasks the run does for the source and its per-row prompt: the same bytes asked
  another question are other work.
- Who infers a key is decided by one small named actor, `ContentRegistry` (a first-seen map:
  `claim` is one dict `setdefault`, ~1 ms a round trip, once per source). Preprocess actors on any
  node ask it before expanding a source; the first claimant expands and infers it, every later one
  emits only its end marker, naming the claimant (`dedup_of`). A Ray Data `groupby` on the hash
  would also group duplicates, but it is an all-to-all barrier: nothing would reach the engine
  until every source had been read and hashed, which breaks the plan's streaming, and the bytes
  (or a second read) would have to travel through the shuffle.
- The driver's collector (pipeline/collect.py) gives a duplicate a copy of its claimant's result
  rows with its own source_uri/source_id and `dedup_of` = the claimant's URI, once the claimant is
  complete. It keeps a complete source's rows (text, no pixels) only while a source of the same
  size is still open (`DedupBook`): only same-size files can be identical, so a corpus of distinct
  sizes keeps nothing.
- Crash safety and resume: nothing is published before its rows are (the commit protocol is
  unchanged); a duplicate whose claimant never completes is published as `lost` and redone by the
  next run; a registry that cannot be reached makes the source infer itself (never wrong, only
  not saved). The registry lives for one run: a duplicate of a source committed by an earlier run
  is inferred again (said in the README).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)

#: Seconds an expand actor waits for the registry before inferring the source itself.
CLAIM_TIMEOUT_S = 30.0


def content_hash(data: bytes) -> str:
    """sha256 of the bytes, hex (64 characters)."""
    return hashlib.sha256(data).hexdigest()


def content_key(digest: str, tasks: list[str], prompt: str | None) -> str:
    """What makes two sources the same work: their bytes, the tasks asked and the per-row prompt."""
    return hashlib.sha256("\n".join([digest, ",".join(sorted(tasks)), prompt or ""]).encode()).hexdigest()


class ContentRegistry:
    """Ray actor (one per run, named): content key -> the source_id that claimed it first."""

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}

    def claim(self, key: str, source_id: str) -> str:
        """The source that infers `key`: `source_id` when it is the first to ask (or asks again)."""
        return self._owner.setdefault(key, source_id)

    def __len__(self) -> int:
        return len(self._owner)


def start_registry(name: str, options: dict[str, Any]) -> Any:
    """Start the run's registry actor named `name` (its resources from pipeline/resources.py)."""
    import ray

    return ray.remote(ContentRegistry).options(name=name, **options).remote()


class Claimer:
    """The expand stage's side: asks the named registry who infers a key (looked up once per actor)."""

    def __init__(self, name: str):
        self.name = name
        self._actor: Any = None

    def claim(self, key: str, source_id: str) -> str:
        import ray

        try:
            if self._actor is None:
                self._actor = ray.get_actor(self.name)
            return ray.get(self._actor.claim.remote(key, source_id), timeout=CLAIM_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - no registry: infer the source (correct, only not saved)
            log.warning("content registry %s unreachable (%s); inferring %s itself", self.name, err, source_id)
            self._actor = None
            return source_id


class DedupBook:
    """The collector's record of duplicates: rows of complete sources that a duplicate may still
    copy, and the duplicates waiting for their claimant.

    Memory: a complete source's rows are kept while another source of the same size (from the
    listing; identical bytes have identical sizes) is still open, then dropped.
    """

    def __init__(self, work: dict[str, Any]):
        self.work = work
        self._open_by_size: Counter[Any] = Counter(w.size for w in work.values())
        self._kept: dict[str, tuple[list[dict[str, Any]], int]] = {}  # source_id -> (rows, units)
        self._waiting: dict[str, set[str]] = {}  # claimant -> duplicates waiting for it
        self.sources = self.rows = self.units = 0  # copies made: sources, result rows, units not inferred

    def closed(self, source_id: str, rows: list[dict[str, Any]] | None, units: int) -> None:
        """A source left the collector (rows: its complete rows, None when incomplete or a duplicate)."""
        size = self.work[source_id].size
        self._open_by_size[size] -= 1
        if rows is not None and self._open_by_size[size] > 0:
            self._kept[source_id] = (rows, units)
        if self._open_by_size[size] <= 0:
            for sid in [s for s in self._kept if self.work[s].size == size]:
                del self._kept[sid]

    def wait(self, duplicate: str, claimant: str) -> None:
        self._waiting.setdefault(claimant, set()).add(duplicate)

    def forget_waiting(self) -> None:
        """A plan failed: the waiting duplicates are redone with the sources not yet complete."""
        self._waiting.clear()

    def ready(self) -> list[tuple[str, str, list[dict[str, Any]], int]]:
        """(duplicate, claimant, copied rows, units) for every waiting duplicate whose claimant is complete."""
        out = []
        for claimant in [c for c in self._waiting if c in self._kept]:
            rows, units = self._kept[claimant]
            owner_uri = self.work[claimant].uri
            for dup in sorted(self._waiting.pop(claimant)):
                w = self.work[dup]
                copies = [{**r, "source_uri": w.uri, "source_id": w.source_id, "dedup_of": owner_uri} for r in rows]
                self.sources += 1
                self.rows += len(copies)
                self.units += units
                out.append((dup, claimant, copies, units))
        return out

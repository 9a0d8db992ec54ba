"""Content de-duplication on the driver (pipeline/dedup.py DedupBook, pipeline/collect.py): a duplicate's
end marker names its claimant; it gets the claimant's rows under its own id, in whatever order blocks
arrive, and a claimant that never completes leaves its duplicates to the next run."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from pipeline.collect import Collector, SourceWork
from pipeline.dedup import ContentRegistry, content_hash, content_key
from schemas.records import EXPECTED_ROWS, MARKER_KIND, SCHEMA_VERSION, STREAM_SCHEMA, to_table

NOW = datetime.now(timezone.utc)


def _row(sid: str, unit: int, **kw) -> dict:
    return {"schema_version": SCHEMA_VERSION, "run_id": "r", "source_uri": f"/in/{sid}.png", "source_id": sid,
            "unit_index": unit, "unit_kind": "image", "task": "caption", "status": "ok", "text": f"t{unit}",
            "model": "m", "prompt_version": "v", "fingerprint": "fp", "created_at": NOW, "content_hash": "h", **kw}


def _marker(sid: str, expected: int, dedup_of: str | None = None) -> dict:
    return {**_row(sid, -1), "unit_kind": MARKER_KIND, "status": MARKER_KIND, "task": "", EXPECTED_ROWS: expected,
            "dedup_of": dedup_of}


def _work(sizes: dict[str, int]) -> dict[str, SourceWork]:
    return {sid: SourceWork(f"/in/{sid}.png", sid, size, ("caption",)) for sid, size in sizes.items()}


@pytest.mark.parametrize("dup_first", [True, False])
def test_duplicate_gets_its_claimants_rows_in_either_order(dup_first):
    c = Collector(_work({"own": 5, "dup": 5, "other": 7}), dedup=True)
    owner = to_table([_row("own", 0), _marker("own", 1)], STREAM_SCHEMA)
    dup = to_table([_marker("dup", 0, dedup_of="own")], STREAM_SCHEMA)
    done = []
    for block in ([dup, owner] if dup_first else [owner, dup]):
        done += c.add(block)
    by = {d.work.source_id: d for d in done}
    assert set(by) == {"own", "dup"}
    (copy,) = by["dup"].rows
    assert copy["source_id"] == "dup" and copy["source_uri"] == "/in/dup.png" and copy["dedup_of"] == "/in/own.png"
    assert copy["text"] == "t0" and by["own"].rows[0]["dedup_of"] is None
    assert (c.dedup.sources, c.dedup.rows, c.dedup.units) == (1, 1, 1)
    assert not c.dedup._kept  # the size group is closed: no rows kept


def test_rows_are_kept_only_while_a_same_size_source_is_open():
    c = Collector(_work({"a": 5, "b": 5, "u": 9}), dedup=True)
    c.add(to_table([_row("u", 0), _marker("u", 1)], STREAM_SCHEMA))
    assert "u" not in c.dedup._kept  # unique size: can have no duplicate
    c.add(to_table([_row("a", 0), _marker("a", 1)], STREAM_SCHEMA))
    assert "a" in c.dedup._kept  # b (same size) is still open
    c.add(to_table([_row("b", 0), _marker("b", 1)], STREAM_SCHEMA))  # b was different bytes after all
    assert not c.dedup._kept


def test_a_duplicate_of_a_lost_claimant_is_left_to_the_next_run():
    c = Collector(_work({"own": 5, "dup": 5}), dedup=True)
    c.add(to_table([_row("own", 0), _marker("dup", 0, dedup_of="own")], STREAM_SCHEMA))  # owner's marker never came
    drained = c.drain()
    assert [d.work.source_id for d in drained] == ["own"] and not drained[0].complete
    assert [w.source_id for w in c.never_seen()] == ["dup"]  # published as `lost`, redone next run
    assert c.dedup.sources == 0


def test_registry_first_claim_wins_and_key_separates_other_work():
    reg = ContentRegistry()
    h = content_hash(b"same bytes")
    k = content_key(h, ["caption"], None)
    assert reg.claim(k, "a") == "a" and reg.claim(k, "b") == "a" and reg.claim(k, "a") == "a"
    assert content_key(h, ["caption"], "other prompt") != k and content_key(h, ["ocr"], None) != k
    assert content_key(h, ["ocr", "caption"], None) == content_key(h, ["caption", "ocr"], None)

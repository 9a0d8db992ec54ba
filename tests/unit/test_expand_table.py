"""The expand stage's output tables: pixels reach Arrow without a copy and keep their memory alive."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pyarrow as pa

from pipeline.expand import _pixels_column, _source_row, _table
from schemas.records import UNITS_SCHEMA

SRC = {"source_uri": "file:///x.pdf", "source_id": "x", "size": 3, "tasks": ["ocr"]}


class _Owner:
    """Stands in for a MuPDF pixmap: what a frame's memory belongs to (weakly referenceable)."""


def _row(frames, keepalive=None, **extra):
    views = [memoryview(np.ascontiguousarray(f)).cast("B") for f in frames]
    h, w = frames[0].shape[:2]
    return _source_row(SRC, "pdf", unit_index=0, unit_kind="page", pixels=views, width=w, height=h,
                       num_frames=len(frames), _keepalive=keepalive, **extra)


def test_one_frame_is_not_copied_and_its_owner_lives_as_long_as_the_table():
    frame = np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)
    owner = _Owner()
    gone = weakref.finalize(owner, lambda: None)
    table = _table([_row([frame], keepalive=owner)])
    del owner
    gc.collect()
    assert gone.alive  # the table holds the frame's owner
    data = table.column("pixels").chunk(0).values.buffers()[2]
    assert data.address == frame.ctypes.data and data.size == frame.nbytes  # the frame's own memory
    assert table.schema.equals(UNITS_SCHEMA, check_metadata=True)
    assert table.column("pixels").to_pylist() == [[frame.tobytes()]]
    del table, data
    gc.collect()
    assert not gone.alive  # and lets it go with the table


def test_rows_of_several_frames_and_several_rows():
    frames = [np.full((4, 5, 3), k, np.uint8) for k in range(3)]
    rows = [_row(frames), _row(frames[:1]), _row(frames[1:])]
    col = _pixels_column(rows)
    assert col.type == pa.list_(pa.binary()) and col.num_chunks == 3
    assert col.to_pylist() == [[f.tobytes() for f in frames], [frames[0].tobytes()],
                               [f.tobytes() for f in frames[1:]]]
    table = _table(rows)
    assert table.num_rows == 3 and table.column("num_frames").to_pylist() == [3, 1, 2]

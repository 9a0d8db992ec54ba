"""The writing direction of each block of a MuPDF text page, read straight from MuPDF's structs.

Why not the bindings: pymupdf's SWIG layer costs ~0.5 us per field and ~2 us per wrapper object, so
reading one line per block (`pdf._block_directions`) cost ~0.1 ms a Letter page warm and ~0.3 ms in
the stage, where it runs right after a 21 MB render has flushed the CPU caches: 8% of the page's
render, for a vote that almost always says "upright". ctypes reads the same fields at ~0.1 us each.

Safety: the structs below mirror `include/mupdf/fitz/structured-text.h` of MuPDF 1.28 (the header
ships in the pymupdf wheel, under `mupdf-devel`). They are used only when the running MuPDF is a
1.28 release, and only after the first text page of the process read the same block types, line
pointers, directions and writing modes through ctypes as through the bindings; otherwise
`block_directions` returns None and the caller reads through the bindings.
"""

from __future__ import annotations

import ctypes
import logging

import pymupdf
from pymupdf import mupdf

log = logging.getLogger(__name__)

MIRRORED_MUPDF = (1, 28)  # the header these structs copy


class _Rect(ctypes.Structure):
    _fields_ = [("x0", ctypes.c_float), ("y0", ctypes.c_float), ("x1", ctypes.c_float), ("y1", ctypes.c_float)]


class _Point(ctypes.Structure):
    _fields_ = [("x", ctypes.c_float), ("y", ctypes.c_float)]


class _Line(ctypes.Structure):  # struct fz_stext_line
    _fields_ = [
        ("wmode", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("dir", _Point), ("bbox", _Rect),
        ("first_char", ctypes.c_void_p), ("last_char", ctypes.c_void_p),
        ("prev", ctypes.c_void_p), ("next", ctypes.c_void_p),
    ]


class _BlockText(ctypes.Structure):
    _fields_ = [("first_line", ctypes.c_void_p), ("last_line", ctypes.c_void_p), ("flags", ctypes.c_int)]


class _BlockImage(ctypes.Structure):  # the union's largest member: it sets where prev/next sit
    _fields_ = [("transform", ctypes.c_float * 6), ("image", ctypes.c_void_p)]


class _BlockStruct(ctypes.Structure):
    _fields_ = [("down", ctypes.c_void_p), ("index", ctypes.c_int)]


class _BlockVector(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("argb", ctypes.c_uint32)]


class _BlockGrid(ctypes.Structure):
    _fields_ = [("xs", ctypes.c_void_p), ("ys", ctypes.c_void_p), ("info", ctypes.c_void_p)]


class _BlockUnion(ctypes.Union):
    _fields_ = [("t", _BlockText), ("i", _BlockImage), ("s", _BlockStruct), ("v", _BlockVector), ("b", _BlockGrid)]


class _Block(ctypes.Structure):  # struct fz_stext_block
    _fields_ = [
        ("type", ctypes.c_int), ("id", ctypes.c_int), ("bbox", _Rect), ("u", _BlockUnion),
        ("prev", ctypes.c_void_p), ("next", ctypes.c_void_p),
    ]


_TEXT = mupdf.FZ_STEXT_BLOCK_TEXT
# None: not checked yet; True: the mirror matched the bindings; False: use the bindings.
_checked: bool | None = None if tuple(pymupdf.mupdf_version_tuple[:2]) == MIRRORED_MUPDF else False


def block_directions(textpage: pymupdf.TextPage) -> list[tuple[float, float, int]] | None:
    """(dx, dy, wmode) of the first line of each text block, in block order; None where the mirror
    is not usable (another MuPDF, or it did not match the bindings on this process's first page)."""
    global _checked
    if _checked is False:
        return None
    first = textpage.this.m_internal.first_block
    if first is None:
        return []
    fast = _read(int(first.this))
    if _checked is None:
        slow = bound_directions(textpage)
        _checked = slow is not None and slow == fast
        if not _checked:
            log.warning("MuPDF's text structs do not match the mirror of MuPDF %s; reading them through the "
                        "bindings (slower)", ".".join(map(str, MIRRORED_MUPDF)))
            return None
    return fast


def _read(address: int) -> list[tuple[float, float, int]]:
    out = []
    while address:
        block = _Block.from_address(address)
        if block.type == _TEXT:
            line_address = block.u.t.first_line
            if line_address:
                line = _Line.from_address(line_address)
                d = line.dir
                out.append((d.x, d.y, line.wmode))
        address = block.next
    return out


def bound_directions(textpage: pymupdf.TextPage) -> list[tuple[float, float, int]] | None:
    """The same as `block_directions`, through pymupdf's bindings (the reference and the fallback);
    None if the bindings do not look as expected (another pymupdf)."""
    try:
        out = []
        for block in textpage.this:
            if block.m_internal.type != _TEXT:
                continue
            first = next(iter(block), None)
            if first is None:
                continue
            line = first.m_internal
            d = line.dir
            out.append((d.x, d.y, line.wmode))
        return out
    except (AttributeError, TypeError):
        return None

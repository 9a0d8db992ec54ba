"""PDF -> one page unit at a time, rendered straight into numpy (no PNG/JPEG round trip).

Pages are planned a group at a time (`plan_pdf`: display list, text layer, orientation and output
size for `pdf.plan_ahead_pages` pages in a row) and then rendered one at a time: each kind of work
then runs with warm CPU caches, where alternating them per page ran everything after a 21 MB render
that had flushed the caches (the stage went from ~0.83 to ~0.9-0.97 of raw pymupdf's page rate).
Only display lists wait; a page's pixels exist from its render until its consumer drops them.

Render resolution is chosen per page from a pixel budget (what the model's slicer will use), not a
fixed DPI: a Letter page and a poster both come out at about `pixel_budget` pixels, within
[min_dpi, max_dpi]. Encoding a pixmap costs ~10x the render itself (bench/preprocess_pdf.py), so the
pixmap samples are copied into an array and nothing is encoded.

Failure policy (codes are stable; they land in `error_type`):
- whole source: "empty_file", "pdf_corrupt", "pdf_encrypted", "pdf_no_pages" (MediaError).
- one page (the other pages go on): "page_missing" (the page tree claims a page the file does not
  hold, or points to an object that is not there), "page_missing_content" (the page object or its
  content stream is missing: MuPDF would render it blank; flag "page_missing_content"),
  "page_render_failed" (MuPDF cannot interpret or render it); "page_limit" for every page beyond
  `limits.max_pages` (one cheap row per excess page, nothing rendered, so no page goes missing silently).
- a document MuPDF had to repair (e.g. truncated) renders without exceptions but may lose pages: every
  unit gets flag "pdf_repaired", and a page that renders as one flat colour also gets "blank_page".

Orientation: /Rotate is honoured (MuPDF applies it to page.rect and the render). On top of that, a page
whose text layer mostly reads sideways or upside down once /Rotate is applied is rendered turned so the
text reads upright (the turn goes into the render matrix: free, where numpy's rot90 plus a copy costs
more than the render), and gets flag "rotated_90" / "rotated_180" / "rotated_270": the clockwise turn
applied on top of /Rotate. The decision (>= 60% of the characters in one direction, >= 20 characters)
is `orientation.dominant_rotation`. Pages without a text layer (scans) are not turned.

Cost (one core, Letter pages of 1-2k characters, rendered at a 36-slice budget in ~5 ms): the page's
content stream is interpreted once, into a display list that feeds both the render and one MuPDF
text page (~0.1-0.2 ms, where page.get_textpage would interpret the page again for ~0.4 ms). That
text page serves the text layer (extractText, ~0.05 ms) and the directions, read one line per block
straight from MuPDF's structs (`stext.py`, ~0.01 ms; ~0.1 ms through the bindings). extractDICT for
every page would add 0.15-1.1 ms, so per-line character counts (which need it) are fetched only on pages whose text does not all point
the same way (+~0.5 ms there). Scans: no extra cost.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pymupdf

from pipeline.config import LimitsConfig, PdfConfig
from pipeline.media import stext
from pipeline.media.base import MediaError, MediaUnit, describe
from pipeline.media.orientation import dominant_rotation, line_angle, vertical_to_baseline

_POINTS_PER_INCH = 72.0
_TEXT_FLAGS = pymupdf.TEXTFLAGS_TEXT  # what page.get_text() uses: the text layer stays the same

# Test-only fault injection (tests/faults/test_stuck_page.py): CPMV_FAULT_BLOCK_PAGE="<title>:<index>"
# makes the planning of page `index` (0-based) of every PDF whose metadata title contains `<title>`
# block for ever in a C call that holds the GIL, as MuPDF does on a page whose display list never
# finishes. Read once, at import; unset in production.
_FAULT_BLOCK_PAGE = os.environ.get("CPMV_FAULT_BLOCK_PAGE")

PageHook = Callable[[int, int], "MediaUnit | None"]


class StopDocument(Exception):
    """Raised by a `PageHook`: plan no further page (the pages planned so far are still yielded)."""


def expand_pdf(
    data: bytes, cfg: PdfConfig, limits: LimitsConfig, pixel_budget: int, tile_min_dpi: float | None = None,
    tile_min_area: float = 0.0, fit: Callable[[int, int], tuple[int, int] | None] | None = None,
) -> Iterator[MediaUnit]:
    """Yield one "page" unit per page of a PDF, rendered to about `pixel_budget` pixels.

    With `tile_min_dpi`, a page of at least `tile_min_area` square inches that the budget would
    render below that DPI (a poster, a drawing) renders at `tile_min_dpi` instead, flagged
    "render_for_tiling", for the caller to tile. `fit(width, height)` may name the exact size the
    model's processor works at for a page of that natural size: the page then renders straight at
    that size (no resize afterwards, which would cost far more than the render).
    Raises MediaError for a source that cannot be expanded at all; pages fail alone.
    """
    for group in plan_pdf(data, cfg, limits, pixel_budget, tile_min_dpi, tile_min_area, fit):
        for plan in group:
            yield plan.render()


@dataclass(eq=False)
class PagePlan:
    """A page interpreted but not yet rendered: its display list, text layer, orientation and the
    size it will render at. `unit` carries everything but the pixels (and is final when it is an
    error); `render()` adds them."""

    unit: MediaUnit
    size: tuple[int, int] | None = None  # (width, height) the page renders at, when the fit fixed it exactly
    _dlist: pymupdf.DisplayList | None = None
    _rect: pymupdf.Rect | None = None
    _dpi: float = 0.0
    _rotation: int = 0
    _check_blank: bool = False

    def render(self) -> MediaUnit:
        """Render the page into `unit` and hand it over: the plan keeps neither the unit nor its
        display list, so no page buffer outlives its consumer. Call once. A page that fails to
        render becomes a "page_render_failed" unit; the others go on."""
        unit, dlist = self.unit, self._dlist
        self.unit, self._dlist = None, None  # type: ignore[assignment]
        if dlist is None:
            return unit
        try:
            frame, pix = _render(dlist, self._rect, self._dpi, self._rotation, self.size)
        except Exception as err:  # any MuPDF error fails only this page
            unit.error_type = "page_render_failed"
            unit.error_message = f"page {unit.unit_index + 1}: MuPDF could not render the page: {describe(err)}"
            unit.text_layer = None
            return unit
        if self._check_blank and _is_blank(frame):
            unit.flags.append("blank_page")  # in a repaired document a flat page is likely lost content
        unit.frames, unit.keepalive = [frame], pix
        return unit


def plan_pdf(
    data: bytes, cfg: PdfConfig, limits: LimitsConfig, pixel_budget: int, tile_min_dpi: float | None = None,
    tile_min_area: float = 0.0, fit: Callable[[int, int], tuple[int, int] | None] | None = None,
    on_page: PageHook | None = None, filetype: str | None = "pdf",
) -> Iterator[list[PagePlan]]:
    """The pages of a PDF as groups of up to `cfg.plan_ahead_pages` planned pages, in page order
    (arguments as in `expand_pdf`); render each plan in turn.

    `on_page(index, page_count)` is called before each page up to `limits.max_pages` is planned (the
    watchdog's progress hook: one call per page, keep it cheap). It returns None to plan the page,
    or a unit that stands in for it unplanned (an error row); it raises StopDocument to end the
    document there.

    Why groups: interpreting a page, extracting its text layer and (for the caller) converting its
    row to Arrow all run right after the previous page's ~21 MB render has flushed the CPU caches,
    where they cost 3-5x their warm price (about 20% on top of the render). Interpreting a group of
    pages back to back, then rendering them back to back, keeps each kind of work warm; the
    caller can also build one metadata table per group. Only display lists wait, never pixels.
    `filetype` None lets MuPDF recognise another document type by content (XPS, EPUB, CBZ, SVG...;
    pipeline/media/identify.py decides which files go this way).
    Raises MediaError for a source that cannot be expanded at all; pages fail alone.
    """
    doc = _open(data, limits, filetype)
    try:
        doc_flags = ["pdf_repaired"] if doc.is_repaired else []
        n_pages = doc.page_count
        rendered = min(n_pages, limits.max_pages)
        step = cfg.plan_ahead_pages
        block_at = _fault_block_index(doc) if _FAULT_BLOCK_PAGE else None
        stopped = False
        for first in range(0, rendered, step):
            group = []
            for index in range(first, min(first + step, rendered)):
                if on_page is not None:
                    try:
                        stand_in = on_page(index, n_pages)
                    except StopDocument:
                        stopped = True
                        break
                    if stand_in is not None:
                        group.append(PagePlan(stand_in))
                        continue
                if index == block_at:
                    _block_forever()
                group.append(_plan_page(doc, index, cfg, limits, pixel_budget, doc_flags, tile_min_dpi,
                                        tile_min_area, fit, n_pages=n_pages))
            if group:
                yield group
            del group  # the caller renders them; their display lists go with them
            if stopped:
                return
        for first in range(rendered, n_pages, step):
            yield [PagePlan(MediaUnit(
                unit_index=index, unit_kind="page", error_type="page_limit",
                error_message=f"page {index + 1} of {n_pages} is beyond limits.max_pages={limits.max_pages}",
                flags=list(doc_flags),
            )) for index in range(first, min(first + step, n_pages))]
    finally:
        doc.close()


def choose_dpi(width_pt: float, height_pt: float, cfg: PdfConfig, pixel_budget: int) -> float:
    """DPI at which a page of this size (points) renders to about `pixel_budget` pixels, clamped to the config."""
    area_in2 = (width_pt / _POINTS_PER_INCH) * (height_pt / _POINTS_PER_INCH)
    if area_in2 <= 0:
        return cfg.min_dpi
    dpi = math.sqrt(pixel_budget / area_in2)
    return min(max(dpi, cfg.min_dpi), cfg.max_dpi)


def _open(data: bytes, limits: LimitsConfig, filetype: str | None = "pdf") -> pymupdf.Document:
    if not data:
        raise MediaError("empty_file", "the PDF has zero bytes")
    if len(data) > limits.max_bytes:
        raise MediaError("file_too_large", f"{len(data)} bytes exceeds limits.max_bytes={limits.max_bytes}")
    try:
        doc = pymupdf.open(stream=data, filetype=filetype)
    except pymupdf.EmptyFileError as err:
        raise MediaError("empty_file", f"MuPDF found no content: {describe(err)}") from None
    except (pymupdf.FileDataError, RuntimeError, ValueError) as err:
        what = "PDF" if filetype == "pdf" else "document"
        raise MediaError("pdf_corrupt", f"MuPDF could not open the {what} (no readable cross-reference table "
                         f"or page tree): {describe(err)}") from None
    # AES/RC4 with a user password: opens, but every page access raises. Owner-only passwords render.
    if doc.needs_pass:
        doc.close()
        raise MediaError("pdf_encrypted", "the PDF needs a user password")
    if doc.page_count == 0:
        doc.close()
        raise MediaError("pdf_no_pages", "the PDF has no pages")
    return doc


def _plan_page(
    doc: pymupdf.Document, index: int, cfg: PdfConfig, limits: LimitsConfig, pixel_budget: int, doc_flags: list[str],
    tile_min_dpi: float | None = None, tile_min_area: float = 0.0,
    fit: Callable[[int, int], tuple[int, int] | None] | None = None, n_pages: int = 0,
) -> PagePlan:
    flags = list(doc_flags)
    n_pages = n_pages or doc.page_count
    try:
        page = doc.load_page(index)
        missing = _missing_content(doc, page)  # raises "bad xref" for a page object that is not there
        if missing is not None:
            # MuPDF renders such a page blank without a word: that is lost content, not an empty page.
            return PagePlan(MediaUnit(unit_index=index, unit_kind="page", error_type="page_missing_content",
                                      error_message=f"page {index + 1}: {missing}; it would render blank",
                                      flags=[*flags, "page_missing_content"]))
        # page.rect already has /Rotate applied (a rotated Letter page is 792x612), and so does the
        # display list. (Each page.rect is a call into MuPDF: read it once.)
        rect = page.rect
        dpi = choose_dpi(rect.width, rect.height, cfg, pixel_budget)
        area_in2 = rect.width * rect.height / _POINTS_PER_INCH**2
        if tile_min_dpi is not None and dpi < tile_min_dpi and area_in2 >= tile_min_area:
            # Small print on a poster is lost at the budget's DPI: render legibly and let the caller tile.
            dpi = min(tile_min_dpi, cfg.max_dpi)
            flags.append("render_for_tiling")
        dpi = _fit_max_pixels(rect, dpi, limits.max_pixels, flags)
        # One pass over the content stream (the display list, /Rotate applied) feeds both the text
        # layer and the render: page.get_textpage would interpret the page a second time.
        dlist = page.get_displaylist()
        text, rotation = _text_and_rotation(dlist, cfg.extract_text_layer, cfg.detect_text_orientation)
        target = None
        if fit is not None and "render_for_tiling" not in flags:
            target = fit(*natural_size(rect, dpi, rotation))
        if rotation:
            flags.append(f"rotated_{rotation}")
    except Exception as err:  # MuPDF raises RuntimeError, ValueError and friends; any of them fails only this page
        error_type, message = _page_error(index, n_pages, err)
        return PagePlan(MediaUnit(unit_index=index, unit_kind="page", error_type=error_type, error_message=message,
                                  flags=flags))
    unit = MediaUnit(unit_index=index, unit_kind="page", text_layer=text, flags=flags)
    return PagePlan(unit, size=target, _dlist=dlist, _rect=rect, _dpi=dpi, _rotation=rotation,
                    _check_blank=bool(doc_flags))


def _page_error(index: int, n_pages: int, err: Exception) -> tuple[str, str]:
    """(error_type, message) for a page MuPDF cannot load or interpret, saying what is wrong with the file."""
    text = describe(err)
    if isinstance(err, ValueError) and "not in document" in text:
        # MuPDF takes the page count from the page tree's /Count, which may claim more pages than exist.
        return "page_missing", (f"page {index + 1} of {n_pages} does not exist in the file: its page tree "
                                f"claims {n_pages} pages but holds fewer")
    if "xref" in text.lower() or "object" in text.lower():
        return "page_missing", (f"page {index + 1} of {n_pages}: its page object cannot be found in the file "
                                f"(broken reference in the page tree: {text})")
    return "page_render_failed", f"page {index + 1} of {n_pages}: MuPDF could not interpret the page: {text}"


_REF = re.compile(rb"(\d+)\s+\d+\s+R")


def _missing_content(doc: pymupdf.Document, page: pymupdf.Page) -> str | None:
    """What is missing when a page object or its content streams are absent from the file (None when
    they are there; a page with no /Contents at all is legitimately blank). Two to three MuPDF calls."""
    if not doc.is_pdf or not page.xref:
        return None
    if doc.xref_get_key(page.xref, "Type")[0] == "null":
        return "its page object is missing from the file (the page tree points to an empty object)"
    kind, value = doc.xref_get_key(page.xref, "Contents")
    if kind not in ("xref", "array"):
        return None
    length = doc.xref_length()
    refs = [int(n) for n in _REF.findall(value.encode())]
    lost = [n for n in refs if n <= 0 or n >= length or not doc.xref_is_stream(n)]
    if lost:
        return f"its content stream (object {', '.join(map(str, lost))}) is missing from the file"
    return None


def _fit_max_pixels(rect: pymupdf.Rect, dpi: float, max_pixels: int, flags: list[str]) -> float:
    """Lower the DPI (even below min_dpi) when the page would exceed limits.max_pixels: a poster must not OOM."""
    w_in, h_in = rect.width / _POINTS_PER_INCH, rect.height / _POINTS_PER_INCH
    # MuPDF rounds the pixmap outwards, up to one extra pixel per axis: keep (w*d + 1) * (h*d + 1) <= max_pixels.
    if (w_in * dpi + 1) * (h_in * dpi + 1) <= max_pixels:
        return dpi
    flags.append("dpi_capped_by_max_pixels")
    a, b, c = w_in * h_in, w_in + h_in, 1 - max_pixels
    return max((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a), 1e-3)


def _text_and_rotation(dlist: pymupdf.DisplayList, want_text: bool, detect: bool) -> tuple[str | None, int]:
    """The page's text layer (as page.get_text() gives it) and the clockwise turn, on top of /Rotate,
    that makes its text read upright; one MuPDF text page, made from the page's display list, serves both."""
    if not want_text and not detect:
        return None, 0
    textpage = pymupdf.TextPage(dlist.get_textpage(flags=_TEXT_FLAGS))
    text = textpage.extractText()
    rotation = _text_rotation(textpage, text) if detect else 0
    return (text if want_text else None), rotation


def _text_rotation(textpage: pymupdf.TextPage, text: str) -> int:
    n_chars = len("".join(text.split()))
    if n_chars == 0:
        return 0  # no text layer (a scan): nothing to go by
    directions = _block_directions(textpage)
    if directions is not None and len({line_angle(dx, dy) for dx, dy in directions}) == 1:
        # All text points the same way: the weights cannot change the vote, so skip counting them.
        lines = [(*directions[0], n_chars)]
    else:
        lines = _weighted_lines(textpage)
    # Directions are in the rendered page's space: the display list already has /Rotate applied
    # (page.get_textpage, by contrast, drops /Rotate while it extracts), so there is no base turn.
    return dominant_rotation(lines, base_rotation=0)


def _block_directions(textpage: pymupdf.TextPage) -> list[tuple[float, float]] | None:
    """The baseline direction of each text block's first line.

    MuPDF starts a new block whenever the writing direction changes, so a block's first line
    speaks for all its lines (tests/unit/test_media_pdf.py checks this on mixed pages). Read from
    MuPDF's structs (`stext.block_directions`, ~1 us a block), or through the bindings where that
    mirror does not apply (~7 us a block). None if neither works (another pymupdf): the caller then
    uses the public, slower extractDICT.
    """
    raw = stext.block_directions(textpage)
    if raw is None:
        raw = stext.bound_directions(textpage)
    if raw is None:
        return None
    return [vertical_to_baseline(dx, dy) if wmode else (dx, dy) for dx, dy, wmode in raw]


def _weighted_lines(textpage: pymupdf.TextPage) -> list[tuple[float, float, int]]:
    """(dx, dy, non-space characters) per text line, from the public extractDICT."""
    lines = []
    for block in textpage.extractDICT()["blocks"]:
        for line in block.get("lines", ()):
            n_chars = sum(len("".join(span["text"].split())) for span in line["spans"])
            dx, dy = line["dir"]
            lines.append((*(vertical_to_baseline(dx, dy) if line.get("wmode") else (dx, dy)), n_chars))
    return lines


def natural_size(rect: pymupdf.Rect, dpi: float, rotation: int = 0) -> tuple[int, int]:
    """(width, height) of the upright render at `dpi` (a quarter turn swaps the sides)."""
    zoom = dpi / _POINTS_PER_INCH
    w, h = rect.width * zoom, rect.height * zoom
    return (round(h), round(w)) if rotation in (90, 270) else (round(w), round(h))


def page_matrix(rect: pymupdf.Rect, dpi: float, rotation: int = 0, target: tuple[int, int] | None = None) -> pymupdf.Matrix:
    """The render matrix for a page (`rect`: page.rect, /Rotate applied): `dpi`, or exactly `target`
    pixels when given, turned `rotation` degrees clockwise on top of /Rotate."""
    zoom = dpi / _POINTS_PER_INCH
    matrix = pymupdf.Matrix(zoom, zoom)
    if target is not None:
        # Scale x and y separately so the pixmap comes out at exactly `target` (the scale applies
        # after the rotation below, i.e. in the upright output's axes).
        up_w, up_h = (rect.height, rect.width) if rotation in (90, 270) else (rect.width, rect.height)
        matrix = pymupdf.Matrix(target[0] / up_w, target[1] / up_h)
    if rotation:
        matrix.prerotate(rotation)  # clockwise on the rendered page, on top of /Rotate
    return matrix


def _render(
    dlist: pymupdf.DisplayList, rect: pymupdf.Rect, dpi: float, rotation: int = 0,
    target: tuple[int, int] | None = None,
) -> tuple[np.ndarray, pymupdf.Pixmap | None]:
    """The page (its display list; `rect`: page.rect) as an (H, W, 3) uint8 array, and the pixmap it
    is a view of (None when it owns its data). page.get_pixmap renders through the same display list."""
    matrix = page_matrix(rect, dpi, rotation, target)
    pix = dlist.get_pixmap(matrix=matrix, colorspace=pymupdf.csRGB, alpha=False)
    rows = np.frombuffer(pix.samples_mv, dtype=np.uint8).reshape(pix.height, pix.stride)
    frame = rows[:, : pix.width * 3].reshape(pix.height, pix.width, 3)
    if target is not None and (pix.width, pix.height) != target:
        # MuPDF rounds the pixmap box outward; a pixel off would change the processor's plan.
        from PIL import Image

        return np.asarray(Image.fromarray(frame).resize(target, Image.Resampling.BILINEAR)), None
    # A view of MuPDF's buffer, valid while `pix` lives: the caller keeps it (MediaUnit.keepalive).
    # A 300 dpi page is ~20 MB: copying it into a new Python buffer costs ~10x the render itself.
    return frame, pix


def _is_blank(frame: np.ndarray) -> bool:
    return frame.size == 0 or bool(frame.min() == frame.max())


def _fault_block_index(doc: pymupdf.Document) -> int | None:
    """The page CPMV_FAULT_BLOCK_PAGE blocks in this document (test-only; see _FAULT_BLOCK_PAGE)."""
    title, _, index = (_FAULT_BLOCK_PAGE or "").rpartition(":")
    return int(index) if title and title in (doc.metadata or {}).get("title", "") else None


def _block_forever() -> None:
    """Test-only: block in a C call that keeps the GIL (ctypes.PyDLL does not release it), like a
    MuPDF call that never returns; only a signal from outside the process ends it."""
    import ctypes

    pause = ctypes.PyDLL(None).pause
    while True:
        pause()

"""PDF -> one page unit at a time, rendered straight into numpy (no PNG/JPEG round trip).

Render resolution is chosen per page from a pixel budget (what the model's slicer will use), not a
fixed DPI: a Letter page and a poster both come out at about `pixel_budget` pixels, within
[min_dpi, max_dpi]. Encoding a pixmap costs ~10x the render itself (DESIGN.md section 6), so the
pixmap samples are copied into an array and nothing is encoded.

Failure policy (codes are stable; they land in `error_type`):
- whole source: "empty_file", "pdf_corrupt", "pdf_encrypted", "pdf_no_pages" (MediaError).
- one page: "page_render_failed" (the other pages go on); "page_limit" for every page beyond
  `limits.max_pages` (one cheap row per excess page, nothing rendered, so no page goes missing silently).
- a document MuPDF had to repair (e.g. truncated) renders without exceptions but may lose pages: every
  unit gets flag "pdf_repaired", and a page that renders as one flat colour also gets "blank_page".
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pymupdf

from pipeline.config import LimitsConfig, PdfConfig
from pipeline.media.base import MediaError, MediaUnit

_POINTS_PER_INCH = 72.0


def expand_pdf(data: bytes, cfg: PdfConfig, limits: LimitsConfig, pixel_budget: int) -> Iterator[MediaUnit]:
    """Yield one "page" unit per page of a PDF, rendered to about `pixel_budget` pixels.

    Raises MediaError for a source that cannot be expanded at all; pages fail alone.
    """
    doc = _open(data, limits)
    try:
        doc_flags = ["pdf_repaired"] if doc.is_repaired else []
        n_pages = doc.page_count
        for index in range(min(n_pages, limits.max_pages)):
            yield _page_unit(doc, index, cfg, limits, pixel_budget, doc_flags)
        for index in range(limits.max_pages, n_pages):
            yield MediaUnit(
                unit_index=index, unit_kind="page", error_type="page_limit",
                error_message=f"page {index + 1} of {n_pages} is beyond limits.max_pages={limits.max_pages}",
                flags=list(doc_flags),
            )
    finally:
        doc.close()


def choose_dpi(width_pt: float, height_pt: float, cfg: PdfConfig, pixel_budget: int) -> float:
    """DPI at which a page of this size (points) renders to about `pixel_budget` pixels, clamped to the config."""
    area_in2 = (width_pt / _POINTS_PER_INCH) * (height_pt / _POINTS_PER_INCH)
    if area_in2 <= 0:
        return cfg.min_dpi
    dpi = math.sqrt(pixel_budget / area_in2)
    return min(max(dpi, cfg.min_dpi), cfg.max_dpi)


def _open(data: bytes, limits: LimitsConfig) -> pymupdf.Document:
    if not data:
        raise MediaError("empty_file", "the PDF has zero bytes")
    if len(data) > limits.max_bytes:
        raise MediaError("file_too_large", f"{len(data)} bytes exceeds limits.max_bytes={limits.max_bytes}")
    try:
        doc = pymupdf.open(stream=data, filetype="pdf")
    except pymupdf.EmptyFileError as err:
        raise MediaError("empty_file", f"MuPDF found no content: {err}") from None
    except (pymupdf.FileDataError, RuntimeError, ValueError) as err:
        raise MediaError("pdf_corrupt", f"MuPDF could not open the PDF: {err}") from None
    # AES/RC4 with a user password: opens, but every page access raises. Owner-only passwords render.
    if doc.needs_pass:
        doc.close()
        raise MediaError("pdf_encrypted", "the PDF needs a user password")
    if doc.page_count == 0:
        doc.close()
        raise MediaError("pdf_no_pages", "the PDF has no pages")
    return doc


def _page_unit(
    doc: pymupdf.Document, index: int, cfg: PdfConfig, limits: LimitsConfig, pixel_budget: int, doc_flags: list[str]
) -> MediaUnit:
    flags = list(doc_flags)
    try:
        page = doc.load_page(index)
        # page.rect already has /Rotate applied (a rotated Letter page is 792x612), and so does get_pixmap.
        dpi = choose_dpi(page.rect.width, page.rect.height, cfg, pixel_budget)
        dpi = _fit_max_pixels(page.rect, dpi, limits.max_pixels, flags)
        frame = _render(page, dpi)
        text = page.get_text() if cfg.extract_text_layer else None
    except Exception as err:  # MuPDF raises RuntimeError, ValueError and friends; any of them fails only this page
        return MediaUnit(
            unit_index=index, unit_kind="page", error_type="page_render_failed",
            error_message=f"page {index + 1}: {type(err).__name__}: {err}", flags=flags,
        )
    if doc_flags and _is_blank(frame):
        flags.append("blank_page")  # in a repaired document a flat page is likely lost content, not a blank page
    return MediaUnit(unit_index=index, unit_kind="page", frames=[frame], text_layer=text, flags=flags)


def _fit_max_pixels(rect: pymupdf.Rect, dpi: float, max_pixels: int, flags: list[str]) -> float:
    """Lower the DPI (even below min_dpi) when the page would exceed limits.max_pixels: a poster must not OOM."""
    pixels = (rect.width * dpi / _POINTS_PER_INCH) * (rect.height * dpi / _POINTS_PER_INCH)
    if pixels <= max_pixels:
        return dpi
    flags.append("dpi_capped_by_max_pixels")
    return dpi * math.sqrt(max_pixels / pixels) * 0.999  # margin for MuPDF rounding the pixmap size up


def _render(page: pymupdf.Page, dpi: float) -> np.ndarray:
    zoom = dpi / _POINTS_PER_INCH
    pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
    # Rows may be padded (stride > width*3); the copy detaches the array from MuPDF's buffer.
    rows = np.frombuffer(pix.samples_mv, dtype=np.uint8).reshape(pix.height, pix.stride)
    return rows[:, : pix.width * 3].reshape(pix.height, pix.width, 3).copy()


def _is_blank(frame: np.ndarray) -> bool:
    return frame.size == 0 or bool(frame.min() == frame.max())

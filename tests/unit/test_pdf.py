"""expand_pdf: DPI from a pixel budget, rotation, text layers, and every broken-PDF path."""

from __future__ import annotations

import numpy as np
import pymupdf
import pytest

from pipeline import samples
from pipeline.config import LimitsConfig, PdfConfig
from pipeline.media.base import MediaError
from pipeline.media.pdf import choose_dpi, expand_pdf

BUDGET = 9 * 448 * 448
LIMITS = LimitsConfig()
CFG = PdfConfig()


def _pdf(*sizes: tuple[float, float], rotate: int = 0, marker: bool = False) -> bytes:
    doc = pymupdf.open()
    for w, h in sizes:
        page = doc.new_page(width=w, height=h)
        page.insert_text((72, 72), "hello", fontsize=12)
        if marker:  # a black square in the unrotated top-left corner
            page.draw_rect(pymupdf.Rect(0, 0, 100, 100), color=(0, 0, 0), fill=(0, 0, 0))
        if rotate:
            page.set_rotation(rotate)
    data = doc.tobytes()
    doc.close()
    return data


def _units(data: bytes, cfg: PdfConfig = CFG, limits: LimitsConfig = LIMITS, budget: int = BUDGET) -> list:
    return list(expand_pdf(data, cfg, limits, budget))


def _error(data: bytes, **kw) -> str:
    with pytest.raises(MediaError) as info:
        _units(data, **kw)
    return info.value.error_type


def test_letter_page_renders_to_about_the_budget() -> None:
    (unit,) = _units(_pdf((612, 792)))
    h, w, c = unit.frames[0].shape
    assert c == 3 and unit.frames[0].dtype == np.uint8
    assert abs(w * h - BUDGET) / BUDGET < 0.01
    assert 135 < choose_dpi(612, 792, CFG, BUDGET) < 142  # ~139 dpi, not a fixed 300
    assert unit.unit_kind == "page" and unit.unit_index == 0 and unit.error_type is None


def test_dpi_clamped_to_min_and_max() -> None:
    cfg = PdfConfig(min_dpi=100, max_dpi=200)
    card, poster = _units(_pdf((252, 144), (2384, 3370)), cfg=cfg)
    assert card.frames[0].shape[:2] == (400, 700)  # 3.5x2 in at max 200 dpi (the budget asked for more)
    assert poster.frames[0].shape[:2] == pytest.approx((4681, 3311), abs=1)  # A0 at min 100 dpi
    assert choose_dpi(252, 144, cfg, BUDGET) == 200 and choose_dpi(2384, 3370, cfg, BUDGET) == 100


def test_max_pixels_lowers_dpi_below_min() -> None:
    (unit,) = _units(_pdf((612, 792)), limits=LimitsConfig(max_pixels=100_000))
    h, w, _ = unit.frames[0].shape
    assert 95_000 < w * h <= 100_000
    assert "dpi_capped_by_max_pixels" in unit.flags


def test_rotate_90_swaps_axes_and_turns_content() -> None:
    (unit,) = _units(_pdf((612, 792), rotate=90, marker=True))
    frame = unit.frames[0]
    h, w, _ = frame.shape
    assert w > h  # portrait Letter displayed landscape
    # /Rotate 90 turns the page clockwise: the unrotated top-left marker ends up top-right.
    assert frame[5, w - 5].max() < 50 and frame[5, 5].min() > 200


def test_frames_are_writable_copies() -> None:
    (unit,) = _units(_pdf((300, 200)))
    frame = unit.frames[0]
    assert frame.flags.c_contiguous and frame.flags.writeable
    frame[0, 0] = 0  # must not touch MuPDF memory


def test_text_layer_born_digital_vs_scanned() -> None:
    report = _units(samples.report_pdf_bytes())
    assert len(report) == 2
    assert "Pipeline Report 2024" in report[0].text_layer and "Quarter" in report[0].text_layer
    assert "Appendix" in report[1].text_layer
    (scan,) = _units(samples.scan_pdf_bytes())
    assert scan.text_layer is not None and scan.text_layer.strip() == ""
    assert scan.frames[0].mean() > 150 and scan.frames[0].min() < 80  # a light page with dark text
    (off,) = _units(samples.scan_pdf_bytes(), cfg=PdfConfig(extract_text_layer=False))
    assert off.text_layer is None


def test_empty_random_and_tiny_truncation_are_source_errors() -> None:
    assert _error(b"") == "empty_file"
    assert _error(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()) == "pdf_corrupt"
    assert _error(samples.multipage_pdf_bytes(4)[:300]) == "pdf_corrupt"
    no_pages = b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
    assert _error(no_pages + b"trailer<</Root 1 0 R>>\n%%EOF\n") == "pdf_no_pages"
    assert _error(b"%PDF-1.7\n", limits=LimitsConfig(max_bytes=4)) == "file_too_large"


def test_truncated_half_is_flagged_repaired_with_lost_pages_typed() -> None:
    whole = samples.multipage_pdf_bytes(8)
    units = _units(whole[: len(whole) // 2])
    assert len(units) == 8
    assert all("pdf_repaired" in u.flags for u in units)
    # The pages whose objects were cut off are error units that say so (they used to render blank).
    lost = [u for u in units if u.error_type is not None]
    assert lost and len(lost) < 8  # some pages survived, the lost ones are visible
    assert {u.error_type for u in lost} <= {"page_missing", "page_missing_content"}
    assert all(u.frames == [] for u in lost)
    assert not any("pdf_repaired" in u.flags for u in _units(whole))


def test_encrypted_user_password() -> None:
    doc = pymupdf.open(stream=_pdf((300, 300)), filetype="pdf")
    locked = doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user", owner_pw="owner")
    owner_only = doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="owner")
    assert _error(locked) == "pdf_encrypted"
    (unit,) = _units(owner_only)  # owner-only passwords do not stop rendering
    assert unit.error_type is None and "hello" in unit.text_layer


def test_page_limit_error_units() -> None:
    units = _units(samples.multipage_pdf_bytes(8), limits=LimitsConfig(max_pages=3))
    assert [u.unit_index for u in units] == list(range(8))
    assert all(u.error_type is None and len(u.frames) == 1 for u in units[:3])
    assert all(u.error_type == "page_limit" and not u.frames for u in units[3:])
    assert "max_pages=3" in units[5].error_message


def test_one_failing_page_does_not_stop_the_rest(monkeypatch) -> None:
    # Fault injection at the MuPDF boundary: interpreting page 2's content stream (which feeds both
    # the text layer and the render) fails.
    original = pymupdf.Page.get_displaylist

    def flaky(self, *args, **kwargs):
        if self.number == 1:
            raise RuntimeError("simulated MuPDF failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pymupdf.Page, "get_displaylist", flaky)
    units = _units(samples.multipage_pdf_bytes(3))
    assert [u.error_type for u in units] == [None, "page_render_failed", None]
    assert "simulated" in units[1].error_message and not units[1].frames


def test_pages_are_yielded_lazily() -> None:
    it = expand_pdf(samples.multipage_pdf_bytes(3), CFG, LIMITS, BUDGET)
    first = next(it)
    assert first.unit_index == 0
    it.close()  # closing early closes the document without rendering the rest

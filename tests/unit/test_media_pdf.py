"""PDF pages: DPI from the model's pixel budget, text layer, rotation, broken and encrypted files."""

import pymupdf
import pytest

from pipeline.config import LimitsConfig, PdfConfig
from pipeline.media.base import MediaError
from pipeline.media.pdf import choose_dpi, expand_pdf
from pipeline.samples import multipage_pdf_bytes, report_pdf_bytes, scan_pdf_bytes

BUDGET = 9 * 448 * 448
LETTER = (612, 792)


def _units(data, budget=BUDGET, **limits):
    return list(expand_pdf(data, PdfConfig(), LimitsConfig(**limits), budget))


def _pdf(pages=1, rotate=0, size=LETTER, text="Hello world") -> bytes:
    doc = pymupdf.open()
    for _ in range(pages):
        page = doc.new_page(width=size[0], height=size[1])
        page.insert_text((72, 100), text, fontsize=20)
        page.set_rotation(rotate)
    return doc.tobytes()


def test_letter_page_renders_at_about_the_pixel_budget():
    (unit,) = _units(_pdf())
    h, w, c = unit.frames[0].shape
    assert c == 3 and unit.frames[0].dtype.name == "uint8"
    assert 0.95 * BUDGET <= w * h <= 1.05 * BUDGET
    assert abs(w / h - 612 / 792) < 0.01


def test_dpi_is_clamped_and_not_fixed():
    cfg = PdfConfig(min_dpi=72, max_dpi=300)
    assert choose_dpi(*LETTER, cfg, 10) == 72  # tiny budget: floor
    assert choose_dpi(72, 72, cfg, 10**9) == 300  # a 1-inch page with a huge budget: cap
    poster = choose_dpi(2384, 3370, cfg, BUDGET)  # A0 gets a lower DPI than Letter for the same budget
    assert poster == 72 and choose_dpi(*LETTER, cfg, BUDGET) == pytest.approx(139, abs=1)


def test_rotated_page_comes_out_landscape():
    (unit,) = _units(_pdf(rotate=90))
    h, w, _ = unit.frames[0].shape
    assert w > h


def test_text_layer_born_digital_vs_scanned():
    units = _units(report_pdf_bytes())
    assert len(units) == 2 and "Pipeline Report" in units[0].text_layer
    (scan,) = _units(scan_pdf_bytes())
    assert scan.frames and not scan.text_layer.strip()


def test_page_limit_gives_error_rows_not_silence():
    units = _units(multipage_pdf_bytes(5), max_pages=3)
    assert [u.unit_index for u in units] == [0, 1, 2, 3, 4]
    assert [u.error_type for u in units] == [None, None, None, "page_limit", "page_limit"]
    assert not units[4].frames


def test_max_pixels_caps_the_render():
    (unit,) = _units(_pdf(size=(2384, 3370)), budget=50_000_000, max_pixels=2_000_000)
    h, w, _ = unit.frames[0].shape
    assert w * h <= 2_000_000 and "dpi_capped_by_max_pixels" in unit.flags


@pytest.mark.parametrize("data,code", [
    (b"", "empty_file"),
    (b"%PDF-1.7\n" + bytes(range(256)) * 8, "pdf_corrupt"),
    (bytes(range(256)) * 4, "pdf_corrupt"),
])
def test_broken_files(data, code):
    with pytest.raises(MediaError) as err:
        _units(data)
    assert err.value.error_type == code


def test_truncated_pdf_is_flagged_repaired():
    whole = multipage_pdf_bytes(8)
    try:
        units = _units(whole[: len(whole) // 2])
    except MediaError as err:  # some truncations cannot be repaired at all: also an explained outcome
        assert err.error_type == "pdf_corrupt"
        return
    assert units and all("pdf_repaired" in u.flags for u in units)


def test_encrypted_with_user_password():
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "secret")
    data = doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="u", owner_pw="o")
    with pytest.raises(MediaError) as err:
        _units(data)
    assert err.value.error_type == "pdf_encrypted"


def test_owner_password_only_renders():
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "readable")
    data = doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="o", user_pw="")
    (unit,) = _units(data)
    assert unit.frames and "readable" in unit.text_layer

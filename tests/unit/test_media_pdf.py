"""PDF pages: DPI from the model's pixel budget, text layer, rotation, broken and encrypted files."""

import numpy as np
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


# --- Orientation from the text layer ------------------------------------------------------------
# insert_text(rotate=R) turns text R degrees counterclockwise; /Rotate P turns the page P clockwise.
# The page then shows its text turned (P - R) clockwise, and the expander turns it back by
# (R - P) mod 360 clockwise, flagged "rotated_<that>".

FOOTED = "L" * 30  # an asymmetric glyph: upright, every L has its foot at the bottom (and >= 20 chars)
_START = {0: (72, 200), 90: (200, 700), 180: (540, 600), 270: (400, 72)}  # keeps 30 L's at 20pt on Letter


def _turned_pdf(text_rotate=0, page_rotate=0, text=FOOTED) -> bytes:
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    page.insert_text(_START[text_rotate], text, fontsize=20, rotate=text_rotate)
    page.set_rotation(page_rotate)
    return doc.tobytes()


def _reads_upright(frame) -> bool:
    """A single line of L's reads upright: its ink is wider than tall, and heavier at the bottom (the feet)."""
    ink = frame.min(axis=2) < 128
    ys, xs = np.nonzero(ink)
    assert len(ys) > 100, "no text rendered"
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    wide = (right - left) > 3 * (bottom - top)
    feet_down = ys.mean() > (top + bottom) / 2
    return bool(wide and feet_down)


def _rotation_flags(unit) -> list[str]:
    return [f for f in unit.flags if f.startswith("rotated_")]


def _raw_render(data: bytes, unit) -> np.ndarray:
    """What pymupdf alone renders for page 0 at the unit's size (no orientation correction)."""
    doc = pymupdf.open(stream=data, filetype="pdf")  # keep the document alive while its page renders
    page = doc[0]
    zoom = choose_dpi(page.rect.width, page.rect.height, PdfConfig(), BUDGET) / 72
    pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
    frame = np.frombuffer(pix.samples_mv, np.uint8).reshape(pix.height, pix.stride)[:, : pix.width * 3]
    return frame.reshape(pix.height, pix.width, 3).copy()


@pytest.mark.parametrize("page_rotate", [0, 90, 180, 270])
@pytest.mark.parametrize("text_rotate", [0, 90, 180, 270])
def test_turned_text_comes_out_upright(text_rotate, page_rotate):
    data = _turned_pdf(text_rotate, page_rotate)
    (unit,) = _units(data)
    frame = unit.frames[0]
    correction = (text_rotate - page_rotate) % 360
    assert _reads_upright(frame), f"text {text_rotate} ccw, page /Rotate {page_rotate}: not upright"
    assert _rotation_flags(unit) == ([f"rotated_{correction}"] if correction else [])
    assert _reads_upright(_raw_render(data, unit)) == (correction == 0)  # the check itself tells them apart
    # Upright L's on a portrait page stay portrait; text that ran up or down the page makes it landscape.
    portrait = text_rotate in (0, 180)
    assert (frame.shape[0] > frame.shape[1]) == portrait
    assert 0.95 * BUDGET <= frame.shape[0] * frame.shape[1] <= 1.05 * BUDGET
    # The text layer is what pymupdf gives for the page, whatever the turn.
    doc = pymupdf.open(stream=data, filetype="pdf")
    assert unit.text_layer == doc[0].get_text()
    assert FOOTED in unit.text_layer


def test_rotate_and_text_that_cancel_out_are_left_alone():
    # A real landscape page: portrait MediaBox, /Rotate 90, text drawn turned so the viewer shows it upright.
    data = _turned_pdf(text_rotate=90, page_rotate=90)
    (unit,) = _units(data)
    frame = unit.frames[0]
    assert frame.shape[1] > frame.shape[0] and not _rotation_flags(unit)
    assert np.array_equal(frame, _raw_render(data, unit))  # exactly MuPDF's own /Rotate render


def test_upright_text_on_a_page_rotated_by_mistake_is_turned_back():
    (unit,) = _units(_turned_pdf(text_rotate=0, page_rotate=90))
    assert _rotation_flags(unit) == ["rotated_270"] and _reads_upright(unit.frames[0])
    assert unit.frames[0].shape[0] > unit.frames[0].shape[1]  # back to portrait


def _mixed_pdf(body_lines: int, label: str, label_rotate: int = 90) -> bytes:
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    for i in range(body_lines):
        page.insert_text((72, 100 + 16 * i), f"Body line {i}: the quick brown fox jumps over the lazy dog.",
                         fontsize=11)
    page.insert_text((560, 700), label, fontsize=9, rotate=label_rotate)
    return doc.tobytes()


def test_small_rotated_label_on_an_upright_page_is_not_turned():
    data = _mixed_pdf(body_lines=20, label="Rotated table caption, page margin note")
    (unit,) = _units(data)
    assert not _rotation_flags(unit)
    assert np.array_equal(unit.frames[0], _raw_render(data, unit))
    assert "Rotated table caption" in unit.text_layer and "Body line 19" in unit.text_layer


def test_half_rotated_page_is_not_turned():
    # A rotated table as large as the upright body: no direction has 60% of the characters.
    body = "Body line 0: the quick brown fox jumps over the lazy dog."
    data = _mixed_pdf(body_lines=1, label=body.replace("Body", "Table"), label_rotate=270)
    (unit,) = _units(data)
    assert not _rotation_flags(unit)
    assert np.array_equal(unit.frames[0], _raw_render(data, unit))


def test_mostly_rotated_page_is_turned():
    # The other side of the rule: one upright line against ten sideways ones (>= 60%) turns the page.
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    page.insert_text((72, 60), "Upright header line", fontsize=11)
    for i in range(10):
        page.insert_text((100 + 30 * i, 720), f"Sideways row {i}: quantity, price, total", fontsize=11, rotate=90)
    (unit,) = _units(doc.tobytes())
    assert _rotation_flags(unit) == ["rotated_90"]


def test_vertical_cjk_text_is_not_turned():
    # Vertical writing (wmode 1) advances down the page on an upright page: that is not sideways text.
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    page.insert_font(fontname="japan", wmode=1)
    for i in range(3):
        page.insert_text((400 - 30 * i, 100), "日本語の縦書きテキストです", fontname="japan", fontsize=20)
    (unit,) = _units(doc.tobytes())
    assert not _rotation_flags(unit) and "縦書き" in unit.text_layer.replace("\n", "")


def test_scanned_page_is_never_turned():
    data = scan_pdf_bytes()
    (unit,) = _units(data)
    assert not _rotation_flags(unit)
    assert np.array_equal(unit.frames[0], _raw_render(data, unit))


def test_turned_even_without_storing_the_text_layer():
    units = list(expand_pdf(_turned_pdf(text_rotate=180), PdfConfig(extract_text_layer=False), LimitsConfig(), BUDGET))
    assert units[0].text_layer is None and _rotation_flags(units[0]) == ["rotated_180"]
    assert _reads_upright(units[0].frames[0])


def test_orientation_detection_can_be_switched_off():
    cfg = PdfConfig(detect_text_orientation=False)
    (unit,) = expand_pdf(_turned_pdf(text_rotate=180), cfg, LimitsConfig(), BUDGET)
    assert not _rotation_flags(unit) and not _reads_upright(unit.frames[0])
    assert "LLLL" in unit.text_layer


def test_too_little_text_is_no_evidence():
    (unit,) = _units(_turned_pdf(text_rotate=180, text="L" * 10))  # 10 characters: below MIN_CHARS
    assert not _rotation_flags(unit)


def _interleaved_pdf() -> bytes:
    """One text object whose lines change direction right next to each other (a rotated cell in a
    table row): the hardest case for the premise that a direction change starts a new block."""
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    page.insert_text((72, 72), "x", fontname="helv")  # puts /helv in the page's resources
    rows = []
    for i in range(12):
        y = 100 + 14 * i
        rows.append(f"1 0 0 1 72 {y} Tm (Row {i} horizontal cell text) Tj 0 1 -1 0 240 {y - 10} Tm (up {i}) Tj "
                    f"1 0 0 1 252 {y} Tm (then horizontal again) Tj 0 -1 1 0 400 {y - 10} Tm (down {i}) Tj")
    doc.update_stream(page.get_contents()[0], ("BT /helv 11 Tf " + " ".join(rows) + " ET").encode())
    return doc.tobytes()


@pytest.mark.parametrize("data", [
    _turned_pdf(90), _turned_pdf(180, 90), _mixed_pdf(20, "a rotated label here"), _mixed_pdf(1, "x" * 50, 270),
    _interleaved_pdf(),
])
def test_fast_block_directions_agree_with_extract_dict(data, monkeypatch):
    """The low-level walk (fast path: each block's first line) and the public extractDICT (every
    line: the fallback) agree, and MuPDF never mixes directions inside a block (the fast path's premise)."""
    from pipeline.media import pdf as pdf_mod
    from pipeline.media.orientation import line_angle

    doc = pymupdf.open(stream=data, filetype="pdf")
    textpage = pymupdf.TextPage(doc[0].get_displaylist().get_textpage(flags=pymupdf.TEXTFLAGS_TEXT))
    blocks = [[tuple(ln["dir"]) for ln in b["lines"]] for b in textpage.extractDICT()["blocks"] if b.get("lines")]
    assert all(len({line_angle(*d) for d in lines}) == 1 for lines in blocks)
    fast = pdf_mod._block_directions(textpage)
    assert fast is not None and fast == [lines[0] for lines in blocks]
    flags_fast = _rotation_flags(_units(data)[0])
    monkeypatch.setattr(pdf_mod, "_block_directions", lambda tp: None)  # as if the bindings had changed
    assert _rotation_flags(_units(data)[0]) == flags_fast


@pytest.mark.parametrize("raw_rotate,snapped", [("45", 90), ("135", 180), ("-90", 270), ("450", 90), ("44", 0)])
def test_odd_rotate_values_follow_mupdf_snapping(raw_rotate, snapped):
    # pymupdf reports page.rotation 0 for a /Rotate that is no multiple of 90, but MuPDF renders it
    # snapped to the nearest quarter turn; the text directions then come with that turn applied.
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    page.insert_text(_START[0], FOOTED, fontsize=20)
    doc.xref_set_key(page.xref, "Rotate", raw_rotate)
    (unit,) = _units(doc.tobytes())
    assert _reads_upright(unit.frames[0])
    assert _rotation_flags(unit) == ([f"rotated_{(-snapped) % 360}"] if snapped else [])


def _vertical_cjk_pdf() -> bytes:
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    page.insert_font(fontname="japan", wmode=1)
    for i in range(3):
        page.insert_text((400 - 30 * i, 100), "日本語の縦書きテキストです", fontname="japan", fontsize=20)
    page.insert_text((72, 700), "and a horizontal footer line", fontsize=11)
    return doc.tobytes()


def _image_and_text_pdf() -> bytes:
    """Text blocks around an image block: the struct walk must step over a non-text block."""
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    page.insert_text((72, 80), "Caption above the figure", fontsize=12)
    page.insert_image(pymupdf.Rect(72, 100, 264, 244), stream=buf.getvalue())
    page.insert_text((72, 300), "Text below the figure, written sideways next", fontsize=12)
    page.insert_text((400, 600), "a rotated note", fontsize=12, rotate=90)
    return doc.tobytes()


STRUCT_FIXTURES = [
    _turned_pdf(90), _turned_pdf(180, 90), _mixed_pdf(20, "a rotated label here"), _interleaved_pdf(),
    _vertical_cjk_pdf(), _image_and_text_pdf(), report_pdf_bytes(), scan_pdf_bytes(),
]


@pytest.mark.parametrize("flags", [pymupdf.TEXTFLAGS_TEXT, pymupdf.TEXTFLAGS_DICT])  # DICT keeps image blocks
@pytest.mark.parametrize("data", STRUCT_FIXTURES)
def test_struct_mirror_reads_what_the_bindings_read(data, flags, monkeypatch):
    """`stext` reads MuPDF's text structs through a ctypes mirror of the header; on the MuPDF it
    mirrors it must read exactly what the bindings read (types, line pointers, directions, wmode),
    and on any other MuPDF it must stand aside (None) so the bindings are used."""
    from pipeline.media import stext

    monkeypatch.setattr(stext, "_checked", None)  # as in a fresh process
    doc = pymupdf.open(stream=data, filetype="pdf")
    textpage = pymupdf.TextPage(doc[0].get_displaylist().get_textpage(flags=flags))
    slow = stext.bound_directions(textpage)
    assert slow is not None
    fast = stext.block_directions(textpage)
    if tuple(pymupdf.mupdf_version_tuple[:2]) != stext.MIRRORED_MUPDF:
        assert fast is None
        pytest.skip(f"MuPDF {pymupdf.mupdf_version} is not the mirrored {stext.MIRRORED_MUPDF}: the bindings are used")
    assert fast == slow
    if slow:
        assert stext._checked is True  # the first page with text switched the fast path on
    if flags == pymupdf.TEXTFLAGS_DICT and data is STRUCT_FIXTURES[5]:
        types = [b.m_internal.type for b in textpage.this]
        assert pymupdf.mupdf.FZ_STEXT_BLOCK_IMAGE in types  # the walk really stepped over an image block
    if data is STRUCT_FIXTURES[4]:
        assert any(wmode for _, _, wmode in fast) and any(not wmode for _, _, wmode in fast)


def test_struct_mirror_that_disagrees_is_switched_off(monkeypatch):
    """If the mirror ever reads something else than the bindings (a MuPDF whose structs changed
    without its version saying so), the process falls back to the bindings and the result stands."""
    from pipeline.media import pdf as pdf_mod
    from pipeline.media import stext

    data = _turned_pdf(90)
    monkeypatch.setattr(stext, "_checked", False)
    expected = _rotation_flags(_units(data)[0])  # through the bindings only
    assert expected  # a page that is turned: the fallback's reading matters
    monkeypatch.setattr(stext, "_checked", None)
    monkeypatch.setattr(stext, "_read", lambda address: [(0.0, 1.0, 0)])  # a wrong reading
    textpage = pymupdf.TextPage(pymupdf.open(stream=data, filetype="pdf")[0].get_displaylist().get_textpage(
        flags=pymupdf.TEXTFLAGS_TEXT))
    assert stext.block_directions(textpage) is None and stext._checked is False
    assert pdf_mod._block_directions(textpage) is not None  # from the bindings
    assert _rotation_flags(_units(data)[0]) == expected

"""PDF structure errors are typed and explained: a page count that lies, a page object that is not
there, a content stream that is missing (which MuPDF renders blank without a word)."""

from __future__ import annotations

from pipeline.config import LimitsConfig, PdfConfig
from pipeline.media.pdf import expand_pdf
from tests import hostile


def units(data: bytes) -> list[tuple[int, str | None, str | None, list[str]]]:
    return [(u.unit_index, u.error_type, u.error_message, u.flags)
            for u in expand_pdf(data, PdfConfig(), LimitsConfig(), 200_000)]


def test_lying_page_count() -> None:
    got = units(hostile.pdf_lying_count(3, 5))
    assert [g[1] for g in got] == [None, None, None, "page_missing", "page_missing"]
    assert got[3][2] == "page 4 of 5 does not exist in the file: its page tree claims 5 pages but holds fewer"


def test_page_reference_to_an_object_the_file_lacks() -> None:
    got = units(hostile.pdf_broken_page_reference(3, 1))
    assert [g[1] for g in got] == [None, "page_missing", None]
    assert got[1][2] == ("page 2 of 3: its page object cannot be found in the file (broken reference in the "
                         "page tree: bad xref)")


def test_null_page_object_is_flagged_not_rendered_blank() -> None:
    got = units(hostile.pdf_null_page_object(3, 1))
    assert [(g[1], g[3]) for g in got] == [(None, []), ("page_missing_content", ["page_missing_content"]),
                                           (None, [])]
    assert got[1][2] == ("page 2: its page object is missing from the file (the page tree points to an empty "
                         "object); it would render blank")


def test_missing_content_stream_is_flagged() -> None:
    data = hostile.pdf_missing_content_stream(3, 1)
    got = units(data)
    assert [(g[1], g[3]) for g in got] == [(None, []), ("page_missing_content", ["page_missing_content"]),
                                           (None, [])]
    assert got[1][2].startswith("page 2: its content stream (object ") and got[1][2].endswith(
        ") is missing from the file; it would render blank")


def test_a_page_without_contents_is_blank_on_purpose_not_missing() -> None:
    import pymupdf

    doc = pymupdf.open()
    doc.new_page()  # no /Contents at all: an intentionally empty page
    got = units(doc.tobytes())
    assert [(g[1], g[3]) for g in got] == [(None, [])]


def test_corrupt_pdf_message_says_what_is_wrong() -> None:
    from pipeline.media.base import MediaError
    import pytest

    with pytest.raises(MediaError) as err:
        units(b"%PDF-1.7\n" + bytes(range(256)) * 4)
    assert err.value.error_type == "pdf_corrupt"
    assert err.value.message.startswith("MuPDF could not open the PDF (no readable cross-reference table or page tree)")

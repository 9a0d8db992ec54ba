"""Media type from magic bytes, never from the name."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.media.sniff import SNIFF_BYTES, sniff
from pipeline.samples import clip_mp4_bytes, logo_png_bytes, photo_jpeg_bytes, report_pdf_bytes


def _pil(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"])
def test_image_formats(fmt):
    assert sniff(_pil(fmt)[:SNIFF_BYTES]) == "image"


def test_demo_files():
    assert sniff(report_pdf_bytes()[:SNIFF_BYTES]) == "pdf"
    assert sniff(photo_jpeg_bytes()[:SNIFF_BYTES]) == "image"
    assert sniff(logo_png_bytes()[:SNIFF_BYTES]) == "image"
    assert sniff(clip_mp4_bytes(seconds=0.5)[:SNIFF_BYTES]) == "video"


@pytest.mark.parametrize("head,kind", [
    (b"junk before header %PDF-1.7\n", "pdf"),
    (b"\x1a\x45\xdf\xa3" + b"\x00" * 20, "video"),  # WebM/Matroska
    (b"RIFF\x00\x00\x00\x00AVI LIST", "video"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", "unknown"),  # audio is not ours
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "image"),  # HEIC is an image, not a video
    (b"\x00\x00\x00\x18ftypqt  \x00\x00\x00\x00qt  ", "video"),
    (b"Meeting notes\n- plain text saved as .jpg\n", "unknown"),
    (b"BMW is a car brand, not a bitmap", "unknown"),
    (b"", "unknown"),
])
def test_edge_cases(head, kind):
    assert sniff(head) == kind


def test_mpeg_ts_needs_several_sync_bytes():
    ts = bytes([0x47] + [0] * 187) * 4
    assert sniff(ts) == "video"
    assert sniff(b"G" + b"x" * 400) == "unknown"

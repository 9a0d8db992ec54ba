"""sniff() decides by magic bytes only: every supported format, and the lies file names tell."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline import samples
from pipeline.media.sniff import SNIFF_BYTES, sniff


def _pil_bytes(fmt: str, mode: str = "RGB", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 8), 128 if mode in ("L", "P") else (10, 20, 30)).save(buf, format=fmt, **save)
    return buf.getvalue()


def test_constant() -> None:
    assert SNIFF_BYTES == 4096


@pytest.mark.parametrize(
    "fmt, kwargs",
    [("PNG", {}), ("JPEG", {}), ("GIF", {}), ("WEBP", {}), ("TIFF", {}), ("BMP", {})],
)
def test_images(fmt: str, kwargs: dict) -> None:
    assert sniff(_pil_bytes(fmt, **kwargs)[:SNIFF_BYTES]) == "image"


def test_tiff_big_endian_header() -> None:
    assert sniff(b"MM\x00*\x00\x00\x00\x08" + b"\x00" * 64) == "image"
    assert sniff(b"II*\x00\x08\x00\x00\x00" + b"\x00" * 64) == "image"


def test_demo_corpus(tmp_path) -> None:
    kinds = {p.name: sniff(p.read_bytes()[:SNIFF_BYTES]) for p in samples.make_demo_corpus(tmp_path)}
    assert kinds == {
        "report.pdf": "pdf", "scan.pdf": "pdf", "photo.jpg": "image", "logo.png": "image", "clip.mp4": "video",
    }


def test_bad_corpus_ignores_extensions(tmp_path) -> None:
    kinds = {p.name: sniff(p.read_bytes()[:SNIFF_BYTES]) for p in samples.make_bad_corpus(tmp_path)}
    # notes.jpg is text: the extension must not make it an image; empty input is "unknown".
    assert kinds == {"empty.pdf": "unknown", "truncated.pdf": "pdf", "notes.jpg": "unknown", "broken.mp4": "video"}


@pytest.mark.parametrize(
    "container, codec",
    [("mp4", "libx264"), ("mov", "libx264"), ("matroska", "libx264"), ("webm", "libvpx"), ("avi", "mpeg4"),
     ("mpegts", "libx264")],
)
def test_videos(container: str, codec: str) -> None:
    data = samples.video_bytes(0.4, 10, (32, 24), container, codec)
    assert sniff(data[:SNIFF_BYTES]) == "video"


@pytest.mark.parametrize("brand", [b"isom", b"mp42", b"mp41", b"qt  ", b"M4V ", b"avc1", b"3gp4"])
def test_ftyp_brands(brand: bytes) -> None:
    assert sniff(b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x02\x00isommp41") == "video"


def test_heic_is_not_video() -> None:
    assert sniff(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic") == "image"


def test_pdf_after_junk_prefix() -> None:
    assert sniff(b"\x00" * 500 + b"%PDF-1.7\n") == "pdf"
    assert sniff(b"\x00" * 1100 + b"%PDF-1.7\n") == "unknown"  # beyond the 1 KB window readers look at


@pytest.mark.parametrize(
    "head",
    [b"", b"hello world, this is text", b"BM is not a bitmap without its header", b"RIFF\x10\x00\x00\x00WAVEfmt ",
     b"\x00\x00\x00\x18ftyp", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()],
)
def test_unknown(head: bytes) -> None:
    assert sniff(head) == "unknown"

"""Hostile inputs, each made here with the libraries that read them (Pillow, pymupdf, PyAV) or, where
none writes the format (PSD), byte by byte from its specification.

Each kind stands for a fault found by trying public test files on the product (issue 11).
"""

from __future__ import annotations

import io
import struct
import zipfile

import av
import numpy as np
import pymupdf
from PIL import Image

_AUDIO_DTYPES = {"fltp": np.float32, "flt": np.float32, "s32p": np.int32, "s32": np.int32,
                 "s16p": np.int16, "s16": np.int16}


def pil_bytes(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB", **save: object) -> bytes:
    """An image of `size` in Pillow format `fmt`, with a gradient so it is not one flat colour."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def psd_bytes(size: tuple[int, int] = (24, 16)) -> bytes:
    """A minimal Photoshop PSD (version 1, RGB, 8 bits, raw image data), per Adobe's file format spec."""
    w, h = size
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layer and mask info
    planes = [bytes([(x * 10) % 256 for x in range(w)]) * h, bytes([128]) * (w * h), bytes([40]) * (w * h)]
    return header + sections + struct.pack(">H", 0) + b"".join(planes)


def tiff_pages(n: int = 3, size: tuple[int, int] = (64, 48)) -> bytes:
    """A multi-page (fax-like) TIFF: `n` pages, each a different grey level."""
    pages = [Image.new("L", size, 40 + 60 * i) for i in range(n)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    return buf.getvalue()


def animated_gif(n: int = 4, size: tuple[int, int] = (32, 32)) -> bytes:
    frames = [Image.new("RGB", size, (60 * i, 0, 0)) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def cbz_bytes(n: int = 2) -> bytes:
    """A comic book archive (a zip of page images), which MuPDF opens as a document."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(n):
            z.writestr(f"{i:03d}.png", pil_bytes("PNG", (60, 80)))
    return buf.getvalue()


def audio_with_cover(fmt: str = "mp4", codec: str = "aac", seconds: float = 2.0, cover: bool = True) -> bytes:
    """An audio file (MP3 with libmp3lame, M4A with AAC) with a JPEG cover as an attached picture."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        a = c.add_stream(codec, rate=44100)
        if cover:
            v = c.add_stream("mjpeg")
            v.width, v.height, v.pix_fmt = 64, 64, "yuvj420p"
            v.disposition = av.stream.Disposition.attached_pic
            pic = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 200, np.uint8), format="rgb24")
            for p in v.encode(pic.reformat(format="yuvj420p")):
                c.mux(p)
            for p in v.encode():
                c.mux(p)
        n = a.codec_context.frame_size or 1152
        dtype = _AUDIO_DTYPES[a.format.name]
        for i in range(int(seconds * 44100 / n)):
            shape = (1, n) if a.format.is_planar else (1, n)
            frame = av.AudioFrame.from_ndarray(np.zeros(shape, dtype), format=a.format.name, layout="mono")
            frame.sample_rate, frame.pts = 44100, i * n
            for p in a.encode(frame):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    return buf.getvalue()


def pdf_bytes(pages: int = 2, text: str = "Hostile page") -> bytes:
    doc = pymupdf.open()
    for i in range(pages):
        doc.new_page().insert_text((72, 72), f"{text} {i + 1}", fontsize=14)
    out = doc.tobytes()
    doc.close()
    return out


def _pages_xref(doc: pymupdf.Document) -> int:
    return int(doc.xref_get_key(doc.pdf_catalog(), "Pages")[1].split()[0])


def pdf_lying_count(pages: int = 3, claimed: int = 5) -> bytes:
    """A PDF whose page tree's /Count claims more pages than its /Kids hold."""
    doc = pymupdf.open(stream=pdf_bytes(pages), filetype="pdf")
    doc.xref_set_key(_pages_xref(doc), "Count", str(claimed))
    return doc.tobytes()


def pdf_broken_page_reference(pages: int = 3, index: int = 1) -> bytes:
    """A PDF whose page tree points, for page `index`, to an object number the file does not have."""
    doc = pymupdf.open(stream=pdf_bytes(pages), filetype="pdf")
    kids = [doc[i].xref for i in range(pages)]
    kids[index] = doc.xref_length() + 100
    doc.xref_set_key(_pages_xref(doc), "Kids", "[" + " ".join(f"{k} 0 R" for k in kids) + "]")
    return doc.tobytes()


def pdf_null_page_object(pages: int = 3, index: int = 1) -> bytes:
    """A PDF whose page `index` object is gone (null): MuPDF renders a blank Letter page in its place."""
    doc = pymupdf.open(stream=pdf_bytes(pages), filetype="pdf")
    doc.update_object(doc[index].xref, "null")
    return doc.tobytes()


def pdf_missing_content_stream(pages: int = 3, index: int = 1) -> bytes:
    """A PDF whose page `index` names a content stream object the file does not have."""
    doc = pymupdf.open(stream=pdf_bytes(pages), filetype="pdf")
    doc.xref_set_key(doc[index].xref, "Contents", f"{doc.xref_length() + 50} 0 R")
    return doc.tobytes()


def video_with_display(degrees: int, hflip: bool, vflip: bool, size: tuple[int, int] = (64, 32),
                       frames: int = 10) -> tuple[bytes, np.ndarray]:
    """A lossless H.264 MP4 whose container display matrix rotates `degrees` counter-clockwise, then
    mirrors (PyAV's set_display_rotation), and the coded picture (red top-left, blue bottom-right)."""
    w, h = size
    coded = np.zeros((h, w, 3), np.uint8)
    coded[: h // 2, : w // 2] = (255, 0, 0)
    coded[h // 2:, 3 * w // 4:] = (0, 0, 255)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=10, options={"qp": "0"})
        s.width, s.height, s.pix_fmt = w, h, "yuv444p"
        s.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for _ in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(coded, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue(), coded


def long_video(hours: float = 10.0, every_s: int = 600, size: tuple[int, int] = (32, 24)) -> bytes:
    """A tiny MP4 that lasts `hours` (one frame every `every_s` seconds): its header says how long."""
    from fractions import Fraction

    buf = io.BytesIO()
    w, h = size
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=Fraction(1, every_s))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.time_base = Fraction(every_s, 1)  # one tick per frame interval
        n = int(hours * 3600 / every_s)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), i % 256, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(every_s, 1)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels and holds no image data (a pixel bomb's header)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")

"""What a file is, decided by asking the decoders that will read it: Pillow, MuPDF, FFmpeg (PyAV).

A hand-kept list of magic bytes knew 8 image signatures; Pillow alone identifies 40-odd formats
(JPEG 2000, PSD, TGA, QOI, ...) and FFmpeg hundreds of containers. So a file is what the first
decoder that claims it says it is, in this order:

When the magic bytes of `sniff.py` say video, FFmpeg is asked before Pillow (some image formats,
such as TGA, have no signature, and Pillow's guess must not win over a container's signature).

1. `%PDF-` in the first 1 KB (MuPDF's own rule for PDFs; the cheap, common case): "pdf".
2. Pillow's `Image.open` (its plugins' own identification; lazy: reads the header only) for a format
   Pillow can also decode here (stubs such as HDF5/GRIB, EPS without Ghostscript and MPEG, which
   Pillow identifies but cannot decode, are left to the others): "image".
3. MuPDF opening the file as a document of at least one page (XPS, EPUB, FB2, CBZ, MOBI, SVG;
   opening parses the document's structure only, no page is rendered): "document".
4. FFmpeg probing at most PROBE_BYTES bytes and PROBE_SECONDS of stream: a video stream that is not an
   attached picture (cover art) makes "video"; audio streams alone (an MP3/M4A with or without a
   cover) make "audio".
5. When every decoder refuses, the magic bytes of `sniff.py` still route a damaged file of a known
   kind to its decoder, which then says what is wrong with it (e.g. `video_decode_failed`).
   Otherwise "unknown".

Identification reads the bytes already in memory (the read is bounded by limits.max_bytes).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from pipeline.media.sniff import SNIFF_BYTES, sniff

PROBE_BYTES = 4 * 2**20
"""Most bytes FFmpeg reads to find a file's streams (its `probesize`)."""
PROBE_SECONDS = 5.0
"""Most seconds of stream FFmpeg analyses to find a file's streams (its `analyzeduration`)."""

_PDF_WINDOW = 1024
# MuPDF document types we expand as pages; "Image" and "PDF" are taken by Pillow and the PDF check.
# ("zip" is how MuPDF names a CBZ: a zip of page images.)
_DOCUMENT_FORMATS = ("XPS", "OpenXPS", "EPUB", "FB2", "CBZ", "zip", "MOBI", "SVG")


@dataclass(frozen=True)
class Identity:
    """A file's media type ("pdf", "image", "document", "video", "audio", "unknown") and its format
    as the decoder that claimed it names it (e.g. "JPEG2000", "XPS", "mov,mp4,m4a,3gp,3g2,mj2")."""

    media_type: str
    format: str | None = None


def identify(data: bytes) -> Identity:
    """The media type of a file's content (see the module docstring for the order of decoders)."""
    if not data:
        return Identity("unknown")
    if b"%PDF-" in data[:_PDF_WINDOW]:
        return Identity("pdf", "PDF")
    kind = sniff(data[:SNIFF_BYTES])
    # Formats without a signature (TGA) let Pillow claim bytes that carry a container's signature:
    # when the magic bytes say video, FFmpeg is asked first.
    probes = (_ffmpeg, _pillow, _mupdf) if kind == "video" else (_pillow, _mupdf, _ffmpeg)
    for probe in probes:
        found = probe(data)
        if found is not None:
            return found
    return Identity(kind)


def _pillow(data: bytes) -> Identity | None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return Identity("image")  # an image, too large: expand_image says so with the limit
    except Exception:  # noqa: BLE001 - any refusal means "not a format Pillow reads"
        return None
    with im:
        return Identity("image", im.format) if pillow_decodes(im.format, type(im)) else None


def pillow_decodes(fmt: str | None, cls: type) -> bool:
    """Whether Pillow can decode (not only identify) format `fmt`, whose plugin class (or factory
    function, as for JPEG) is `cls`."""
    from PIL import EpsImagePlugin, ImageFile

    if isinstance(cls, type) and issubclass(cls, ImageFile.StubImageFile):
        return False  # HDF5, GRIB, BUFR, WMF off Windows: identification only, no decoder
    if fmt == "EPS":
        return bool(EpsImagePlugin.has_ghostscript())
    return fmt not in ("MPEG",)  # Pillow reads an MPEG header only; FFmpeg decodes MPEG


def _mupdf(data: bytes) -> Identity | None:
    import pymupdf

    try:
        doc = pymupdf.open(stream=data)
    except Exception:  # noqa: BLE001 - MuPDF refuses what it does not know
        return None
    with doc:
        fmt = (doc.metadata or {}).get("format") or ""
        if doc.is_pdf:
            return Identity("pdf", "PDF")
        if fmt.split(" ")[0] in _DOCUMENT_FORMATS and doc.page_count > 0:
            return Identity("document", fmt)
    return None


def _ffmpeg(data: bytes) -> Identity | None:
    import av

    options = {"probesize": str(PROBE_BYTES), "analyzeduration": str(int(PROBE_SECONDS * 1e6))}
    try:
        container = av.open(io.BytesIO(data), mode="r", options=options)
    except Exception:  # noqa: BLE001 - FFmpeg finds no demuxer for it
        return None
    with container:
        name = container.format.name
        if any(not is_attached_picture(s) for s in container.streams.video):
            return Identity("video", name)
        if container.streams.audio:
            return Identity("audio", name)
    return None


def is_attached_picture(stream: object) -> bool:
    """Whether a video stream is an attached picture (cover art of an audio file), not video."""
    import av

    disposition = getattr(stream, "disposition", None)
    try:
        return bool(disposition is not None and disposition & av.stream.Disposition.attached_pic)
    except TypeError:
        return False

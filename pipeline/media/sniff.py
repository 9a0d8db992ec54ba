"""Tell PDFs, images and videos apart from their leading bytes, never from the file name.

A file's extension lies often enough (a text file saved as `.jpg`, a PDF served as
`application/octet-stream`) that routing on it turns into crashes deep in a decoder. Files are
identified by the decoders themselves (`identify.py`); these magic bytes are its hints and its
fallback: a damaged file that no decoder opens but whose signature names a kind still goes to that
kind's decoder, which then says what is wrong with it.
"""

from __future__ import annotations

SNIFF_BYTES = 4096
"""How many leading bytes callers should read and hand to `sniff`."""

# The PDF spec allows junk before the header; readers (and MuPDF) look within the first 1 KB.
_PDF_WINDOW = 1024

# ISO base media (MP4/MOV/3GP/M4V) major brands that are video; image brands (HEIC/AVIF) are not.
_IMAGE_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}

_IMAGE_MAGICS: tuple[bytes, ...] = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG (SOI + first marker)
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"II+\x00",  # BigTIFF little-endian
    b"MM\x00+",  # BigTIFF big-endian
)

_VIDEO_MAGICS: tuple[bytes, ...] = (
    b"\x1a\x45\xdf\xa3",  # EBML: WebM / Matroska
    b"FLV\x01",
    b"\x00\x00\x01\xba",  # MPEG program stream
    b"\x30\x26\xb2\x75\x8e\x66\xcf\x11",  # ASF / WMV
)


def sniff(head: bytes) -> str:
    """Return "pdf", "image", "video" or "unknown" for the first bytes of a file (read SNIFF_BYTES)."""
    if not head:
        return "unknown"
    if b"%PDF-" in head[:_PDF_WINDOW]:
        return "pdf"
    if head.startswith(_IMAGE_MAGICS) or _is_bmp(head):
        return "image"
    if head[:4] == b"RIFF" and len(head) >= 12:
        return _riff_kind(head[8:12])
    iso = _iso_bmff_kind(head)
    if iso:
        return iso
    if head.startswith(_VIDEO_MAGICS) or _is_mpeg_ts(head):
        return "video"
    return "unknown"


def _is_bmp(head: bytes) -> bool:
    # "BM" alone matches plenty of text; also require the DIB header size to be a known value.
    if len(head) < 18 or head[:2] != b"BM":
        return False
    dib_size = int.from_bytes(head[14:18], "little")
    return dib_size in (12, 40, 52, 56, 64, 108, 124)


def _riff_kind(form: bytes) -> str:
    if form == b"WEBP":
        return "image"
    if form in (b"AVI ", b"AVIX"):
        return "video"
    return "unknown"  # WAV and other RIFF forms are not ours


def _iso_bmff_kind(head: bytes) -> str | None:
    """MP4/MOV: an `ftyp` box first (size, "ftyp", major brand); older QuickTime may start with moov/mdat."""
    if len(head) < 12:
        return None
    box = head[4:8]
    if box == b"ftyp":
        brand = head[8:12]
        compatible = {head[i : i + 4] for i in range(16, min(len(head), int.from_bytes(head[:4], "big")), 4)}
        if brand in _IMAGE_BRANDS and not compatible & {b"isom", b"mp41", b"mp42", b"qt  "}:
            return "image"  # HEIC/AVIF stills; Pillow decodes them only with plugins, but they are not video
        return "video"
    if box in (b"moov", b"mdat", b"wide", b"free", b"skip") and int.from_bytes(head[:4], "big") >= 8:
        return "video"  # pre-ftyp QuickTime files
    return None


def _is_mpeg_ts(head: bytes) -> bool:
    # Transport streams are 188-byte packets, each starting with sync byte 0x47; require several in a row.
    packets = min(len(head) // 188, 5)
    return packets >= 3 and all(head[i * 188] == 0x47 for i in range(packets))

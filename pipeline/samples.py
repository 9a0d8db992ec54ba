"""Small demo and fault corpora, generated offline and deterministically in about a second.

`make_demo_corpus` writes one file of each kind the pipeline handles (born-digital PDF with a table,
scanned PDF without a text layer, a JPEG needing EXIF rotation, an RGBA PNG, an H.264 clip).
`make_bad_corpus` writes the broken inputs every stage must turn into error rows, not crashes.
Every file is well under 300 KB. Same calls, same bytes (no timestamps, seeded noise, single-threaded x264).
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pymupdf
from PIL import Image, ImageDraw, ImageFilter

LETTER = (612, 792)  # points
_SEED = 20240611

_PARAGRAPHS = [
    "This quarterly report summarises the throughput of the batch document pipeline. Pages are rendered "
    "at a resolution chosen from the model's pixel budget, then transcribed page by page.",
    "Costs fell as rendering moved to CPU actors that stream into the inference pool, so the accelerator "
    "no longer waits for the next batch. The table below lists the measured figures per quarter.",
]
_TABLE = [
    ["Quarter", "Pages", "Errors", "Pages/s"],
    ["Q1", "120,400", "312", "41.5"],
    ["Q2", "198,750", "201", "57.2"],
    ["Q3", "264,010", "95", "63.8"],
]
_SCAN_LINES = [
    "MEMORANDUM",
    "",
    "To: Records department",
    "Re: Archive digitisation, batch 7",
    "",
    "The boxes from the north storage room were scanned",
    "on Tuesday. Forty-two folders contained handwritten",
    "notes; these were set aside for manual review.",
    "",
    "Please confirm receipt of the index sheets.",
]


def make_demo_corpus(out_dir: str | Path) -> list[Path]:
    """Write report.pdf, scan.pdf, photo.jpg, logo.png and clip.mp4 into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "report.pdf": report_pdf_bytes(),
        "scan.pdf": scan_pdf_bytes(),
        "photo.jpg": photo_jpeg_bytes(),
        "logo.png": logo_png_bytes(),
        "clip.mp4": clip_mp4_bytes(),
    }
    return [_write(out / name, data) for name, data in files.items()]


#: The demo corpus's catalogue: join keys and attributes a data lake would hold for each file
#: (`write_demo_manifest`; jobs/annotate.yaml copies item_id and collection into every row).
DEMO_CATALOGUE = {
    "report.pdf": (1001, "reports"), "scan.pdf": (1002, "archive"), "photo.jpg": (1003, "photos"),
    "logo.png": (1004, "brand"), "clip.mp4": (1005, "video"),
}


def write_demo_manifest(corpus_dir: str | Path, path: str | Path) -> Path:
    """Write a Parquet manifest of the demo corpus at `path`: columns uri (absolute path), item_id
    (int64), collection (string), acquired (date32) — the pass-through columns of jobs/annotate.yaml."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = Path(corpus_dir).resolve()
    names = sorted(DEMO_CATALOGUE)
    table = pa.table({
        "uri": [str(corpus / n) for n in names],
        "item_id": pa.array([DEMO_CATALOGUE[n][0] for n in names], pa.int64()),
        "collection": [DEMO_CATALOGUE[n][1] for n in names],
        "acquired": pa.array([datetime.date(2026, 1, 1 + i) for i in range(len(names))], pa.date32()),
    })
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out


def make_bad_corpus(out_dir: str | Path) -> list[Path]:
    """Write empty.pdf, truncated.pdf, notes.jpg (text) and broken.mp4 into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    whole = multipage_pdf_bytes(8)
    files = {
        "empty.pdf": b"",
        "truncated.pdf": whole[: len(whole) // 2],  # opens *repaired*, later pages silently blank
        "notes.jpg": b"Meeting notes\n- this is plain text saved with a .jpg name\n",
        "broken.mp4": broken_mp4_bytes(),
    }
    return [_write(out / name, data) for name, data in files.items()]


def _write(path: Path, data: bytes) -> Path:
    # A file that already holds these bytes is left alone: rewriting it would change its mtime, so
    # its source_id (URI + size + mtime on local disks), and a second `make demo` would redo
    # everything instead of showing the resume.
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return path
    path.write_bytes(data)
    return path


def _pdf_bytes(doc: pymupdf.Document) -> bytes:
    # Fixed metadata and no fresh /ID keep the bytes identical from run to run.
    doc.set_metadata({"producer": "cpmv-batch samples", "creator": "cpmv-batch samples"})
    data = doc.tobytes(garbage=3, deflate=True, no_new_id=True)
    doc.close()
    return data


def report_pdf_bytes() -> bytes:
    """A born-digital two-page report: heading, paragraphs and a ruled table (text layer on every page)."""
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    page.insert_text((72, 90), "Pipeline Report 2024", fontsize=24, fontname="hebo")
    y = 130.0
    for para in _PARAGRAPHS:
        box = pymupdf.Rect(72, y, LETTER[0] - 72, y + 80)
        page.insert_textbox(box, para, fontsize=11, fontname="helv")
        y += 90
    _draw_table(page, pymupdf.Point(72, y + 10), _TABLE)
    page2 = doc.new_page(width=LETTER[0], height=LETTER[1])
    page2.insert_text((72, 90), "Appendix: Method", fontsize=18, fontname="hebo")
    page2.insert_textbox(
        pymupdf.Rect(72, 110, LETTER[0] - 72, 300),
        "Throughput is measured end to end, from listing the bucket to the last committed Parquet file. "
        "Errors count pages that produced an error row after retries.",
        fontsize=11, fontname="helv",
    )
    return _pdf_bytes(doc)


def _draw_table(page: pymupdf.Page, origin: pymupdf.Point, rows: list[list[str]]) -> None:
    """A grid of ruled cells with text: what table extraction is meant to recover."""
    col_w, row_h = 110.0, 22.0
    for r, row in enumerate(rows):
        for c, text in enumerate(row):
            cell = pymupdf.Rect(
                origin.x + c * col_w, origin.y + r * row_h, origin.x + (c + 1) * col_w, origin.y + (r + 1) * row_h
            )
            fill = (0.85, 0.88, 0.95) if r == 0 else None
            page.draw_rect(cell, color=(0, 0, 0), fill=fill, width=0.8)
            page.insert_text(
                (cell.x0 + 6, cell.y1 - 7), text, fontsize=10, fontname="hebo" if r == 0 else "helv"
            )


def multipage_pdf_bytes(n_pages: int) -> bytes:
    """A plain text PDF of `n_pages` pages, each saying its number (for truncation and page-limit cases)."""
    doc = pymupdf.open()
    for i in range(n_pages):
        page = doc.new_page(width=LETTER[0], height=LETTER[1])
        page.insert_text((72, 90), f"Page {i + 1}", fontsize=28, fontname="hebo")
        page.insert_textbox(pymupdf.Rect(72, 120, 540, 700), (f"Body text of page {i + 1}. " * 40), fontsize=11)
    return _pdf_bytes(doc)


def scan_pdf_bytes() -> bytes:
    """A page that looks scanned: text as pixels, slightly rotated, noisy, JPEG-embedded, no text layer."""
    dpi = 100
    width, height = LETTER[0] * dpi // 72, LETTER[1] * dpi // 72
    text_img = _render_text_lines(_SCAN_LINES, width, height, dpi)
    rng = np.random.default_rng(_SEED)
    skewed = text_img.rotate(1.2, resample=Image.BICUBIC, fillcolor=245).filter(ImageFilter.GaussianBlur(0.6))
    arr = np.asarray(skewed, dtype=np.float32) + rng.normal(0, 9, (height, width))
    scan = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    scan.save(buf, format="JPEG", quality=55)
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    page.insert_image(page.rect, stream=buf.getvalue())
    return _pdf_bytes(doc)


def _render_text_lines(lines: list[str], width: int, height: int, dpi: int) -> Image.Image:
    """Typeset lines with MuPDF (real font, no font files needed) and hand back a greyscale bitmap."""
    doc = pymupdf.open()
    page = doc.new_page(width=LETTER[0], height=LETTER[1])
    for i, line in enumerate(lines):
        page.insert_text((80, 110 + i * 24), line, fontsize=16 if i else 22, fontname="tiro")
    pix = page.get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY, alpha=False)
    img = Image.frombytes("L", (pix.width, pix.height), pix.samples)
    doc.close()
    return img.resize((width, height)) if img.size != (width, height) else img


def photo_array(width: int = 640, height: int = 480) -> np.ndarray:
    """A photo-like picture: sky-to-ground gradient, sun, hills and a red marker in the top-left corner.

    The marker makes orientation testable: stored top-left, displayed top-right after EXIF orientation 6.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 80 * y / height, 150 + 60 * y / height, 235 - 40 * y / height], axis=-1)
    img = sky.copy()
    hill = y > height * (0.62 + 0.08 * np.sin(x / width * 2 * np.pi))
    img[hill] = np.stack([40 + 30 * x / width, 120 + 40 * y / height, 50 + 0 * x], axis=-1)[hill]
    sun = (x - width * 0.72) ** 2 + (y - height * 0.25) ** 2 < (height * 0.09) ** 2
    img[sun] = (250, 225, 90)
    img[: height // 8, : width // 8] = (220, 20, 20)
    return np.clip(img, 0, 255).astype(np.uint8)


def photo_jpeg_bytes(orientation: int = 6) -> bytes:
    """The photo as a JPEG whose EXIF Orientation says it must be rotated 90 degrees clockwise to display."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "cpmv-batch"  # Make
    buf = io.BytesIO()
    Image.fromarray(photo_array()).save(buf, format="JPEG", quality=85, exif=exif.tobytes())
    return buf.getvalue()


def logo_png_bytes(size: int = 256) -> bytes:
    """An RGBA logo: a blue ring and a half-transparent orange disc on a fully transparent background."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.ellipse((16, 16, size - 16, size - 16), outline=(30, 60, 200, 255), width=18)
    draw.ellipse((size // 3, size // 3, 2 * size // 3, 2 * size // 3), fill=(250, 140, 20, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def clip_mp4_bytes(seconds: float = 4.0, fps: int = 25, size: tuple[int, int] = (320, 240)) -> bytes:
    """An H.264/yuv420p MP4 with a square and a disc moving across a gradient background."""
    return video_bytes(seconds, fps, size)


def video_bytes(
    seconds: float = 4.0,
    fps: int = 25,
    size: tuple[int, int] = (320, 240),
    container_format: str = "mp4",
    codec: str = "libx264",
    rotation: int | None = None,
    seekable: bool = True,
) -> bytes:
    """The demo clip in any container/codec PyAV can write (mp4, mov, matroska, webm, avi, mpegts).

    `rotation` (counter-clockwise degrees) stores a display matrix, as phones do for portrait video.
    `seekable=False` writes as to a pipe: Matroska/WebM then carry no duration (live recordings look so).
    """
    width, height = size
    buf: io.BytesIO | _WriteOnly = io.BytesIO() if seekable else _WriteOnly()
    # threads=1 and the bitexact flags (no version strings): the same bytes every run.
    with av.open(buf, mode="w", format=container_format, options={"fflags": "+bitexact"}) as container:
        options = {"threads": "1", "g": str(fps), "flags": "+bitexact"}
        if codec == "libx264":
            # asm=0: with x264's assembly, the first I-frame's right-most macroblocks came out different
            # in about 1 clip in 30 while other processes loaded the CPU (same SEI, same input frames:
            # checked); with plain C, 0 of 150. The demo clip is tiny, so the slower encode costs ~1 s.
            options.update(crf="32", preset="veryfast", **{"x264-params": "asm=0"})
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(int(seconds * fps)):
            rgb = av.VideoFrame.from_ndarray(_clip_frame(i, fps, width, height), format="rgb24")
            # Convert here, single-threaded, rather than letting the encoder path pick swscale threads.
            frame = rgb.reformat(format="yuv420p", threads=1)
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


class _WriteOnly:
    """A file object without seek/tell, so muxers cannot go back to fill in durations and indexes."""

    def __init__(self) -> None:
        self._data = bytearray()

    def write(self, data: bytes) -> int:
        self._data += data
        return len(data)

    def getvalue(self) -> bytes:
        return bytes(self._data)


def _clip_frame(i: int, fps: int, width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = (x * 120 // width).astype(np.uint8)
    frame[..., 1] = 60
    frame[..., 2] = (80 + y * 120 // height).astype(np.uint8)
    t = i / fps
    sx = int((width - 60) * (t / 4.0)) % (width - 60)
    frame[40:100, sx : sx + 60] = (255, 255, 255)
    cx, cy = width // 2 + int(80 * np.cos(t * 2)), height * 2 // 3 + int(30 * np.sin(t * 2))
    frame[(x - cx) ** 2 + (y - cy) ** 2 < 400] = (250, 200, 30)
    return frame


def broken_mp4_bytes() -> bytes:
    """A real ftyp header followed by seeded random bytes: sniffs as video, no moov atom, cannot open."""
    head = clip_mp4_bytes(seconds=1.0)[:32]
    ftyp_len = int.from_bytes(head[:4], "big")
    rng = np.random.default_rng(_SEED)
    return head[:ftyp_len] + rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes()

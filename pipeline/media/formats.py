"""The formats this installation reads, asked of the decoders themselves (never a hand-kept list).

`python -m pipeline.media.formats` prints the README's "Supported formats" block; a test checks that
the README holds exactly what the installed Pillow, MuPDF and FFmpeg say (tests/unit/test_identify.py).
"""

from __future__ import annotations

import sys

BEGIN, END = "<!-- supported-formats:begin -->", "<!-- supported-formats:end -->"


def image_formats() -> list[str]:
    """Pillow formats that Pillow can both identify and decode here (see identify.pillow_decodes)."""
    from PIL import Image

    from pipeline.media.identify import pillow_decodes

    Image.init()
    return sorted(fmt for fmt, (cls, _accept) in Image.OPEN.items() if pillow_decodes(fmt, cls))


def document_formats() -> list[str]:
    """Document types expanded page by page through MuPDF: PDF, and those identify.py accepts."""
    from pipeline.media.identify import _DOCUMENT_FORMATS

    return ["PDF", *(f for f in _DOCUMENT_FORMATS if f != "zip")]  # "zip": MuPDF's name for a CBZ


def video_formats() -> list[str]:
    """Every container FFmpeg (PyAV's build) can demux; a file is taken as video when it has a video
    stream that is not an attached picture."""
    import av

    names = set()
    for name in av.formats_available:
        try:
            fmt = av.ContainerFormat(name, "r")
        except (ValueError, av.FFmpegError):
            continue  # a muxer only
        names.add(fmt.name)
    return sorted(names)


def markdown() -> str:
    """The README block, markers included."""
    import av
    import PIL
    import pymupdf

    images, videos = image_formats(), video_formats()
    return "\n".join([
        BEGIN,
        f"- Images ({len(images)}; Pillow {PIL.__version__}): {', '.join(images)}.",
        f"- Documents (MuPDF {pymupdf.mupdf_version}, page by page): {', '.join(document_formats())}.",
        f"- Video ({len(videos)} FFmpeg demuxers; PyAV {av.__version__}): {', '.join(videos)}.",
        END,
    ])


if __name__ == "__main__":
    sys.stdout.write(markdown() + "\n")

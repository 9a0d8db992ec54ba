"""Files are identified by the decoders that read them (Pillow, MuPDF, FFmpeg), not a magic-byte list.

Inputs are made here (tests/hostile.py); each goes through `identify` and through `cpmv inspect`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline import samples
from pipeline.cli import main
from pipeline.media import formats
from pipeline.media.identify import identify
from tests import hostile

README = Path(__file__).resolve().parents[2] / "README.md"

# Every format Pillow both writes and decodes here, that the old magic-byte list did not know.
PILLOW_WRITABLE = [("JPEG2000", "RGB"), ("TGA", "RGB"), ("QOI", "RGB"), ("PCX", "RGB"), ("SGI", "RGB"),
                   ("ICO", "RGB"), ("DDS", "RGB"), ("PPM", "RGB"), ("XBM", "1"), ("IM", "RGB"), ("MSP", "1"),
                   ("SPIDER", "L"), ("AVIF", "RGB"), ("DIB", "RGB"), ("PNG", "RGB"), ("WEBP", "RGB")]


def inspect(capsys, path: Path) -> list[dict]:
    assert main(["inspect", str(path)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.mark.parametrize("fmt, mode", PILLOW_WRITABLE)
def test_every_format_pillow_decodes_is_an_image(fmt: str, mode: str) -> None:
    found = identify(hostile.pil_bytes(fmt, mode=mode))
    assert found.media_type == "image" and found.format == fmt


def test_psd_and_jpeg2000_expand_as_images(tmp_path: Path, capsys) -> None:
    (tmp_path / "layers.psd").write_bytes(hostile.psd_bytes((24, 16)))
    (tmp_path / "scan.jp2").write_bytes(hostile.pil_bytes("JPEG2000", (40, 30)))
    assert hostile.pil_bytes("JPEG2000")[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # the box the issue names
    rows = {Path(r["source_uri"]).name: r for r in inspect(capsys, tmp_path)}
    assert rows["layers.psd"]["error_type"] is None and rows["layers.psd"]["media_type"] == "image"
    assert rows["scan.jp2"]["error_type"] is None and rows["scan.jp2"]["unit_kind"] == "image"


def test_documents_mupdf_opens_expand_page_by_page(tmp_path: Path, capsys) -> None:
    (tmp_path / "comic.cbz").write_bytes(hostile.cbz_bytes(2))
    (tmp_path / "drawing.svg").write_bytes(
        b"<svg xmlns='http://www.w3.org/2000/svg' width='200' height='100'><rect width='50' height='50'/></svg>")
    assert identify((tmp_path / "comic.cbz").read_bytes()).media_type == "document"
    rows = inspect(capsys, tmp_path)
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(Path(r["source_uri"]).name, []).append(r)
    assert [(r["unit_kind"], r["unit_index"], r["error_type"]) for r in by_name["comic.cbz"]] == [
        ("page", 0, None), ("page", 1, None)]
    assert [(r["media_type"], r["error_type"]) for r in by_name["drawing.svg"]] == [("document", None)]


@pytest.mark.parametrize("container, codec", [("mp4", "libx264"), ("matroska", "libx264"), ("avi", "mpeg4"),
                                              ("mpegts", "libx264"), ("webm", "libvpx")])
def test_videos_are_identified_by_ffmpeg(container: str, codec: str) -> None:
    assert identify(samples.video_bytes(0.4, 10, (32, 24), container, codec)).media_type == "video"


def test_text_and_damaged_files(tmp_path: Path) -> None:
    assert identify(b"just some notes\n" * 20).media_type == "unknown"
    assert identify(b"").media_type == "unknown"
    bad = {p.name: p.read_bytes() for p in samples.make_bad_corpus(tmp_path)}
    assert identify(bad["notes.jpg"]).media_type == "unknown"  # text named .jpg
    # A damaged file of a known kind still goes to its decoder, which says what is wrong with it.
    assert identify(bad["broken.mp4"]).media_type == "video"
    assert identify(bad["truncated.pdf"]).media_type == "pdf"


@pytest.mark.parametrize("fmt, codec", [("mp3", "libmp3lame"), ("mp4", "aac")])
def test_audio_with_cover_art_is_one_no_video_stream_row(tmp_path: Path, capsys, fmt: str, codec: str) -> None:
    data = hostile.audio_with_cover(fmt, codec, seconds=3.0)
    path = tmp_path / f"podcast.{'m4a' if fmt == 'mp4' else fmt}"
    path.write_bytes(data)
    assert identify(data).media_type == "audio"
    rows = inspect(capsys, path)
    assert [(r["unit_index"], r["error_type"]) for r in rows] == [(-1, "no_video_stream")]
    assert rows[0]["error_message"].startswith("the file has no video stream: audio only")


def test_cover_art_is_not_taken_for_video_by_the_video_expander() -> None:
    from pipeline.config import LimitsConfig, VideoConfig
    from pipeline.media.base import MediaError
    from pipeline.media.video import expand_video

    with pytest.raises(MediaError) as err:
        list(expand_video(hostile.audio_with_cover("mp4", "aac"), VideoConfig(), LimitsConfig()))
    assert err.value.error_type == "no_video_stream" and "cover picture is not video" in err.value.message


def test_readme_lists_exactly_the_formats_the_decoders_read() -> None:
    text = README.read_text()
    block = text[text.index(formats.BEGIN):text.index(formats.END) + len(formats.END)]
    assert block == formats.markdown(), (
        "README's supported formats differ from the installed decoders: replace the block between the "
        "supported-formats markers with the output of `python -m pipeline.media.formats`")
    for fmt in ("JPEG2000", "PSD", "TIFF", "PNG"):
        assert re.search(rf"\b{fmt}\b", block)

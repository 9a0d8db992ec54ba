"""The demo corpus: deterministic, small, and each file what its name says."""

from pipeline.media.sniff import sniff
from pipeline.samples import make_bad_corpus, make_demo_corpus


def test_demo_corpus_is_small_deterministic_and_sniffable(tmp_path):
    a = make_demo_corpus(tmp_path / "a")
    b = make_demo_corpus(tmp_path / "b")
    assert [p.name for p in a] == ["report.pdf", "scan.pdf", "photo.jpg", "logo.png", "clip.mp4"]
    for pa_, pb in zip(a, b):
        assert pa_.read_bytes() == pb.read_bytes(), pa_.name
        assert 0 < pa_.stat().st_size < 300_000
    kinds = {p.name: sniff(p.read_bytes()[:4096]) for p in a}
    assert kinds == {"report.pdf": "pdf", "scan.pdf": "pdf", "photo.jpg": "image", "logo.png": "image",
                     "clip.mp4": "video"}


def test_bad_corpus(tmp_path):
    files = {p.name: p.read_bytes() for p in make_bad_corpus(tmp_path)}
    assert files["empty.pdf"] == b"" and sniff(files["notes.jpg"]) == "unknown"
    assert sniff(files["truncated.pdf"]) == "pdf" and sniff(files["broken.mp4"]) == "video"


def test_demo_files_are_what_they_claim(tmp_path):
    import io

    import av
    import pymupdf
    from PIL import Image

    files = {p.name: p.read_bytes() for p in make_demo_corpus(tmp_path)}
    report = pymupdf.open(stream=files["report.pdf"], filetype="pdf")
    assert report.page_count == 2 and "Quarter" in report[0].get_text()
    cells = [d for d in report[0].get_drawings() if d["items"] and d["items"][0][0] == "re"]
    assert len(cells) == 16  # the table is 4x4 ruled cells, not text laid out with spaces
    scan = pymupdf.open(stream=files["scan.pdf"], filetype="pdf")
    assert scan.page_count == 1 and scan[0].get_text().strip() == "" and len(scan[0].get_images()) == 1
    photo = Image.open(io.BytesIO(files["photo.jpg"]))
    assert photo.format == "JPEG" and photo.getexif().get(0x0112) == 6
    logo = Image.open(io.BytesIO(files["logo.png"]))
    assert logo.mode == "RGBA" and logo.getextrema()[3][0] == 0  # some pixels fully transparent
    with av.open(io.BytesIO(files["clip.mp4"])) as clip:
        stream = clip.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (320, 240)
        assert float(stream.duration * stream.time_base) == 4.0


def test_bad_files_fail_the_way_they_should(tmp_path):
    import io

    import av
    import pymupdf
    import pytest

    files = {p.name: p.read_bytes() for p in make_bad_corpus(tmp_path)}
    truncated = pymupdf.open(stream=files["truncated.pdf"], filetype="pdf")
    assert truncated.is_repaired and truncated.page_count > 1
    with pytest.raises(av.FFmpegError):
        av.open(io.BytesIO(files["broken.mp4"]))
    assert all(len(data) < 300_000 for data in files.values())


def test_second_corpus_write_keeps_files_and_source_ids(tmp_path):
    """`make demo` twice: the corpus files are not rewritten, so their source ids (size + mtime on a
    local disk) stay and the second run resumes instead of redoing everything."""
    import os

    from pipeline.config import InputConfig, StorageConfig
    from pipeline.sources import discover

    first = make_demo_corpus(tmp_path)
    past = 1_000_000_000
    for p in first:
        os.utime(p, (past, past))
    ids = {s.uri: s.source_id for s in discover(InputConfig(uris=[str(tmp_path)]), StorageConfig())}
    make_demo_corpus(tmp_path)
    assert all(p.stat().st_mtime == past for p in first)
    again = {s.uri: s.source_id for s in discover(InputConfig(uris=[str(tmp_path)]), StorageConfig())}
    assert again == ids
    first[0].write_bytes(b"changed")  # a file that differs is rewritten
    make_demo_corpus(tmp_path)
    assert first[0].read_bytes() != b"changed"

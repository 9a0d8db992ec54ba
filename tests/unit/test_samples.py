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

"""`cpmv inspect`: one JSON line per unit, through the real expand path, without a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.media.slicing import plan_image, plan_video
from pipeline.samples import make_bad_corpus, make_demo_corpus

KEYS = {"source_uri", "unit_index", "unit_kind", "media_type", "width", "height", "slice_grid", "visual_tokens",
        "placeholder_tokens", "text_layer_chars", "tiles", "frames", "error_type", "error_message"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_corpus(out)
    return out


def run_inspect(capsys, *argv: str) -> tuple[int, list[dict], str]:
    rc = main(["inspect", *argv])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines() if line.strip()]
    return rc, lines, captured.err


def by_file(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(Path(r["source_uri"]).name, []).append(r)
    return out


def test_demo_corpus_default_job(capsys, corpus):
    rc, records, _ = run_inspect(capsys, str(corpus))
    assert rc == 0
    for r in records:
        assert KEYS <= r.keys(), KEYS - r.keys()
        assert r["error_type"] is None, r
        assert r["tiles"] == 1
    files = by_file(records)
    assert sorted(files) == ["clip.mp4", "logo.png", "photo.jpg", "report.pdf", "scan.pdf"]

    pages = files["report.pdf"]  # a two-page PDF: two lines, pages 0 and 1
    assert [p["unit_index"] for p in pages] == [0, 1]
    assert all(p["unit_kind"] == "page" and p["media_type"] == "pdf" for p in pages)
    assert pages[0]["text_layer_chars"] > 0  # born-digital
    assert files["scan.pdf"][0]["text_layer_chars"] == 0  # scanned: no text layer

    for r in records:
        if r["unit_kind"] == "clip":
            continue
        # The estimate is the slicer's plan for exactly the size the preprocess stage ships.
        plan = plan_image("minicpmv4_6", r["width"], r["height"])
        assert r["visual_tokens"] == plan.visual_tokens
        assert r["placeholder_tokens"] == plan.placeholder_tokens
        assert r["slice_grid"] == (None if plan.grid is None else list(plan.grid))
        assert r["frames"] == 1

    (clip,) = files["clip.mp4"]
    assert clip["unit_kind"] == "clip" and clip["media_type"] == "video"
    assert clip["frames"] > 1
    assert clip["visual_tokens"] == plan_video("minicpmv4_6", clip["width"], clip["height"], clip["frames"]).visual_tokens
    assert clip["slice_grid"] is None  # video frames are not sliced (1 slice per frame)
    assert clip["start_s"] == 0.0 and clip["end_s"] > 0


def test_pages_use_the_pixel_budget(capsys, corpus):
    """A Letter page renders to about the model's pixel budget (36 slices of 448x448 by default)."""
    _, default, _ = run_inspect(capsys, str(corpus / "report.pdf"))
    _, nine, _ = run_inspect(capsys, str(corpus / "report.pdf"), "--set", "model.max_slice_nums=9")
    big, small = default[0], nine[0]
    assert 0.5 * 36 * 448**2 <= big["width"] * big["height"] <= 36 * 448**2 * 1.05
    assert small["width"] * small["height"] <= 9 * 448**2 * 1.05
    cols, rows = small["slice_grid"]
    assert cols * rows <= 9
    assert small["visual_tokens"] == plan_image("minicpmv4_6", small["width"], small["height"],
                                                max_slice_nums=9).visual_tokens


def test_model_family_and_job_file(capsys, corpus, tmp_path):
    _, ocr, _ = run_inspect(capsys, str(corpus / "photo.jpg"), "--model", "minicpm_ocr")
    (rec,) = ocr
    assert rec["family"] == "minicpm_ocr"
    assert rec["visual_tokens"] == plan_image("minicpm_ocr", rec["width"], rec["height"]).visual_tokens

    job = tmp_path / "job.yaml"
    job.write_text(
        "name: sized\n"
        "input: {uris: [/nonexistent/replaced/by/the/argument]}\n"
        "output: {uri: /tmp/never-written}\n"
        "model: {family: minicpmv4_7, max_slice_nums: 4, use_image_id: false, downsample_mode: 4x}\n"
        "tasks: [{name: caption}]\n"
    )
    rc, records, _ = run_inspect(capsys, str(corpus / "photo.jpg"), "--job", str(job))
    assert rc == 0
    (rec,) = records
    assert rec["family"] == "minicpmv4_7"
    plan = plan_image("minicpmv4_7", rec["width"], rec["height"], max_slice_nums=4, use_image_id=False,
                      downsample_mode="4x")
    assert (rec["visual_tokens"], rec["placeholder_tokens"]) == (plan.visual_tokens, plan.placeholder_tokens)


def test_older_generations(capsys, corpus):
    rc, records, _ = run_inspect(capsys, str(corpus), "--model", "minicpmv2_5")
    assert rc == 0
    files = by_file(records)
    for r in files["report.pdf"] + files["photo.jpg"]:
        assert r["visual_tokens"] % 96 == 0  # fixed 96 query tokens per overview and slice
    (clip,) = files["clip.mp4"]
    assert clip["visual_tokens"] is None and "video" in clip["plan_error"]  # 2.5 takes no video


def test_failed_sources_are_lines_too(capsys, tmp_path):
    make_bad_corpus(tmp_path)
    rc, records, _ = run_inspect(capsys, str(tmp_path))
    assert rc == 0
    files = by_file(records)
    assert files["empty.pdf"][0]["error_type"] == "empty_file"
    assert files["notes.jpg"][0]["error_type"] == "unsupported_media_type"
    assert files["broken.mp4"][0]["error_type"]
    for name in ("empty.pdf", "notes.jpg", "broken.mp4"):
        (rec,) = files[name]
        assert rec["unit_index"] == -1 and rec["error_message"] and rec["visual_tokens"] is None
    assert all("pdf_repaired" in r["flags"] for r in files["truncated.pdf"])


def test_summary_and_errors(capsys, corpus):
    rc, records, err = run_inspect(capsys, str(corpus / "logo.png"), "--summary")
    assert rc == 0
    summary = json.loads(err.strip().splitlines()[-1])["summary"]
    assert summary["units"] == 1 and summary["visual_tokens"] == records[0]["visual_tokens"]

    rc, records, err = run_inspect(capsys, str(corpus / "missing.pdf"))
    assert rc == 2 and not records and "missing.pdf" in err
    rc, _, err = run_inspect(capsys, str(corpus), "--model", "minicpmv9")
    assert rc == 2 and "unknown model family" in err
    rc, _, err = run_inspect(capsys, str(corpus), "--set", "model.max_slice_nums=0")
    assert rc == 2 and "max_slice_nums" in err


def test_stacked_clips(capsys, corpus):
    from pipeline.media.slicing import plan_stacked_video
    from pipeline.media.stacking import stack_layout

    rc, records, _ = run_inspect(capsys, str(corpus / "clip.mp4"), "--set", "video.stack_frames=3")
    assert rc == 0
    (clip,) = records
    layout = stack_layout(clip["end_s"] - clip["start_s"], 16, 3)
    assert clip["stack_frames"] == 3 and clip["frames"] == layout.num_frames
    assert clip["visual_units"] == len(layout.units()) and clip["composites"] == sum(1 for k in layout.units() if k)
    plan = plan_stacked_video("minicpmv4_6", clip["width"], clip["height"], layout.units())
    assert clip["visual_tokens"] == plan.visual_tokens and clip["placeholder_tokens"] == plan.placeholder_tokens

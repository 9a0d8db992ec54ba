"""Every kind of hostile input of issue 11 together: through `cpmv inspect`, and one `cpmv run` (real
local Ray, tiny MiniCPM-V 4.6 on CPU) over a manifest of them, asserting status, error type and message
of every row, that no source is missing, and that a secret given as a storage option appears in no
output, record or log.

Inputs are made here (tests/hostile.py). The run is a console-script subprocess with its own Ray temp dir.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from tests import hostile

pytestmark = pytest.mark.slow

SECRET = "hostile-secret-0123456789abcdef"  # given through ${HOSTILE_TOKEN} as a storage option
TOO_SMALL = "{} pixels: a side is below the minimum of 4 pixels (limits.min_image_side) that the model's image processors accept"
NO_VIDEO = "the file has no video stream: audio only ({}), a cover picture is not video"

# name -> (bytes, [(unit_index, error_type, exact message or None, flags that must be present)])
# unit_index -1: one source-level row.
def corpus() -> dict[str, tuple[bytes, list[tuple[int, str | None, str | None, set[str]]]]]:
    ok = lambda i, flags=(): (i, None, None, set(flags))  # noqa: E731
    return {
        # 1. identified by the decoders
        "layers.psd": (hostile.psd_bytes((48, 32)), [ok(0)]),
        "scan.jp2": (hostile.pil_bytes("JPEG2000", (60, 40)), [ok(0)]),
        "comic.cbz": (hostile.cbz_bytes(2), [ok(0), ok(1)]),
        "notes.jpg": (b"meeting notes, not a picture\n" * 10, [(-1, "unsupported_media_type", (
            "not a format Pillow, MuPDF or FFmpeg reads (first bytes b'meeting notes, n'); see the README's "
            "supported formats"), set())]),
        # 2. literal names (the manifest lists "scan [1].png" only; "scan 1.png" must not be read)
        "scan [1].png": (hostile.pil_bytes("PNG", (50, 40)), [ok(0)]),
        # 3. multi-page still and animation
        "fax.tif": (hostile.tiff_pages(3), [ok(0), ok(1), ok(2)]),
        "anim.gif": (hostile.animated_gif(4), [ok(0, {"animation_first_frame"})]),
        # 4. audio with cover art
        "podcast.mp3": (hostile.audio_with_cover("mp3", "libmp3lame", 3.0), [(-1, "no_video_stream", NO_VIDEO.format("mp3"), set())]),
        "song.m4a": (hostile.audio_with_cover("mp4", "aac", 3.0), [
            (-1, "no_video_stream", NO_VIDEO.format("mov,mp4,m4a,3gp,3g2,mj2"), set())]),
        # 5. a mirrored video
        "mirror.mp4": (hostile.video_with_display(0, True, False)[0], [ok(0, {"video_rotated"})]),
        # 6. PDF structure errors
        "lying.pdf": (hostile.pdf_lying_count(3, 5), [ok(0), ok(1), ok(2)] + [
            (i, "page_missing", f"page {i + 1} of 5 does not exist in the file: its page tree claims 5 pages but "
             "holds fewer", set()) for i in (3, 4)]),
        "brokenref.pdf": (hostile.pdf_broken_page_reference(3, 1), [ok(0), (1, "page_missing", (
            "page 2 of 3: its page object cannot be found in the file (broken reference in the page tree: "
            "bad xref)"), set()), ok(2)]),
        "nullpage.pdf": (hostile.pdf_null_page_object(3, 1), [ok(0), (1, "page_missing_content", (
            "page 2: its page object is missing from the file (the page tree points to an empty object); it "
            "would render blank"), {"page_missing_content"}), ok(2)]),
        # 8. too small for the model's processors
        "dot.png": (hostile.pil_bytes("PNG", (1, 1)), [(-1, "image_too_small", TOO_SMALL.format("1x1"), set())]),
        "line.png": (hostile.pil_bytes("PNG", (20000, 1)), [(-1, "image_too_small", TOO_SMALL.format("20000x1"), set())]),
        # 10. bounds, from headers
        "bomb.png": (hostile.png_header_only(40000, 30000), [(-1, "image_too_large", (
            "1200000000 pixels (from the header) exceeds limits.max_pixels=100000000"), set())]),
        "tenhours.mp4": (hostile.long_video(10.0), [(-1, "video_too_long", (
            "36000.0 s exceeds limits.max_video_seconds=14400.0"), set())]),
    }


# PDFs with 1-2 of 3-5 pages missing are `error`: over documents.max_failed_unit_share (0.1).
EXPECTED_DOCS = {  # name -> (status, error_type)
    "layers.psd": ("ok", None), "scan.jp2": ("ok", None), "comic.cbz": ("ok", None),
    "notes.jpg": ("error", "unsupported_media_type"), "scan [1].png": ("ok", None), "fax.tif": ("ok", None),
    "anim.gif": ("ok", None), "podcast.mp3": ("error", "no_video_stream"), "song.m4a": ("error", "no_video_stream"),
    "mirror.mp4": ("ok", None), "lying.pdf": ("error", "page_missing"), "brokenref.pdf": ("error", "page_missing"),
    "nullpage.pdf": ("error", "page_missing_content"), "dot.png": ("error", "image_too_small"),
    "line.png": ("error", "image_too_small"), "bomb.png": ("error", "image_too_large"),
    "tenhours.mp4": ("error", "video_too_long"),
}

JOB = """
name: hostile
input:
  manifest: {manifest}
output:
  uri: {out}
storage:
  options:
    file:
      client_kwargs: {{auth_token: "${{HOSTILE_TOKEN}}"}}
model:
  name: tiny
  max_slice_nums: 1
  cache_dir: {cache}
checks: {{enabled: false}}  # 3-token replies of a random model always reach the cap (reply checks: own tests)
tasks:
  - {{name: ocr, max_new_tokens: 3}}
  - {{name: video_caption, max_new_tokens: 3}}
video: {{clip_seconds: 2, fps: 1, max_frames_per_clip: 2}}
engine: {{batch_size: 8}}
ray: {{num_cpus: 2}}
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hostile")
    data = corpus()
    (root / "in").mkdir()
    for name, (content, _) in data.items():
        (root / "in" / name).write_bytes(content)
    # The neighbour a glob reading of "scan [1].png" would pick up instead; not in the manifest.
    (root / "in" / "scan 1.png").write_bytes(hostile.pil_bytes("PNG", (30, 30)))
    return root, data


def _name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def test_inspect_every_hostile_input(files, capsys) -> None:
    root, data = files
    assert main(["inspect", str(root / "in")]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    got: dict[str, list[dict]] = {}
    for r in records:
        got.setdefault(_name(r["source_uri"]), []).append(r)
    assert sorted(got) == sorted([*data, "scan 1.png"])  # inspect reads the directory: the neighbour too
    for name, (_, units) in data.items():
        rows = sorted(got[name], key=lambda r: r["unit_index"])
        assert [(r["unit_index"], r["error_type"]) for r in rows] == [(u[0], u[1]) for u in units], name
        for r, (_, _, message, flags) in zip(rows, units):
            if message is not None:
                assert r["error_message"] == message, name
            assert flags <= set(r["flags"]), (name, r["flags"])
            assert not re.search(r"0x[0-9a-f]{6,}| object at ", r["error_message"] or ""), r["error_message"]


@pytest.fixture(scope="module")
def run(files) -> dict:
    root, data = files
    manifest = root / "manifest.csv"
    pacsv.write_csv(pa.table({"uri": [str(root / "in" / n) for n in sorted(data)]}), manifest)
    job = root / "job.yaml"
    job.write_text(JOB.format(manifest=manifest, out=root / "out", cache=root / "cache"))
    ray_tmp = tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
           "HOSTILE_TOKEN": SECRET, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "-v", "run", str(job)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    validate = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(job)], env=env, cwd=root,
                              capture_output=True, text=True, timeout=120)
    yield {"root": root, "data": data, "proc": proc, "validate": validate, "ray_tmp": Path(ray_tmp)}
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_run_succeeds(run) -> None:
    proc = run["proc"]
    assert proc.returncode in (0, 1), f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"  # 1: some sources failed


def test_no_source_missing_and_every_document_typed(run) -> None:
    docs = {_name(d["source_uri"]): d for d in pq.read_table(run["root"] / "out" / "documents").to_pylist()}
    assert sorted(docs) == sorted(run["data"])  # every listed source, and not the unlisted neighbour
    for name, (status, etype) in EXPECTED_DOCS.items():
        assert (docs[name]["status"], docs[name]["error_type"]) == (status, etype), (name, docs[name]["error_message"])


def test_every_result_row_has_its_status_type_and_message(run) -> None:
    rows = pq.read_table(run["root"] / "out" / "results").to_pylist()
    got: dict[str, list[dict]] = {}
    for r in rows:
        got.setdefault(_name(r["source_uri"]), []).append(r)
    for name, (_, units) in run["data"].items():
        kinds = {r["task"] for r in got[name]}
        mine = sorted(got[name], key=lambda r: (r["unit_index"], r["task"]))
        expected = sorted((u[0], t) for u in units for t in kinds)
        assert [(r["unit_index"], r["task"]) for r in mine] == expected, name
        by_unit = {u[0]: u for u in units}
        for r in mine:
            _, etype, message, flags = by_unit[r["unit_index"]]
            assert r["error_type"] == etype, (name, r["unit_index"], r["error_type"], r["error_message"])
            assert r["status"] == ("ok" if etype is None else "error"), (name, r["status"], r["error_message"])
            if message is not None:
                assert r["error_message"] == message, name
            assert flags <= set(r["flags"] or []), (name, r["flags"])


def test_the_secret_is_in_no_output_record_or_log(run) -> None:
    assert "**********" in run["validate"].stdout and SECRET not in run["validate"].stdout + run["validate"].stderr
    assert SECRET not in run["proc"].stdout + run["proc"].stderr
    record = next((run["root"] / "out" / "_runs").glob("*.json"))
    assert json.loads(record.read_text())["config"]["storage"]["options"]["file"]["client_kwargs"] == {
        "auth_token": "**********"}
    scanned, leaked = 0, []
    for base in (run["root"] / "out", run["ray_tmp"]):
        for path in base.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 * 2**20:
                scanned += 1
                if SECRET.encode() in path.read_bytes():
                    leaked.append(str(path))
    assert scanned > 10 and not leaked, leaked

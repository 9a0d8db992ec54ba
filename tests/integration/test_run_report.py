"""A real tiny run (`cpmv run`, local Ray, tiny MiniCPM-V 4.6): its progress lines, run record figures
and HTML report agree with the result rows it wrote; `cpmv runs` and `cpmv report` read it back."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

JOB = """
name: report
input: {{uris: ["{corpus}/"]}}
output: {{uri: "{out}", commit_every_units: 3, commit_every_s: 600}}
model: {{name: tiny, max_slice_nums: 1, cache_dir: "{cache}"}}
tasks:
  - {{name: ocr, max_new_tokens: 16}}
engine: {{batch_size: 2}}
ray: {{num_cpus: 2}}
"""


def _env(tmp: Path) -> dict[str, str]:
    ray_tmp = tempfile.mkdtemp(prefix="cpmv-ray-", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def cpmv(tmp: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=_env(tmp), cwd=tmp,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import pymupdf

    tmp = tmp_path_factory.mktemp("report")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(4):
        doc = pymupdf.open()
        for p in range(2):
            doc.new_page(width=300, height=400).insert_text((30, 60), f"document {i} page {p}", fontsize=14)
        doc.save(corpus / f"doc{i}.pdf")
    (corpus / "empty.pdf").write_bytes(b"")  # an error row (pdf open fails)
    (corpus / "junk.pdf").write_bytes(b"%PDF-1.4 not really" * 10)
    job = tmp / "job.yaml"
    job.write_text(JOB.format(corpus=corpus, out=tmp / "out", cache=tmp / "cache"))
    proc = cpmv(tmp, "run", str(job), "--progress", "log", "--progress-every", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, proc


def test_record_figures_equal_the_result_rows(tiny_run):
    tmp, proc = tiny_run
    (rec_path,) = (tmp / "out" / "_runs").glob("*.json")
    rec = json.loads(rec_path.read_text())
    rows = [r for r in pq.read_table(tmp / "out" / "results").to_pylist() if r["run_id"] == rec["run_id"]]
    units = {(r["source_id"], r["unit_index"], r["tile_index"]) for r in rows if r["unit_index"] >= 0}
    tp = rec["throughput"]
    assert tp["rows"] == len(rows) == rec["counts"]["results_ok"] + rec["counts"]["results_failed"]
    assert tp["units"] == len(units) == 8
    assert tp["pages"] == sum(1 for r in rows if r["unit_kind"] == "page" and not r["tile_index"])
    ok = [r for r in rows if r["status"] == "ok"]
    assert tp["completion_tokens"] == sum(r["completion_tokens"] for r in ok) > 0
    assert tp["prompt_tokens"] == sum(r["prompt_tokens"] for r in ok) > 0
    assert tp["seconds"] == rec["timings"]["pipeline_s"]
    assert tp["units_per_s"] == round(tp["units"] / tp["seconds"], 4)
    assert tp["completion_tokens_per_s"] == round(tp["completion_tokens"] / tp["seconds"], 4)
    assert rec["results_by_status"] == dict(Counter(r["status"] for r in rows))
    errors = Counter(r["error_type"] for r in rows if r["status"] == "error")
    assert errors and {e["error_type"]: e["count"] for e in rec["error_types"]} == dict(errors)
    assert all(e["examples"] for e in rec["error_types"])
    # busy times are the rows' own timings; the series add up to the totals
    infer_s = sum(r["infer_ms"] or 0 for r in rows) / 1000
    assert abs(rec["stages"]["infer"]["busy_s"] - infer_s) < 0.01
    assert 0 < rec["engine_occupancy"] <= 1
    ts = rec["timeseries"]
    assert sum(ts["units"]) == tp["units"] and sum(ts["completion_tokens"]) == tp["completion_tokens"]
    assert abs(sum(ts["engine_busy_s"]) - infer_s) < 0.01
    assert rec["distributions"]["completion_tokens"]["count"] == len(ok)
    assert len(rec["slowest_sources"]) == 6 and rec["stages"]["commit"]["windows"] >= 2


def test_progress_lines_and_report_paths_printed(tiny_run):
    tmp, proc = tiny_run
    lines = [ln for ln in proc.stderr.splitlines() if "pipeline.progress" in ln]
    assert len(lines) >= 2, proc.stderr[-3000:]
    assert re.search(r"sources 6/6 \(100%\), units 8 .*all sources done", lines[-1]), lines[-1]
    (rec_path,) = (tmp / "out" / "_runs").glob("*.json")
    assert f"record     {rec_path}" in proc.stdout
    assert f"report     {rec_path.with_suffix('.html')}" in proc.stdout


def test_html_report_holds_its_plots(tiny_run):
    from PIL import Image

    tmp, _ = tiny_run
    (html_path,) = (tmp / "out" / "_runs").glob("*.html")
    html = html_path.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # offline, self-contained
    plots = dict(re.findall(r'data-plot="(\w+)"[^>]*src="data:image/png;base64,([^"]+)"', html))
    assert set(plots) == {"throughput", "occupancy", "errors", "output_length", "slowest"}
    for name, data in plots.items():
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == "PNG" and img.width > 300 and img.height > 50, name
        # a plot, not a blank canvas: several distinct colours
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 5, name


def test_runs_lists_and_report_rerenders(tiny_run):
    tmp, _ = tiny_run
    (rec_path,) = (tmp / "out" / "_runs").glob("*.json")
    rec = json.loads(rec_path.read_text())
    listing = cpmv(tmp, "runs", str(tmp / "out"))
    assert listing.returncode == 0, listing.stderr
    line = next(ln for ln in listing.stdout.splitlines() if ln.startswith(rec["attempt"]))
    assert line.split()[1:2] == ["complete"] and line.split()[-3:] == [
        "8", str(rec["counts"]["results_ok"]), str(rec["counts"]["results_failed"])]
    html = rec_path.with_suffix(".html")
    html.unlink()
    again = cpmv(tmp, "report", str(tmp / "out"), rec["run_id"])
    assert again.returncode == 0, again.stderr
    assert str(html) in again.stdout and 'data-plot="throughput"' in html.read_text()
    missing = cpmv(tmp, "report", str(tmp / "out"), "no-such-run")
    assert missing.returncode == 2 and "no run 'no-such-run'" in missing.stderr


def test_progress_bars_and_quiet(tmp_path):
    """`--progress bars` turns Ray Data's per-operator bars on (no "Progress bars disabled" hint);
    `--quiet` prints no progress and no INFO logs, only the summary."""
    import pymupdf

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    doc = pymupdf.open()
    doc.new_page(width=300, height=400).insert_text((30, 60), "one page", fontsize=14)
    doc.save(corpus / "one.pdf")
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(corpus=corpus, out=tmp_path / "out", cache=tmp_path / "cache"))
    bars = cpmv(tmp_path, "run", str(job), "--progress", "bars", "--progress-every", "1")
    assert bars.returncode == 0, bars.stderr[-3000:]
    assert "Progress bars disabled" not in bars.stderr
    assert "MapBatches(ExpandSource)" in bars.stderr and "pipeline.progress" in bars.stderr
    quiet = cpmv(tmp_path, "run", str(job), "--set", "output.uri=" + str(tmp_path / "out2"), "-q")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "pipeline.progress" not in quiet.stderr and " INFO " not in quiet.stderr
    assert "report     " in quiet.stdout

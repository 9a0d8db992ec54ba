"""`text_layer: ignore | hint | use` through the engine stage with a tiny MiniCPM-V 4.6."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.config import load_job_data
from pipeline.expand import ExpandSource
from pipeline.infer import InferStage, RunContext
from pipeline.samples import report_pdf_bytes, scan_pdf_bytes
from pipeline.tasks import fingerprint, resolve_task


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("tl")
    (d / "report.pdf").write_bytes(report_pdf_bytes())
    (d / "scan.pdf").write_bytes(scan_pdf_bytes())
    return d


def _run(corpus, cache, mode):
    job = load_job_data({"input": {"uris": [str(corpus)]}, "output": {"uri": "o"},
                         "model": {"name": "tiny", "cache_dir": str(cache), "max_slice_nums": 1},
                         "tasks": [{"name": "ocr", "max_new_tokens": 2, "text_layer": mode}],
                         # 2-token replies are cut: with checks, OCR would fall back to the text layer
                         "checks": {"enabled": False}})
    tasks = {t.name: resolve_task(t) for t in job.tasks}
    ctx = RunContext("r", "tiny:minicpmv4_6", "minicpmv4_6", "transformers", tasks,
                     {n: fingerprint(t, job.model, "tiny") for n, t in tasks.items()})
    expand = ExpandSource(job, 448 * 448, {"ocr": ["image", "page"]}, "minicpmv4_6")
    rows = []
    for name in ("report.pdf", "scan.pdf"):
        src = pa.Table.from_pylist([{"source_uri": str(corpus / name), "source_id": name, "size": None,
                                     "tasks": ["ocr"]}])
        for units in expand(src):
            rows.append(units)
    stage = InferStage(job, ctx)
    return {(r["source_id"], r["unit_index"]): r for r in stage(pa.concat_tables(rows)).to_pylist()}


def test_modes(corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    ignore = _run(corpus, cache, "ignore")
    hint = _run(corpus, cache, "hint")
    use = _run(corpus, cache, "use")
    born, scan = ("report.pdf", 0), ("scan.pdf", 0)
    assert all(r["output_source"] == "model" for r in ignore.values())
    # hint: the born-digital page's prompt carries its text layer; the scan has none to add
    assert hint[born]["prompt_tokens"] > ignore[born]["prompt_tokens"] + 50
    assert hint[scan]["prompt_tokens"] == ignore[scan]["prompt_tokens"]
    assert hint[born]["prompt_version"] == "ocr-v1+hint"
    # use: the good text layer replaces the model; the scan still goes to the model
    assert use[born]["output_source"] == "text_layer" and "Pipeline Report" in use[born]["text"]
    assert use[born]["prompt_tokens"] is None and use[born]["status"] == "ok"
    assert use[scan]["output_source"] == "model" and use[scan]["completion_tokens"] >= 1
    assert use[born]["text_layer_quality"] == pytest.approx(1.0)

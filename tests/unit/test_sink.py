"""Commit protocol, documents aggregation and resume state, on a local output prefix."""

from datetime import datetime, timezone

import pyarrow.parquet as pq

from pipeline import sink
from pipeline.config import StorageConfig
from schemas.records import RESULTS_SCHEMA, SCHEMA_VERSION, to_table

NOW = datetime(2026, 11, 22, tzinfo=timezone.utc)


def _row(sid, unit, task, status, text="t", etype=None, media="pdf", flags=()):
    return {"schema_version": SCHEMA_VERSION, "run_id": "r1", "source_uri": f"/in/{sid}", "source_id": sid,
            "media_type": media, "unit_index": unit, "unit_kind": "page" if unit >= 0 else "source", "task": task,
            "status": status, "error_type": etype, "error_message": etype and f"{etype} happened",
            "text": text if status == "ok" else None, "flags": list(flags), "model": "m", "prompt_version": "v",
            "fingerprint": f"fp-{task}", "created_at": NOW}


def _stage(layout, rows):
    path = layout.staging("r1", "results")
    import os

    os.makedirs(path, exist_ok=True)
    pq.write_table(to_table(rows, RESULTS_SCHEMA), f"{path}/r1-000000.parquet")


def test_documents_commit_and_resume(tmp_path):
    layout = sink.Layout(str(tmp_path / "out"), StorageConfig())
    rows = [
        _row("a", 0, "ocr", "ok", "page one"), _row("a", 1, "ocr", "ok", "page two"),
        _row("b", 0, "ocr", "ok"), _row("b", 1, "ocr", "error", etype="page_render_failed", flags=["pdf_repaired"]),
        _row("c", -1, "ocr", "error", etype="empty_file"),
        _row("d", -1, "ocr", "skipped", etype="task_not_applicable", media="video"),
        _row("f", 0, "ocr", "ok", flags=["pdf_repaired"]),
    ]
    _stage(layout, rows)
    sources = [{"source_uri": f"/in/{s}", "source_id": s, "size": 10, "tasks": ["ocr", "video_caption"]}
               for s in "abcdef"]
    fps = {"ocr": "fp-ocr", "video_caption": "fp-video_caption"}
    docs = {d["source_id"]: d for d in sink.build_documents(layout, "r1", sources, fps, with_text=True).to_pylist()}

    assert docs["a"]["status"] == "ok" and docs["a"]["num_units"] == 2 and docs["a"]["text"] == "page one\n\npage two"
    assert docs["b"]["status"] == "partial" and docs["b"]["units_failed"] == 1 and docs["b"]["units_ok"] == 1
    assert docs["b"]["error_type"] == "page_render_failed" and docs["b"]["flags"] == ["pdf_repaired"]
    assert docs["c"]["status"] == "error" and docs["c"]["num_units"] == 0
    assert docs["d"]["status"] == "skipped"
    # a repaired PDF is never reported as plainly ok
    assert docs["f"]["status"] == "partial" and docs["f"]["error_type"] == "pdf_repaired"
    # a source with no rows at all is not lost silently
    assert docs["e"]["status"] == "error" and docs["e"]["error_type"] == "lost"

    # nothing is visible as output before the commit
    assert sink.committed(layout) == {}
    assert not (tmp_path / "out" / "results").exists()
    table = sink.build_documents(layout, "r1", sources, fps, with_text=True)
    files = sink.commit(layout, "r1", table, {"run_id": "r1"})
    assert [f.rsplit("/", 1)[-1] for f in files] == ["r1-000000.parquet"]
    assert (tmp_path / "out" / "runs" / "r1.json").exists()
    assert not (tmp_path / "out" / "_staging" / "r1").exists()
    assert pq.read_table(tmp_path / "out" / "results").num_rows == len(rows)

    done = sink.committed(layout)
    # tasks that did not apply to a source (video_caption of a PDF) are committed too: no endless retries
    assert done["a"] == {"fp-ocr", "fp-video_caption"} and done["c"] == {"fp-ocr", "fp-video_caption"}
    assert done["e"] == set()  # a lost source has no fingerprint: the next run retries it


def test_commit_with_no_work_writes_only_the_run_record(tmp_path):
    layout = sink.Layout(str(tmp_path / "out"), StorageConfig())
    empty = sink.build_documents(layout, "r2", [], {}, with_text=True)
    assert sink.commit(layout, "r2", empty, {"run_id": "r2"}) == []
    assert (tmp_path / "out" / "runs" / "r2.json").exists()
    assert not (tmp_path / "out" / "documents").exists()

"""Documents rows, the committed index and which tasks a rerun redoes (no Ray)."""

from datetime import datetime, timezone

from pipeline import sink
from pipeline.collect import Complete, Prior, SourceWork
from pipeline.retry import RetryPolicy
from schemas.records import DOCUMENTS_SCHEMA, SCHEMA_VERSION, to_table

NOW = datetime(2026, 11, 22, tzinfo=timezone.utc)
FPS = {"ocr": "fp-ocr", "video_caption": "fp-video_caption"}


def row(sid, unit, task, status, text="t", etype=None, media="pdf", flags=()):
    return {"schema_version": SCHEMA_VERSION, "run_id": "r1", "source_uri": f"/in/{sid}", "source_id": sid,
            "media_type": media, "unit_index": unit, "unit_kind": "page" if unit >= 0 else "source",
            "tile_index": None, "task": task, "status": status, "error_type": etype,
            "error_message": etype and f"{etype} happened", "text": text if status == "ok" else None,
            "flags": list(flags), "model": "m", "prompt_version": "v", "fingerprint": f"fp-{task}", "created_at": NOW}


def complete(sid, rows, tasks=("ocr", "video_caption"), prior=None, ok=True):
    return Complete(SourceWork(f"/in/{sid}", sid, 10, tuple(tasks), prior), rows, len(rows), ok)


def doc(src, moved=()):
    return sink.document_row(src, FPS, "a1", "r1", NOW, True, list(moved))


def test_documents_rows_from_a_sources_rows():
    a = doc(complete("a", [row("a", 0, "ocr", "ok", "page one"), row("a", 1, "ocr", "ok", "page two")]))
    assert a["status"] == "ok" and a["num_units"] == 2 and a["text"] == "page one\n\npage two"
    # tasks that do not apply (video_caption of a PDF) are committed too: no endless retries
    assert a["committed"] == [{"task": "ocr", "fingerprint": "fp-ocr"},
                              {"task": "video_caption", "fingerprint": "fp-video_caption"}]
    b = doc(complete("b", [row("b", 0, "ocr", "ok"),
                           row("b", 1, "ocr", "error", etype="page_render_failed", flags=["pdf_repaired"])]))
    # 1 of 2 units failed: above documents.max_failed_unit_share (0.1 by default), so `error`
    assert b["status"] == "error" and b["units_failed"] == 1 and b["units_ok"] == 1
    assert "1 of 2 units failed (50%, above documents.max_failed_unit_share 0.1)" in b["error_message"]
    assert b["failures"] == [{"task": "ocr", "error_type": "page_render_failed", "count": 1}]
    b2 = sink.document_row(complete("b", b_rows := [row("b", 0, "ocr", "ok"), row("b", 1, "ocr", "error",
                           etype="reply_truncated")]), FPS, "a1", "r1", NOW, True, [], max_failed_unit_share=0.5)
    assert b2["status"] == "partial" and b2["error_type"] == "reply_truncated" and len(b_rows) == 2
    c = doc(complete("c", [row("c", -1, "ocr", "error", etype="empty_file")]))
    assert c["status"] == "error" and c["num_units"] == 0
    d = doc(complete("d", [row("d", -1, "ocr", "skipped", etype="task_not_applicable", media="video")]))
    assert d["status"] == "skipped" and d["failures"] == []
    # a repaired PDF whose rows are all ok: `ok`, with the flag (the summary lists it under flags)
    f = doc(complete("f", [row("f", 0, "ocr", "ok", flags=["pdf_repaired"])]))
    assert f["status"] == "ok" and f["error_type"] is None and f["flags"] == ["pdf_repaired"]
    to_table([a, b, c, d, f], DOCUMENTS_SCHEMA)  # every row fits the versioned schema


def test_lost_and_incomplete_sources_commit_nothing_of_this_run():
    e = doc(sink.lost(SourceWork("/in/e", "e", 1, ("ocr",))))
    assert e["status"] == "error" and e["error_type"] == "lost" and e["committed"] == []
    g = doc(complete("g", [row("g", 0, "ocr", "ok")], tasks=("ocr",), ok=False))
    assert g["error_type"] == "lost_units" and g["status"] == "partial" and g["committed"] == []
    assert "lost_units" in g["flags"]


def test_redone_task_keeps_the_other_tasks_commitments():
    prior = Prior("old", (("ocr", "fp-ocr"), ("caption", "fp-cap")))
    moved = [row("h", 0, "caption", "ok")]
    h = doc(complete("h", [row("h", 0, "ocr", "ok")], tasks=("ocr",), prior=prior), moved)
    assert h["committed"] == [{"task": "caption", "fingerprint": "fp-cap"}, {"task": "ocr", "fingerprint": "fp-ocr"}]
    assert h["results_ok"] == 2 and h["tasks"] == ["caption", "ocr"]


def test_tasks_to_do_by_fingerprint_and_retry_policy():
    fps = {"ocr": "fp1", "caption": "fp2"}
    state = {"committed": [{"task": "ocr", "fingerprint": "fp1"}, {"task": "caption", "fingerprint": "fp2"}],
             "failures": [{"task": "ocr", "error_type": "http_503", "count": 2},
                          {"task": "caption", "error_type": "page_render_failed", "count": 1}]}
    default = RetryPolicy()
    assert sink.tasks_to_do(None, fps, default) == ["ocr", "caption"]
    assert sink.tasks_to_do(state, fps, default) == ["ocr"]  # transient 503 redone, a bad page not
    assert sink.tasks_to_do(state, fps, RetryPolicy.parse("page_render_failed")) == ["ocr", "caption"]
    assert sink.tasks_to_do(state, {"ocr": "fp1", "caption": "other"}, default) == ["ocr", "caption"]
    clean = {"committed": state["committed"], "failures": []}
    assert sink.tasks_to_do(clean, fps, RetryPolicy.parse("all")) == []


def test_committed_index_looks_up_in_chunks(tmp_path):
    import pyarrow.parquet as pq

    layout = sink.Layout(str(tmp_path / "out"), sink.StorageConfig())
    (tmp_path / "out" / "documents").mkdir(parents=True)
    rows = [doc(complete(s, [row(s, 0, "ocr", "ok")])) for s in ("a", "b", "c")]
    pq.write_table(to_table(rows[:2], DOCUMENTS_SCHEMA), tmp_path / "out" / "documents" / "x-w00001.parquet")
    pq.write_table(to_table(rows[2:], DOCUMENTS_SCHEMA), tmp_path / "out" / "documents" / "y-w00001.parquet")
    index = sink.CommittedIndex.load(layout)
    assert len(index) == 3
    found = index.lookup(["c", "zz", "a"])
    assert set(found) == {"a", "c"} and found["c"]["stem"] == "y-w00001" and found["a"]["stem"] == "x-w00001"
    assert sink.prior_of(found["a"]).committed == (("ocr", "fp-ocr"), ("video_caption", "fp-video_caption"))
    assert len(sink.CommittedIndex.load(sink.Layout(str(tmp_path / "none"), sink.StorageConfig()))) == 0


def test_documents_of_schema_1_1_still_resume(tmp_path):
    """An output prefix written before 1.2 (no `committed`): its fingerprints still count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "out" / "documents").mkdir(parents=True)
    old = pa.table({"source_id": ["a"], "fingerprints": [["fp-ocr", "fp-video_caption"]], "status": ["ok"]})
    pq.write_table(old, tmp_path / "out" / "documents" / "r0.parquet")
    index = sink.CommittedIndex.load(sink.Layout(str(tmp_path / "out"), sink.StorageConfig()))
    state = index.lookup(["a"])["a"]
    assert state["committed"] is None
    assert sink.tasks_to_do(state, FPS, RetryPolicy()) == []
    assert sink.tasks_to_do(state, {**FPS, "caption": "fp-cap"}, RetryPolicy()) == ["caption"]


def test_failed_unit_share_decides_error_or_partial():
    """documents.max_failed_unit_share: 1 failed unit of 20 (5%) is `partial` under 0.1; 3 of 20 (15%) `error`."""
    def pages(n_failed):
        return [row("p", i, "ocr", "error" if i < n_failed else "ok", etype="reply_repetitive" if i < n_failed else None)
                for i in range(20)]
    one = doc(complete("p", pages(1), tasks=("ocr",)))
    assert one["status"] == "partial" and one["units_failed"] == 1 and one["error_type"] == "reply_repetitive"
    three = doc(complete("p", pages(3), tasks=("ocr",)))
    assert three["status"] == "error" and "3 of 20 units failed (15%" in three["error_message"]
    exact = sink.document_row(complete("p", pages(2), tasks=("ocr",)), FPS, "a1", "r1", NOW, True, [],
                              max_failed_unit_share=0.1)
    assert exact["status"] == "partial"  # 10% is not above 0.1
    assert doc(complete("p", pages(20), tasks=("ocr",)))["status"] == "error"  # nothing ok
    # a unit fails when any of its tasks fails
    two_tasks = [row("q", 0, "ocr", "ok"), row("q", 0, "caption", "error", etype="reply_empty")] + \
        [row("q", i, t, "ok") for i in range(1, 10) for t in ("ocr", "caption")]
    q = doc(complete("q", two_tasks, tasks=("ocr",)))
    assert q["units_failed"] == 1 and q["status"] == "partial"


def test_summary_counts_documents_by_status_errors_by_rows_and_flags_apart():
    from pipeline.report import render
    from pipeline.run import RunSummary

    s = RunSummary("r", "/out", "a1", counts={"documents_ok": 17, "documents_partial": 1, "documents_error": 2},
                   errors={"reply_truncated": 11, "reply_empty": 1}, flags={"pdf_repaired": 17})
    text = render(s)
    assert "documents  error 2, ok 17, partial 1" in text
    assert "errors     reply_truncated x11, reply_empty x1 (result rows)" in text
    assert "flags      pdf_repaired x17 (documents)" in text and "pdf_repaired" not in text.split("flags")[0]

"""Reply checks, retries and the text-layer fallback through the engine stage, with real engines.

* The tiny random MiniCPM-V 4.6 (transformers) runs to its token cap by itself: a real
  `reply_truncated`, retried at the task's temperatures, and a real PDF page falling back to its text
  layer. `Recorder` wraps the real engine and only writes down what each request asked for.
* `ScriptedServer` is FAULT INJECTION: an OpenAI-compatible stand-in on 127.0.0.1 that answers
  `/v1/chat/completions` with the degenerate replies real servers give (a loop to the cap, empty
  content, `null` content, reasoning only, a ragged table), chosen by the width of the request's
  image, and records every request's temperature and token cap. No model runs behind it: the
  replies a real checkpoint gives only sometimes must come every time here.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import load_job_data
from pipeline.engines.base import Engine
from pipeline.expand import ExpandSource
from pipeline.infer import InferStage, RunContext
from pipeline.samples import report_pdf_bytes
from pipeline.tasks import fingerprint, resolve_task
from schemas.records import UNITS_SCHEMA, to_table
from tests.chat_standin import ChatStandIn

GOOD_TABLE = "| Item | Qty |\n|---|---|\n| Pen | 2 |"
PAGE_TEXT = "Quarterly report\nRevenue grew four percent in Europe while the Americas stayed flat this year."


class Recorder(Engine):
    """Passes every call to the real engine and records (temperature, max_new_tokens) per request."""

    name = "transformers"

    def __init__(self, real: Engine):
        self.real, self.sent = real, []

    def generate(self, requests):
        self.sent.extend((r.temperature, r.max_new_tokens) for r in requests)
        return self.real.generate(requests)


def _stage(job, engine_kind="transformers"):
    tasks = {t.name: resolve_task(t) for t in job.tasks}
    ctx = RunContext("run-checks", "tiny:minicpmv4_6", "minicpmv4_6", engine_kind, tasks,
                     {n: fingerprint(t, job.model, "tiny") for n, t in tasks.items()})
    return InferStage(job, ctx)


def _unit(i, w=64, h=48, kind="image", tasks=("ocr",), text_layer=None):
    pixels = [np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8).tobytes()]
    return {"source_uri": f"/in/{i}", "source_id": f"s{i}", "size_bytes": 10,
            "media_type": "pdf" if kind == "page" else "image", "tasks": list(tasks), "unit_index": 0,
            "unit_kind": kind, "pixels": pixels, "width": w, "height": h, "num_frames": 1, "text_layer": text_layer,
            "flags": [], "error_type": None, "error_message": None, "preprocess_ms": 1.0}


# -- real replies: the tiny model through transformers --------------------------------------------


def test_tiny_model_replies_cut_at_the_cap_are_retried_then_reply_truncated(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    job = load_job_data({"input": {"uris": ["x"]}, "output": {"uri": "o"},
                         "model": {"name": "tiny", "cache_dir": str(cache), "max_slice_nums": 1},
                         "tasks": [{"name": "caption", "max_new_tokens": 3, "retries": 2,
                                    "retry_temperatures": [0.4, 0.9], "retry_max_new_tokens": 5}]})
    stage = _stage(job)
    stage.engine = rec = Recorder(stage.engine)
    import torch

    torch.manual_seed(0)  # retries sample: a 512-token vocabulary could draw a stop token by chance
    (row,) = stage(to_table([_unit(1, tasks=("caption",))], UNITS_SCHEMA)).to_pylist()
    assert row["status"] == "error" and row["error_type"] == "reply_truncated", row
    assert row["attempts"] == 3 and row["retry_reasons"] == ["truncated"] * 3
    assert row["finish_reason"] == "length" and row["completion_tokens"] == 5
    assert row["text"]  # the cut reply is kept for inspection
    assert "temperatures 0, 0.4, 0.9" in row["error_message"]
    # what the engine was actually asked: the schedule, and the larger cap for cut replies
    assert rec.sent == [(0.0, 3), (0.4, 5), (0.9, 5)]


def test_tiny_model_page_falls_back_to_its_text_layer(tmp_path_factory):
    cache, d = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("pdf")
    (d / "report.pdf").write_bytes(report_pdf_bytes())
    job = load_job_data({"input": {"uris": [str(d)]}, "output": {"uri": "o"},
                         "model": {"name": "tiny", "cache_dir": str(cache), "max_slice_nums": 1},
                         "tasks": [{"name": "ocr", "max_new_tokens": 2, "retries": 1}]})
    expand = ExpandSource(job, 448 * 448, {"ocr": ["image", "page"]}, "minicpmv4_6")
    src = pa.Table.from_pylist([{"source_uri": str(d / "report.pdf"), "source_id": "r", "size": None,
                                 "tasks": ["ocr"]}])
    units = pa.concat_tables(list(expand(src)))
    stage = _stage(job)
    import torch

    torch.manual_seed(0)  # the retry samples (see above)
    rows = [r for r in stage(units).to_pylist() if r["unit_kind"] == "page"]
    assert rows and all(r["status"] == "ok" and r["output_source"] == "text_layer_fallback" for r in rows)
    assert "Pipeline Report" in rows[0]["text"]
    assert rows[0]["attempts"] == 2 and rows[0]["retry_reasons"] == ["truncated", "truncated"]
    # without the fallback the same page is an error row
    off = load_job_data({**job.model_dump(mode="json"), "checks": {"text_layer_fallback": False}})
    stage.job = off
    rows = [r for r in stage(units).to_pylist() if r["unit_kind"] == "page"]
    assert all(r["status"] == "error" and r["error_type"] == "reply_truncated" for r in rows)


# -- FAULT INJECTION: an OpenAI-compatible stand-in that returns degenerate replies ---------------

LOOP = "| 12.5 " * 200


def _script(width: int, attempt: int) -> tuple[dict, str]:
    """(the message, finish_reason) the stand-in sends for an image `width` px wide, on its `attempt`-th request."""
    if width == 40:
        return {"content": LOOP}, "length"  # loops to the cap every time
    if width == 41:
        return {"content": "   "}, "stop"  # whitespace only
    if width == 42:
        return {"content": None}, "stop"  # null content
    if width == 43:  # reasoning only: apart (reasoning_content) and inline
        return ({"content": None, "reasoning_content": "Let me look at the page."} if attempt % 2 else
                {"content": "<think>Still looking.</think>"}), "stop"
    if width == 44:  # loops once, then a good answer with a reasoning block in front
        return ({"content": LOOP}, "length") if attempt == 1 else (
            {"content": "<think>two columns</think>\n" + GOOD_TABLE}, "stop")
    if width == 45:
        return {"content": "| Item | Qty |\n|---|---|\n| Pen | 2 | 7 |"}, "stop"  # ragged table
    if width == 46:
        return {"content": LOOP}, "length"  # a page with a text layer: falls back
    return {"content": GOOD_TABLE}, "stop"


class ScriptedServer(ChatStandIn):
    """FAULT INJECTION: see the module docstring. `sent[width]` lists (temperature, max_tokens)."""

    def __init__(self):
        self.sent: dict[int, list[tuple[float, int]]] = {}

        def answer(body, image):
            self.sent.setdefault(image.width, []).append((body["temperature"], body["max_tokens"]))
            message, finish = _script(image.width, len(self.sent[image.width]))
            return message, finish, {"prompt_tokens": 50, "completion_tokens": 9}

        super().__init__(answer)


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def test_fault_injection_degenerate_replies_become_typed_error_rows(server):
    job = load_job_data({"input": {"uris": ["x"]}, "output": {"uri": "o"},
                         "model": {"name": "served"},
                         "engine": {"kind": "openai", "openai": {"base_url": server.url, "max_retries": 0}},
                         "checks": {"allow_empty_tasks": []},  # an empty table reply fails too (default: allowed)
                         "tasks": [{"name": "table", "max_new_tokens": 100, "retries": 3,
                                    "retry_max_new_tokens": 300}]})
    stage = _stage(job, "openai")
    units = [_unit(i, w=w, tasks=("table",)) for i, w in enumerate((40, 41, 42, 43, 44, 45, 47))]
    units.append(_unit(9, w=46, kind="page", tasks=("table",), text_layer=PAGE_TEXT))
    by = {r["width"]: r for r in stage(to_table(units, UNITS_SCHEMA)).to_pylist()}

    loop = by[40]
    assert (loop["status"], loop["error_type"], loop["attempts"]) == ("error", "reply_repetitive", 4)
    assert loop["retry_reasons"] == ["repetitive"] * 4 and loop["text"].startswith("| 12.5")
    for w in (41, 42):
        r = by[w]
        assert (r["status"], r["error_type"], r["attempts"]) == ("error", "reply_empty", 4)
        assert r["retry_reasons"] == ["empty"] * 4 and r["text"] == ""
    think = by[43]
    assert (think["status"], think["error_type"]) == ("error", "reply_empty")
    assert think["retry_reasons"] == ["reasoning_only"] * 4
    assert think["text"] == "" and "reasoning block" in think["error_message"]
    healed = by[44]
    assert (healed["status"], healed["attempts"], healed["retry_reasons"]) == ("ok", 2, ["repetitive"])
    assert healed["text"] == GOOD_TABLE  # the reasoning block is gone
    assert healed["tables"] == [{"columns": 2, "rows": [{"header": True, "cells": ["Item", "Qty"]},
                                                        {"header": False, "cells": ["Pen", "2"]}]}]
    ragged = by[45]
    assert (ragged["status"], ragged["error_type"], ragged["retry_reasons"]) == ("error", "reply_invalid",
                                                                                  ["invalid"] * 4)
    assert "3 cells, the header 2" in ragged["error_message"]
    good = by[47]
    assert (good["status"], good["attempts"], good["retry_reasons"]) == ("ok", 1, [])
    # the fallback is for OCR only: a table task on a page with a text layer stays an error
    assert by[46]["error_type"] == "reply_repetitive"

    # the temperatures and caps actually sent: the schedule; the larger cap never (loops are not "cut")
    assert server.sent[40] == [(0.0, 100), (0.2, 100), (0.5, 100), (0.8, 100)]
    assert server.sent[44] == [(0.0, 100), (0.2, 100)]
    assert server.sent[47] == [(0.0, 100)]


def test_fault_injection_ocr_page_falls_back_and_cut_replies_get_a_larger_cap(server):
    job = load_job_data({"input": {"uris": ["x"]}, "output": {"uri": "o"}, "model": {"name": "served"},
                         "engine": {"kind": "openai", "openai": {"base_url": server.url, "max_retries": 0}},
                         "checks": {"repetition_min_repeats": 1000},  # the loop now only counts as cut
                         "tasks": [{"name": "ocr", "max_new_tokens": 100, "retries": 2,
                                    "retry_temperatures": [0.3], "retry_max_new_tokens": 400}]})
    stage = _stage(job, "openai")
    units = [_unit(9, w=46, kind="page", text_layer=PAGE_TEXT), _unit(1, w=40)]
    by = {r["width"]: r for r in stage(to_table(units, UNITS_SCHEMA)).to_pylist()}
    page, image = by[46], by[40]
    assert (page["status"], page["output_source"], page["text"]) == ("ok", "text_layer_fallback", PAGE_TEXT)
    assert page["attempts"] == 3 and page["retry_reasons"] == ["truncated"] * 3
    assert (image["status"], image["error_type"]) == ("error", "reply_truncated")  # no text layer to fall to
    assert server.sent[40] == [(0.0, 100), (0.3, 400), (0.3, 400)]

"""Reply checks (pipeline/checks.py) and table parsing (pipeline/tables.py) on hand-made replies."""

from __future__ import annotations

import pytest

from pipeline.checks import ERROR_TYPES, Attempts, check_reply, repetition, split_reasoning
from pipeline.config import ChecksConfig, ConfigError, TaskConfig, load_job_data
from pipeline.engines.base import Reply, Request
from pipeline.tables import check as table_check
from pipeline.tasks import resolve_task

CFG = ChecksConfig()
PROSE = ("The quarterly report lists revenue by region. Europe grew by four percent while the Americas "
         "stayed flat; Asia fell slightly after a strong first half. Costs were in line with the plan.")


def _check(text: str, finish: str = "stop", task: str = "ocr", cfg: ChecksConfig = CFG, **kw):
    return check_reply(Reply(text=text, finish_reason=finish, completion_tokens=7, **kw), task, cfg)


def test_a_good_reply_passes_untouched() -> None:
    v = _check(PROSE)
    assert v.ok and v.text == PROSE and v.reason is None


def test_loop_of_a_table_cell_is_repetitive() -> None:
    v = _check("| Total | " + "| 12.5 " * 200)  # the 1,399 characters of a repeated cell
    assert not v.ok and v.reason == "repetitive" and ERROR_TYPES[v.reason] == "reply_repetitive"
    assert "12.5" in v.message and "200 repeats" in v.message and "covers 99%" in v.message
    assert v.text.startswith("| Total")  # kept for inspection


def test_line_loop_and_its_thresholds() -> None:
    line = "Please see the attached document for details."
    looped = PROSE + "\n" + "\n".join([line] * 10)
    assert _check(looped).reason == "repetitive"
    # 7 repeats: below repetition_min_repeats (8)
    assert _check(PROSE + "\n" + "\n".join([line] * 7)).ok
    # the same loop under a stricter share passes: the loop covers ~71% of the text
    assert _check(looped, cfg=ChecksConfig(repetition_min_share=0.8)).ok
    share, repeats, span, chunk = repetition(looped, CFG)
    assert 0.6 < share < 0.8 and repeats == 10 and "Please see the attached" in chunk


def test_short_and_legitimate_repeats_pass() -> None:
    assert _check("." * 40).ok  # under repetition_min_chars
    toc = "\n".join(f"{i}. Chapter {i} {'.' * 20} {i * 7}" for i in range(1, 30))  # dot leaders, one per line
    assert _check(toc).ok
    table = "| a | b |\n|---|---|\n" + "\n".join(f"| {i} | {i * i} |" for i in range(40))
    assert _check(table).ok


def test_truncated_and_its_switch() -> None:
    v = _check(PROSE, finish="length")
    assert not v.ok and v.reason == "truncated" and "token cap" in v.message and v.text == PROSE
    assert _check(PROSE, finish="length", cfg=ChecksConfig(truncated=False)).ok


def test_a_loop_that_ran_to_the_cap_is_repetitive_not_truncated() -> None:
    assert _check("word " * 300, finish="length").reason == "repetitive"


def test_empty_whitespace_and_allowed_empty() -> None:
    for text in ("", "   \n\t "):
        v = _check(text)
        assert not v.ok and v.reason == "empty" and ERROR_TYPES["empty"] == "reply_empty"
    # the table prompt asks for nothing on a page without tables: allowed by default
    assert CFG.allow_empty_tasks == ["table"] and _check("", task="table").ok
    assert not _check("", task="table", cfg=ChecksConfig(allow_empty_tasks=[])).ok
    allow = ChecksConfig(allow_empty_tasks=["ocr", "table"])
    assert _check("", cfg=allow).ok
    assert _check("", task="table", cfg=allow).tables == []
    assert not _check("", task="caption", cfg=allow).ok  # a caption is never empty
    assert not _check("", finish="length", cfg=allow).ok  # cut before it said anything


def test_reasoning_is_never_left_in_text() -> None:
    v = _check("<think>the page shows a table</think>\n\nRevenue grew.")
    assert v.ok and v.text == "Revenue grew."
    v = _check("reasoning whose opening tag was in the prompt</think>Answer")
    assert v.ok and v.text == "Answer"
    v = _check("<think>only thinking</think>")
    assert not v.ok and v.reason == "reasoning_only" and ERROR_TYPES["reasoning_only"] == "reply_empty"
    assert v.text == "" and "only thinking" in v.message
    v = _check("<think>cut in the middle of thinking", finish="length")
    assert not v.ok and v.reason == "truncated" and v.text == ""
    v = _check("", reasoning="server-side reasoning_content")  # content null, reasoning apart
    assert v.reason == "reasoning_only"
    off = ChecksConfig(enabled=False)
    v = _check("<think>x</think>kept", finish="length", cfg=off)
    assert v.ok and v.text == "kept"
    assert split_reasoning("no tags", ("<think>", "</think>")) == ("no tags", None, False)


def test_table_validity_feeds_the_checks() -> None:
    good = "| Item | Qty |\n|------|-----|\n| Pen | 2 |\n| Ink | 1 |"
    v = _check(good, task="table")
    assert v.ok and v.tables == [{"columns": 2, "rows": [
        {"header": True, "cells": ["Item", "Qty"]}, {"header": False, "cells": ["Pen", "2"]},
        {"header": False, "cells": ["Ink", "1"]}]}]
    ragged = "| Item | Qty |\n|------|-----|\n| Pen | 2 | 9 |"
    v = _check(ragged, task="table")
    assert not v.ok and v.reason == "invalid" and ERROR_TYPES["invalid"] == "reply_invalid"
    assert "row 2 has 3 cells, the header 2" in v.message
    assert _check("There is a table but I will not write it.", task="table").reason == "invalid"
    assert _check("| a | b |\n|---|---|", task="table").reason == "invalid"  # header only
    assert _check("There is a table but I will not write it.", task="ocr").ok  # no validity hook for ocr
    assert _check(ragged, task="table", cfg=ChecksConfig(validate_tasks=False)).ok


def test_html_tables_with_spans() -> None:
    html = ("<table><thead><tr><th>Region</th><th colspan='2'>Sales</th></tr></thead>"
            "<tbody><tr><td rowspan='2'>EU</td><td>1</td><td>2</td></tr><tr><td>3</td><td>4</td></tr></tbody></table>")
    tables, why = table_check(html)
    assert why is None and tables == [{"columns": 3, "rows": [
        {"header": True, "cells": ["Region", "Sales", "Sales"]}, {"header": False, "cells": ["EU", "1", "2"]},
        {"header": False, "cells": ["EU", "3", "4"]}]}]
    tables, why = table_check("<table><tr><td>1</td><td>2</td></tr><tr><td>3</td></tr></table>")
    assert "row 2 has 1 cells" in why and tables[0]["rows"][1]["cells"] == ["3", ""]


def test_attempts_follow_the_temperature_schedule_and_cap() -> None:
    task = resolve_task(TaskConfig(name="ocr", max_new_tokens=16, retries=3, retry_max_new_tokens=64))
    a = Attempts(task, Request("p", max_new_tokens=16), CFG)
    nxt = a.take(Reply(text="word " * 100, finish_reason="length"))  # repetitive: same cap
    assert nxt.temperature == 0.2 and nxt.max_new_tokens == 16
    nxt = a.take(Reply(text=PROSE, finish_reason="length"))  # cut: the larger cap
    assert nxt.temperature == 0.5 and nxt.max_new_tokens == 64
    nxt = a.take(Reply(text="", finish_reason="stop"))
    assert nxt.temperature == 0.8
    assert a.take(Reply(text="", finish_reason="stop")) is None  # retries spent
    assert a.count == 4 and a.reasons == ["repetitive", "truncated", "empty", "empty"]
    assert a.temperatures == [0.0, 0.2, 0.5, 0.8] and not a.verdict.ok

    b = Attempts(task, Request("p"), CFG)
    assert b.take(Reply(text=PROSE, finish_reason="stop")) is None and b.count == 1 and b.reasons == []
    c = Attempts(task, Request("p"), CFG)
    assert c.take(Reply(error_type="engine_error", error_message="x")) is None and c.verdict is None
    # a schedule shorter than the retries repeats its last value
    t = resolve_task(TaskConfig(name="ocr", retries=4, retry_temperatures=[0.3]))
    assert [t.retry_temperature(k) for k in (1, 2, 4)] == [0.3, 0.3, 0.3]


def test_bad_settings_fail_fast_naming_the_field() -> None:
    base = {"input": {"uris": ["x"]}, "output": {"uri": "o"}}
    with pytest.raises(ConfigError, match="tasks.0.retry_temperatures"):
        load_job_data({**base, "tasks": [{"name": "ocr", "retry_temperatures": [0.2, -1]}]})
    with pytest.raises(ConfigError, match="checks.repetition_min_share"):
        load_job_data({**base, "checks": {"repetition_min_share": 1.5}})
    with pytest.raises(ConfigError, match="documents.max_failed_unit_share"):
        load_job_data({**base, "documents": {"max_failed_unit_share": -0.1}})


def test_reply_failures_are_permanent_for_reruns() -> None:
    """A rerun does not redo reply_* rows by default (deterministic replies); --retry-errors does."""
    from pipeline.retry import PERMANENT, RetryPolicy, is_transient

    for etype in set(ERROR_TYPES.values()):
        assert etype in PERMANENT and not is_transient(etype) and not RetryPolicy().retries(etype)
    assert RetryPolicy.parse("reply_truncated").retries("reply_truncated")


def test_ocr_replies_carry_their_tables_without_a_validity_rule() -> None:
    page = "Prices\n\n<table><tr><th>Item</th><th>Qty</th></tr><tr><td>Pen</td><td>2</td></tr></table>\n\nEnd."
    v = _check(page)
    assert v.ok and v.tables == [{"columns": 2, "rows": [{"header": True, "cells": ["Item", "Qty"]},
                                                         {"header": False, "cells": ["Pen", "2"]}]}]
    assert _check(PROSE).tables is None
    assert _check("| a | b |\n|---|---|\n| 1 | 2 | 3 |").ok  # ragged, but OCR has no table rule

"""Reply checks: the one place that decides whether a model reply may become an `ok` row.

Every engine's replies (transformers, vLLM, the OpenAI-compatible HTTP engine) pass through
`check_reply` in the engine stage (pipeline/infer.py, and pipeline/infer_async.py for vLLM's
streaming path), and `Attempts` drives the retries with the task's temperature schedule. Checks, in
the order they are tried (the first that fails names the reply's failure):

1. **reasoning** - a `<think>...</think>` block is always removed from `text`; a reply with nothing
   besides it (or cut inside it) has no answer: `reasoning_only` (error type `reply_empty`).
2. **empty** - nothing but whitespace: `empty` (`reply_empty`), unless the task is in
   `checks.allow_empty_tasks` (a blank page's OCR, a page without tables).
3. **repetitive** - one loop covers `repetition_min_share` of the text: `repetitive`. Before
   `truncated` because a loop usually also runs to the cap, and the two want different retries: a
   larger token cap helps a long answer, not a loop.
4. **truncated** - `finish_reason == "length"`: `truncated`.
5. **task validity** - `VALIDATORS[task]` (the `table` task: pipeline/tables.py): `invalid`; for a
   task with a `json_schema` or `choices`, the reply against them (pipeline/structured.py, whatever
   `checks.validate_tasks` says: the job asked for that shape): `invalid` with `validation_error`.

The repetition rule is written here (no well-kept library checks LLM output for loops; text-quality
filters such as Gopher's duplicate n-gram fractions flag legitimate tables full of repeated cells).
It looks for the failure as it happens: greedy decoding falls into a loop and stays in it, so the
reply holds one chunk repeated back to back (a table cell, a word, a line), or one line repeated.
On the text with whitespace runs collapsed to one space, for each period p <= max_period it finds
the longest stretch where every character equals the one p places later (numpy, O(n * max_period));
the stretch is a loop of (length + p) / p repeats. Separately, the most frequent non-blank line.
Either fails the reply when it repeats `min_repeats` times or more, spans `min_chars` or more and
covers `min_share` of the characters.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ChecksConfig
from pipeline.engines.base import Reply, Request
from pipeline.tasks import ResolvedTask

#: Error type of a unit whose every attempt failed, by the last attempt's failed check.
ERROR_TYPES = {"truncated": "reply_truncated", "repetitive": "reply_repetitive", "empty": "reply_empty",
               "reasoning_only": "reply_empty", "invalid": "reply_invalid"}
#: Reasoning kept in an error message, at most (the text column keeps the answer only).
_REASONING_SHOWN = 500


@dataclass(frozen=True)
class Verdict:
    """The outcome of the checks for one reply: `text` is the answer without its reasoning block."""

    ok: bool
    text: str
    reason: str | None = None  # a key of ERROR_TYPES
    message: str | None = None
    tables: list[dict[str, Any]] | None = None  # the `table` task's parsed tables
    reasoning: str | None = None  # the reasoning block removed from the reply (results column `reasoning`)
    parsed: Any = None  # a json_schema task's value / a choices task's label (pipeline/structured.py)
    validation_error: str | None = None  # why the reply fails its json_schema / choices


def _table_validity(text: str) -> tuple[Any, str | None]:
    from pipeline.tables import check

    return check(text)


#: Task validity hooks: task name -> f(answer text) -> (parsed value, why it is invalid or None).
#: A task without an entry has no validity check; an empty answer allowed by `allow_empty_tasks`
#: is not validated.
VALIDATORS: dict[str, Callable[[str], tuple[Any, str | None]]] = {"table": _table_validity}


def split_reasoning(text: str, tags: tuple[str, str]) -> tuple[str, str | None, bool]:
    """(answer, reasoning or None, cut inside the block): `text` without its reasoning block.

    Handles a block at the start (`<think>...</think>answer`), an opening tag the engine dropped
    (`...</think>answer`, as chat templates that put `<think>` in the prompt produce) and an
    unclosed block (the cap cut the reasoning: no answer at all).
    """
    open_tag, close_tag = tags
    start = text.find(open_tag)
    end = text.find(close_tag)
    if end >= 0 and (start < 0 or start < end):
        head = text[:start] if start >= 0 else ""
        reasoning = text[(start + len(open_tag)) if start >= 0 else 0:end]
        return (head + text[end + len(close_tag):]).strip(), reasoning.strip(), False
    if start >= 0:  # opened, never closed
        return text[:start].strip(), text[start + len(open_tag):].strip(), True
    return text.strip(), None, False


def repetition(text: str, cfg: ChecksConfig) -> tuple[float, int, int, str] | None:
    """The largest loop of `text` that fails the repetition rule (module docstring), as
    (share of characters, repeats, length in characters, the repeated chunk); None when none does."""
    import numpy as np

    flat = " ".join(text.split())
    n = len(flat)
    if n < cfg.repetition_min_chars:
        return None
    best: tuple[float, int, int, str] | None = None
    codes = np.frombuffer(flat.encode("utf-32-le"), dtype=np.uint32)
    for p in range(1, min(cfg.repetition_max_period, n // cfg.repetition_min_repeats) + 1):
        eq = codes[:-p] == codes[p:]
        if not eq.any():
            continue
        # longest run of True: positions where the run breaks, diffed
        padded = np.concatenate(([0], eq.view(np.int8), [0]))
        edges = np.flatnonzero(np.diff(padded))
        lengths = edges[1::2] - edges[0::2]
        k = int(lengths.argmax())
        span = int(lengths[k]) + p
        repeats = span // p
        share = span / n
        if repeats >= cfg.repetition_min_repeats and span >= cfg.repetition_min_chars and \
                share >= cfg.repetition_min_share and (best is None or share > best[0]):
            best = (share, repeats, span, flat[edges[0::2][k]:edges[0::2][k] + p])
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        line, count = Counter(lines).most_common(1)[0]
        span = count * (len(line) + 1)
        share = span / max(sum(len(ln) + 1 for ln in lines), 1)
        if count >= cfg.repetition_min_repeats and span >= cfg.repetition_min_chars and \
                share >= cfg.repetition_min_share and (best is None or share > best[0]):
            best = (share, count, span, line)
    return best


def check_reply(reply: Reply, task: str, cfg: ChecksConfig,
                validate: Callable[[str], tuple[Any, str | None]] | None = None) -> Verdict:
    """Check one successful engine reply (no `error_type`) for task `task` (module docstring);
    `validate`: the task's json_schema/choices check (ResolvedTask.validate), run after the others."""
    answer, reasoning, cut_inside = split_reasoning(reply.text or "", cfg.reasoning_tags)
    if reply.reasoning:  # a server that returns reasoning apart from the answer (reasoning_content)
        reasoning = (reply.reasoning + ("\n" + reasoning if reasoning else "")).strip()
    verdict = _check(reply, task, cfg, validate, answer, reasoning, cut_inside)
    return dataclasses.replace(verdict, reasoning=reasoning or None)


def _check(reply: Reply, task: str, cfg: ChecksConfig, validate: Callable[[str], tuple[Any, str | None]] | None,
           answer: str, reasoning: str | None, cut_inside: bool) -> Verdict:
    if not cfg.enabled:
        return Verdict(True, answer)
    if not answer.strip() and (reasoning or cut_inside):
        cut = reply.finish_reason == "length" or cut_inside
        return Verdict(False, "", "truncated" if cut else "reasoning_only",
                       ("the token cap cut the reply inside its reasoning block, before any answer" if cut else
                        "the reply holds only a reasoning block, no answer")
                       + f"; reasoning ({len(reasoning or '')} chars): {(reasoning or '')[:_REASONING_SHOWN]!r}")
    if not answer.strip():
        if task in cfg.allow_empty_tasks and validate is None and reply.finish_reason != "length":
            return Verdict(True, "", tables=[] if task in VALIDATORS and cfg.validate_tasks else None)
        return Verdict(False, "", "empty", f"the reply is empty (finish_reason {reply.finish_reason}, "
                       f"{reply.completion_tokens} completion tokens)")
    loop = repetition(answer, cfg)
    if loop is not None:
        share, repeats, span, chunk = loop
        return Verdict(False, answer, "repetitive",
                       f"a loop of {repeats} repeats of {chunk[:80]!r} covers {share:.0%} of the reply ({span} of "
                       f"{len(' '.join(answer.split()))} chars; limit checks.repetition_min_share "
                       f"{cfg.repetition_min_share})")
    if cfg.truncated and reply.finish_reason == "length":
        return Verdict(False, answer, "truncated",
                       f"the reply reached the token cap ({reply.completion_tokens} completion tokens) and was cut")
    if validate is not None:
        value, why = validate(answer)
        if why is not None:
            return Verdict(False, answer, "invalid", f"invalid {task} reply: {why}", validation_error=why)
        return Verdict(True, answer, parsed=value)
    parsed: Any = None
    if cfg.validate_tasks and task in VALIDATORS:
        parsed, why = VALIDATORS[task](answer)
        if why is not None:
            return Verdict(False, answer, "invalid", f"invalid {task} reply: {why}", tables=parsed or None)
    if task == "ocr":
        return Verdict(True, answer, tables=_ocr_tables(answer))
    return Verdict(True, answer, tables=parsed if task == "table" else None)


def _ocr_tables(text: str) -> list[dict[str, Any]] | None:
    """Tables an OCR reply holds (markdown, or HTML as MiniCPM-OCR writes them); None when there are none.
    No validity rule: a page's text is not wrong for holding a ragged table."""
    if "|" not in text and "<table" not in text.lower():
        return None  # most pages: no parse
    from pipeline.tables import parse

    return parse(text)[0] or None


@dataclass
class Attempts:
    """One unit's attempts: feed each reply to `take`, which says what to send next (None: done).

    Retry k (1-based) of a failed reply goes at `task.retry_temperature(k)`; after a cut reply it
    gets `task.retry_max_new_tokens` when set. An engine error (the reply's `error_type`) is not
    retried here: the stage already retried it (engine.max_retries) and it stays that error.
    """

    task: ResolvedTask
    request: Request
    checks: ChecksConfig
    count: int = 0
    reasons: list[str] = field(default_factory=list)  # the failed check of every failed attempt
    temperatures: list[float] = field(default_factory=list)  # sent, attempt by attempt
    reply: Reply | None = None
    verdict: Verdict | None = None

    def __post_init__(self) -> None:
        self.temperatures.append(self.request.temperature)

    def take(self, reply: Reply) -> Request | None:
        self.count += 1
        self.reply = reply
        if reply.error_type:
            self.verdict = None
            return None
        if self.task.thinking and reply.reasoning is None and self.checks.reasoning_tags[0] not in (reply.text or ""):
            # The chat template opened the reasoning block in the prompt (`<think>\n`): the reply starts
            # inside it, so a reply the cap cut before `</think>` is all reasoning, no answer.
            reply = dataclasses.replace(reply, text=self.checks.reasoning_tags[0] + (reply.text or ""))
        structured = self.task.json_schema is not None or bool(self.task.choices)
        self.verdict = v = check_reply(reply, self.task.base or self.task.name, self.checks,
                                       validate=self.task.validate if structured else None)
        if v.ok:
            return None
        self.reasons.append(v.reason or "invalid")
        if self.count > self.task.retries:
            return None
        cap = self.request.max_new_tokens
        if v.reason == "truncated" and self.task.retry_max_new_tokens:
            cap = max(cap, self.task.retry_max_new_tokens)
        self.request = dataclasses.replace(self.request, temperature=self.task.retry_temperature(self.count),
                                           max_new_tokens=cap)
        self.temperatures.append(self.request.temperature)
        return self.request

"""Which error types a rerun retries: transient failures (the run's), not permanent ones (the input's).

A transient error says nothing about the input: the engine crashed or answered 5xx, the network
dropped, a worker died, a unit was lost in a crash. Retrying it can succeed, so a rerun redoes the
task for that source by default. A permanent error is the input's own (a corrupt page, a file too
large, a prompt over the context): retrying gives the same row, so it stays committed unless
`cpmv run --retry-errors TYPE,...` (or `all`) asks for it, e.g. after raising a limit.

Unknown types count as permanent: a rerun must never loop on a failure nobody classed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Error types a rerun retries by default.
TRANSIENT: frozenset[str] = frozenset({
    "engine_error",      # the engine raised or died and could not be revived in the actor
    "lost",              # no rows came back for a source (a stage crashed under it)
    "lost_units",        # some units of a source never came back
    "worker_died",       # a Ray worker or node died under the unit
    "connection_error",  # HTTP engine: connection refused/reset
    "timeout",           # HTTP engine: no answer in time
    "server_error",      # HTTP engine: an error inside a 200 answer
    "bad_response",      # HTTP engine: unparseable answer (a proxy's error page)
    "read_failed",       # the object store failed the read (network, 5xx, throttling)
})
# HTTP 408 (timeout), 429 (rate limit) and every 5xx.
_TRANSIENT_HTTP = re.compile(r"^http_(408|429|5\d\d)$")

#: Error types that describe the input; documented for `--retry-errors` (not exhaustive).
PERMANENT: frozenset[str] = frozenset({
    "empty_file", "unsupported_media_type", "too_large", "task_not_applicable", "page_limit",
    "page_render_failed", "pdf_corrupt", "pdf_encrypted", "pdf_no_pages", "file_too_large", "image_decode_failed",
    "image_too_large",
    "video_decode_failed", "clip_decode_failed", "frame_decode_failed", "video_too_long",
    "preprocess_failed", "prompt_too_long", "page_timeout", "source_timeout", "worker_memory",
    "prompt_template",  # the manifest row's per-row prompt: fixing it changes the fingerprint (redone anyway)
    # Replies that failed the reply checks (pipeline/checks.py) after the task's retries: the same model and
    # input give the same greedy reply and the same temperature schedule again, so a rerun would spend the
    # engine on the same failure. Redo them after changing what decides them: a new max_new_tokens, prompt or
    # model changes the fingerprint (redone anyway); new `checks` thresholds or `retries` need
    # `--retry-errors reply_truncated,...`.
    "reply_truncated", "reply_repetitive", "reply_empty", "reply_invalid",
})


def is_transient(error_type: str | None) -> bool:
    """True for error types a rerun retries by default (TRANSIENT and HTTP 408/429/5xx)."""
    return bool(error_type) and (error_type in TRANSIENT or bool(_TRANSIENT_HTTP.match(error_type)))


class RetryPolicy:
    """Which committed error rows a run redoes: transient ones always, plus `extra` types (or all)."""

    def __init__(self, extra: Iterable[str] = (), retry_all: bool = False):
        self.extra = frozenset(extra)
        self.retry_all = retry_all

    @classmethod
    def parse(cls, value: str | None) -> "RetryPolicy":
        """From `--retry-errors`: None (flag absent), "" or "all" (every error type), or "a,b,c"."""
        if value is None:
            return cls()
        names = [v.strip() for v in value.split(",") if v.strip()]
        if not names or names == ["all"]:
            return cls(retry_all=True)
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_]+", n)]
        if bad:
            raise ValueError(f"--retry-errors: {bad[0]!r} is not an error type (letters, digits, _)")
        return cls(extra=names)

    def retries(self, error_type: str | None) -> bool:
        """Whether a committed row with this error type is redone by this run."""
        if not error_type:
            return False
        return self.retry_all or error_type in self.extra or is_transient(error_type)

    def describe(self) -> str:
        if self.retry_all:
            return "all error types"
        return "transient error types" + (f" and {', '.join(sorted(self.extra))}" if self.extra else "")

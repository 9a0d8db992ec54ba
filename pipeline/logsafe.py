"""Logging that keeps credentials out: a filter on the CLI's log handler that redacts every record.

With `-v`, botocore logs each signed request at DEBUG, with its `Authorization` header
(`Credential=<access key id>/...`, `Signature=...`) and any `X-Amz-Security-Token`; a normal run
logs exception texts that may hold URLs with user-info. The filter runs on the handler, so it sees
the records of every logger (ours, botocore, s3fs, Ray's driver-side loggers) after their message
is formatted, and rewrites message and traceback text through `storage.redact`.
"""

from __future__ import annotations

import logging

# Imported now, not in `filter`: a record logged from a signal handler can arrive in the middle of
# another import (pyarrow's), and importing storage there would find pyarrow half initialised.
from pipeline.storage import redact


class RedactingFilter(logging.Filter):
    """Replace known credentials and signed-request parameters in a record's text with `***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def configure(level: int) -> None:
    """Root logging for the CLI at `level`, every handler behind a RedactingFilter."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())

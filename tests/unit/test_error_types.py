"""The README lists every error type the code can produce (and no messages carry per-run noise)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.media.base import describe
from pipeline.watchdog import KINDS

ROOT = Path(__file__).resolve().parents[2]
# Where an error type is written in the code: raised, assigned, returned with its message, or a
# conditional's other branch.
PATTERNS = [r'MediaError\(\s*"([a-z_]+)"', r'error_type\s*=\s*"([a-z_]+)"', r'\betype[^=\n]*=\s*(?:"partial",\s*)?"([a-z_]+)"',
            r'_Failure\(\s*"([a-z_]+)"', r'return "([a-z_]+)", \(?f?"', r'"error_type": "([a-z_]+)"',
            r'\.error\s*=\s*"([a-z_]+)"', r'PROMPT_TOO_LONG\s*=\s*"([a-z_]+)"', r'else "([a-z_]+)"\s*,\s*\n?\s*(?:message|error_message)',
            r'error_type=[^,\n]* else "([a-z_]+)"', r'if _TOO_LONG\.search\(message\) else "([a-z_]+)"']


def code_error_types() -> set[str]:
    found = set(KINDS)
    for path in (ROOT / "pipeline").rglob("*.py"):
        text = path.read_text()
        for pattern in PATTERNS:
            found.update(m.group(1) for m in re.finditer(pattern, text))
    return found


def test_readme_lists_every_error_type() -> None:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("<!-- error-types:begin -->"):text.index("<!-- error-types:end -->")]
    listed = set(re.findall(r"`([a-z_]+)`", table))
    found = code_error_types()
    assert {"image_too_small", "page_missing_content", "no_video_stream", "frame_decode_failed",
            "frames_skipped", "page_timeout"} <= found  # the scan sees each way a type is written
    assert not found - listed, f"error types missing from the README table: {sorted(found - listed)}"


@pytest.mark.parametrize("err, text", [
    (TypeError("cannot read <_io.BytesIO object at 0x7fdb3c2a1b80>"), "cannot read <_io.BytesIO>"),
    (ValueError("bad pointer 0x7fdb3c2a1b80 here"), "bad pointer <address> here"),
    (OSError(), "OSError"),
    (ValueError("  spread\n over   lines "), "spread over lines"),
])
def test_describe_removes_per_run_noise(err: Exception, text: str) -> None:
    assert describe(err) == text

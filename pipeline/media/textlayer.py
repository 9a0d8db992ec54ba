"""PDF text-layer quality: when a page's embedded text can stand in for OCR.

Broken font encodings produce text layers full of U+FFFD, control characters or private-use
glyphs; scans carry no text layer or a few stray characters. The rule is stated and simple: enough
characters, and nearly all of them printable.
"""

from __future__ import annotations

import unicodedata

_BAD_CATEGORIES = {"Cc", "Co", "Cs", "Cn"}  # control, private use, surrogate, unassigned


def quality(text: str | None) -> float | None:
    """Fraction of non-whitespace characters that are printable; None without a text layer."""
    if text is None:
        return None
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    bad = sum(1 for c in chars if c == "\ufffd" or unicodedata.category(c) in _BAD_CATEGORIES)
    return 1.0 - bad / len(chars)


def usable(text: str | None, min_chars: int, min_quality: float) -> bool:
    """True when the text layer passes the job's rule (`pdf.text_layer_min_chars` / `min_quality`)."""
    if not text:
        return False
    n = sum(1 for c in text if not c.isspace())
    q = quality(text)
    return n >= min_chars and q is not None and q >= min_quality

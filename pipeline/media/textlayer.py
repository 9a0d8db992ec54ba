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
    packed = "".join(text.split())
    if not packed:
        return 0.0
    # Fast path (almost every born-digital page): isprintable() is False for every character of
    # the bad categories (all are "Other"), so a printable text has only U+FFFD left to count.
    if packed.isprintable():
        return 1.0 - packed.count("\ufffd") / len(packed)
    bad = sum(1 for c in packed if c == "\ufffd" or unicodedata.category(c) in _BAD_CATEGORIES)
    return 1.0 - bad / len(packed)


def usable(text: str | None, min_chars: int, min_quality: float) -> bool:
    """True when the text layer passes the job's rule (`pdf.text_layer_min_chars` / `min_quality`)."""
    if not text:
        return False
    n = sum(1 for c in text if not c.isspace())
    q = quality(text)
    return n >= min_chars and q is not None and q >= min_quality

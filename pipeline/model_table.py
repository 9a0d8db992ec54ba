"""`cpmv models`: which engine serves which MiniCPM generation, generated from the family table.

The rows come from pipeline.models.FAMILIES (`engines`, `note`); how each pair is tested is kept
here next to it, one line per pair, naming the test file. The README's table is this module's
markdown output, and tests/unit/test_model_table.py fails when the two drift apart.
"""

from __future__ import annotations

import json

from pipeline.models import FAMILIES

ENGINES = ("transformers", "vllm", "openai")

#: (family, engine) -> how that pair is tested in CI. A served pair missing here reads "not tested".
TESTED: dict[tuple[str, str], str] = {
    **{(f, "transformers"): "tiny checkpoint, CPU (tests/engines/test_tiny_models.py)"
       for f in ("minicpmv4_6", "minicpmv4_7", "minicpm_ocr")},
    ("minicpmv4_6", "vllm"): "tiny checkpoint, vLLM CPU (tests/vllm/test_vllm_engine.py)",
    ("minicpmv4_5", "vllm"): "tiny checkpoint, vLLM CPU (tests/vllm/test_vllm_engine.py)",
    ("minicpmv4_0", "vllm"): "tiny checkpoint, vLLM CPU (tests/vllm/test_vllm_engine.py)",
    ("minicpmv2_6", "vllm"): "tiny checkpoint, vLLM CPU (tests/vllm/test_vllm_engine.py)",
    ("minicpmv2_5", "vllm"): "tiny checkpoint with the real 2.5 processor and tokenizer config, vLLM CPU "
                             "(tests/vllm/test_v25_vllm.py)",
    ("minicpmv2_0", "vllm"): "tiny checkpoint with the real 2.0 processor, vLLM CPU (tests/vllm/test_v20_vllm.py)",
    ("minicpmv4_6", "openai"): "local HTTP server (tests/engines/test_openai_engine.py)",
    ("minicpmv4_5", "openai"): "local HTTP server (tests/engines/test_openai_engine.py)",
}


def rows() -> list[dict]:
    """One row per family: name, display, and per engine "served"/"-" plus how it is tested."""
    out = []
    for spec in FAMILIES.values():
        row = {"family": spec.name, "display": spec.display, "engines": list(spec.engines), "note": spec.note,
               "tested": {e: TESTED.get((spec.name, e), "not tested") for e in spec.engines}}
        out.append(row)
    return out


def markdown() -> str:
    """The README table: generations x engines, each cell "yes: <how tested>" or "no"."""
    lines = ["| generation | family | " + " | ".join(ENGINES) + " |", "|---|---|" + "---|" * len(ENGINES)]
    for row in rows():
        cells = [f"yes: {row['tested'][e]}" if e in row["engines"] else "no" for e in ENGINES]
        if not row["engines"]:
            cells[-1] = f"no ({row['note']})"
        lines.append(f"| {row['display']} | `{row['family']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def text() -> str:
    """Plain listing for a terminal: family, engines that serve it (or why none does)."""
    width = max(len(r["family"]) for r in rows())
    out = []
    for row in rows():
        served = ", ".join(row["engines"]) if row["engines"] else f"none: {row['note']}"
        if row["engines"] and row["note"]:  # served, but not by every engine: say why
            served += f" ({row['note']})"
        out.append(f"{row['family']:<{width}}  {row['display']:<22}  {served}")
    return "\n".join(out) + "\n"


def render(fmt: str) -> str:
    """`fmt`: text, markdown or json (one object per family per line)."""
    if fmt == "markdown":
        return markdown()
    if fmt == "json":
        return "".join(json.dumps(r) + "\n" for r in rows())
    return text()

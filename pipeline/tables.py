"""Tables in a reply as data: GFM markdown tables and HTML tables, parsed into rows of cells.

The `table` task asks for GitHub-flavoured markdown tables; MiniCPM-OCR writes HTML `<table>`s. Both
become the results column `tables` (schemas/records.py TABLE_TYPE)::

    [{"columns": 3, "rows": [{"header": True, "cells": ["a", "b", "c"]}, {"header": False, "cells": [...]}]}]

Parsers: markdown-it-py (its GFM table rule) for markdown and lxml.html for HTML, both well kept. What
they do not tell is written here: markdown-it pads or cuts every body row to the header's width (the
GFM spec), so a row the model wrote with a different cell count is counted on its source line (the
token's `map`); HTML `colspan`/`rowspan` are expanded into repeated cells so every row has one cell per
column, as cell-level evaluation needs.

`check` is the `table` task's validity rule (pipeline/checks.py): at least one table, every table with
at least one row below its header and one column count throughout.
"""

from __future__ import annotations

import re
from typing import Any

#: Most cells a reply's tables may hold together (a bound on output size; a larger reply is invalid).
MAX_CELLS = 100_000
_PIPE = re.compile(r"(?<!\\)\|")
_SPACE = re.compile(r"\s+")


def parse(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(tables in reading order, problems found): markdown tables first, then HTML tables.

    A problem is a row whose cell count differs from its table's; the tables are still returned
    (markdown rows as the GFM spec reads them, HTML rows padded with empty cells).
    """
    if not text or not text.strip():
        return [], []
    tables, problems = _markdown(text)
    if "<table" in text.lower():
        more, why = _html(text)
        tables += more
        problems += why
    return tables, problems


def check(text: str) -> tuple[list[dict[str, Any]], str | None]:
    """(tables, None) when `text` holds valid tables, else (what was parsed, why it is invalid)."""
    tables, problems = parse(text)
    if not tables:
        return [], "no markdown or HTML table found in the reply"
    if problems:
        return tables, "; ".join(problems[:3])
    for k, t in enumerate(tables):
        if not any(not r["header"] for r in t["rows"]):
            return tables, f"table {k + 1} has no row below its header"
    if sum(len(r["cells"]) for t in tables for r in t["rows"]) > MAX_CELLS:
        return tables, f"the tables hold more than {MAX_CELLS} cells"
    return tables, None


def _markdown(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    from markdown_it import MarkdownIt

    lines = text.splitlines()
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    tables: list[dict[str, Any]] = []
    problems: list[str] = []
    row: dict[str, Any] | None = None
    in_head = False
    for tok in tokens:
        if tok.type == "table_open":
            tables.append({"columns": 0, "rows": []})
        elif tok.type in ("thead_open", "thead_close"):
            in_head = tok.type == "thead_open"
        elif tok.type == "tr_open":
            row = {"header": in_head, "cells": []}
            if tok.map and not in_head:
                raw = _raw_cells(lines[tok.map[0]])
                width = tables[-1]["columns"]
                if raw != width:
                    problems.append(f"table {len(tables)}: row {len(tables[-1]['rows']) + 1} has {raw} cells, "
                                    f"the header {width}")
        elif tok.type == "inline" and row is not None:
            row["cells"].append(tok.content.strip())
        elif tok.type == "tr_close" and row is not None:
            tables[-1]["rows"].append(row)
            if row["header"]:
                tables[-1]["columns"] = len(row["cells"])
            row = None
    return tables, problems


def _raw_cells(line: str) -> int:
    """Cells of one markdown table row as written: unescaped pipes split it, outer pipes optional."""
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    return len(_PIPE.split(s))


def _html(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    import lxml.html

    try:
        root = lxml.html.fromstring(f"<div>{text}</div>")
    except Exception as err:  # noqa: BLE001 - lxml raises ParserError and others on garbage
        return [], [f"HTML tables could not be parsed: {err}"]
    tables, problems = [], []
    for node in root.iter("table"):
        grid: list[dict[str, Any]] = []
        pending: dict[int, tuple[str, int]] = {}  # column -> (text, rows still spanned) from rowspans above
        widths = []
        for tr in node.iter("tr"):
            if tr.getparent() is not node and tr.getparent().getparent() is not node:
                continue  # a row of a nested table: that table is listed on its own
            cells: list[str] = []
            col = 0
            tags = []
            for cell in tr:
                if cell.tag not in ("td", "th"):
                    continue
                while col in pending:
                    col = _take(pending, col, cells)
                value = _SPACE.sub(" ", cell.text_content()).strip()
                span_c, span_r = _span(cell.get("colspan")), _span(cell.get("rowspan"))
                for _ in range(span_c):
                    cells.append(value)
                    if span_r > 1:
                        pending[col] = (value, span_r - 1)
                    col += 1
                tags.append(cell.tag)
            while col in pending:
                col = _take(pending, col, cells)
            if not cells:
                continue
            header = tr.getparent().tag == "thead" or all(t == "th" for t in tags)
            grid.append({"header": header, "cells": cells})
            widths.append(len(cells))
        if not grid:
            continue
        columns = max(widths)
        k = len(tables) + 1
        for i, row in enumerate(grid):
            if len(row["cells"]) != columns:
                problems.append(f"HTML table {k}: row {i + 1} has {len(row['cells'])} cells, others {columns}")
                row["cells"] += [""] * (columns - len(row["cells"]))
        tables.append({"columns": columns, "rows": grid})
    return tables, problems


def _take(pending: dict[int, tuple[str, int]], col: int, cells: list[str]) -> int:
    """Fill column `col` with the cell a rowspan above carries down; the next column."""
    value, left = pending.pop(col)
    cells.append(value)
    if left > 1:
        pending[col] = (value, left - 1)
    return col + 1


def _span(value: str | None) -> int:
    """A colspan/rowspan attribute as a count in 1..1000 (bounded: a reply may say anything)."""
    try:
        return min(max(int(value or 1), 1), 1000)
    except ValueError:
        return 1

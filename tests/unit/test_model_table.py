"""`cpmv models` and the README's generations x engines table, both from the family table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline import model_table
from pipeline.models import FAMILIES

ROOT = Path(__file__).resolve().parents[2]


def test_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- models-table:start -->\n", "<!-- models-table:end -->"
    assert start in readme and end in readme
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == model_table.markdown(), "README table is stale: regenerate with `cpmv models list --format markdown`"


def test_every_family_has_a_row_and_cells_follow_the_engines():
    rows = {r["family"]: r for r in model_table.rows()}
    assert set(rows) == set(FAMILIES)
    for name, spec in FAMILIES.items():
        assert rows[name]["engines"] == list(spec.engines)
        assert set(rows[name]["tested"]) == set(spec.engines)
    for family, engine in model_table.TESTED:  # no claim about a pair the table says is not served
        assert engine in FAMILIES[family].engines, (family, engine)
        path = model_table.TESTED[family, engine].split("(", 1)[1].split(")")[0].split(",")[0].strip()
        assert (ROOT / path).is_file(), path


def test_cli_lists_engines_per_family():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "models", "list", "--format", "json"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    by_name = {r["family"]: r for r in rows}
    assert by_name["minicpmv2_0"]["engines"] == ["vllm"] and "apply_chat_template" in by_name["minicpmv2_0"]["note"]
    assert by_name["minicpmv1_0"]["engines"] == [] and "vLLM cannot load it" in by_name["minicpmv1_0"]["note"]
    plain = subprocess.run([sys.executable, "-m", "pipeline.cli", "models"], capture_output=True, text=True,
                           check=True, cwd=ROOT).stdout
    assert "omnilmm_12b" in plain and "none:" in plain

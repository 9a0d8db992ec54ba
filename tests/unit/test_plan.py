"""`cpmv plan`: real preprocessing of a sample; with the whole demo corpus it agrees with `cpmv inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.samples import make_bad_corpus, make_demo_corpus

ROOT = Path(__file__).resolve().parents[2]
RATES = ["--gpu-rate", "pdf=20", "--gpu-rate", "image=10", "--gpu-rate", "video=60"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("plan")
    make_demo_corpus(d / "corpus")
    job = d / "job.yaml"
    job.write_text((ROOT / "jobs" / "demo.yaml").read_text().replace("demo/corpus/", f"{d / 'corpus'}/")
                   .replace("demo/out", str(d / "out")))
    return d, job


def run_plan(capsys, job: Path, out: Path, *argv: str) -> tuple[int, dict | None, str]:
    rc = main(["plan", str(job), "--set", "model.family=minicpmv4_6", "--json", str(out), *argv])
    cap = capsys.readouterr()
    return rc, json.loads(out.read_text()) if rc == 0 else None, cap.out + cap.err


def test_whole_corpus_plan_agrees_with_inspect_token_totals(capsys, demo):
    d, job = demo
    rc, plan, text = run_plan(capsys, job, d / "p.json", "--sample", "100", *RATES, "--usd-per-gpu-hour", "3")
    assert rc == 0, text
    rc = main(["inspect", str(d / "corpus"), "--job", str(job), "--set", "model.family=minicpmv4_6", "--summary"])
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["summary"]
    assert rc == 0 and plan["sampled"] == plan["sources"] == summary["sources"] == 5
    (fam,) = plan["families"]
    assert fam["family"] == "minicpmv4_6"
    assert fam["visual_tokens"] == summary["visual_tokens"] > 0
    assert fam["placeholder_tokens"] == summary["placeholder_tokens"]
    assert fam["units_total"] + fam["failed_units"] == summary["units"] and summary["failed"] == 0
    # requests: each unit once per task that applies to its kind; output at max_new_tokens (an upper bound)
    assert fam["requests"] == {"ocr": fam["units"]["page"] + fam["units"]["image"], "caption": fam["units"]["page"] + fam["units"]["image"],
                               "video_caption": fam["units"]["clip"]}
    assert fam["output_tokens"] == 64 * fam["requests"]["ocr"] + 32 * (fam["requests"]["caption"]
                                                                       + fam["requests"]["video_caption"])
    gpu_s = fam["units"]["page"] / 20 + fam["units"]["image"] / 10 + fam["frames"] / 60
    assert fam["engine_gpu_s"] == round(gpu_s, 1) and fam["gpu_hours"] == round(gpu_s / 3600, 4)
    assert fam["usd"] == round(gpu_s / 3600 * 3, 2)
    assert set(fam["cpu_cores_per_gpu"]) == {"pdf", "image", "video"} and all(
        v > 0 for v in fam["cpu_cores_per_gpu"].values())
    assert "visual tokens" in text and f"{summary['visual_tokens']}" in text


def test_a_sample_is_scaled_by_source_count(capsys, demo):
    d, job = demo
    rc, plan, text = run_plan(capsys, job, d / "s.json", "--sample", "2", "--seed", "1", *RATES,
                              "--output-tokens", "ocr=100", "--family", "minicpmv4_6", "--family", "minicpmv4_5")
    assert rc == 0, text
    assert plan["sampled"] == 2 and plan["scaled_by"] == "source count x2.500"
    assert [f["family"] for f in plan["families"]] == ["minicpmv4_6", "minicpmv4_5"]
    for fam in plan["families"]:
        m = fam["sample"]
        assert fam["visual_tokens"] == round(m["visual_tokens"] * 2.5)
        assert fam["units_total"] == round(sum(m["units"].values()) * 2.5)
        assert fam["output_tokens_per_request"]["ocr"] == 100


def test_bad_arguments_fail_fast(capsys, demo, tmp_path, monkeypatch):
    d, job = demo
    rc, _, text = run_plan(capsys, job, tmp_path / "x.json", "--gpu-rate", "gpu=3")
    assert rc == 2 and "--gpu-rate 'gpu=3'" in text
    monkeypatch.chdir(tmp_path)  # no bench/results here
    rc, _, text = run_plan(capsys, job, tmp_path / "x.json")
    assert rc == 2 and "no GPU rates" in text and "--gpu-rate" in text
    rc, _, text = run_plan(capsys, job, tmp_path / "x.json", *RATES, "--output-tokens", "summary=5")
    assert rc == 2 and "not among the job's tasks" in text


def test_failed_sources_are_counted_not_fatal(capsys, tmp_path):
    make_bad_corpus(tmp_path / "corpus")
    job = tmp_path / "job.yaml"
    job.write_text(f"name: bad\ninput: {{uris: ['{tmp_path / 'corpus'}/']}}\noutput: {{uri: '{tmp_path / 'out'}'}}\n"
                   "model: {name: tiny}\ntasks: [{name: ocr}, {name: video_caption}]\n")
    rc, plan, text = run_plan(capsys, job, tmp_path / "b.json", *RATES)
    assert rc == 0, text
    assert plan["families"][0]["failed_units"] >= 3

"""`video.stack_frames` through the expand and engine stages with a tiny MiniCPM-V 4.6 (transformers), and
the engines and settings that must refuse it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import ConfigError, load_job_data
from pipeline.engines.base import Request, VideoStack, check_stack
from pipeline.expand import ExpandSource
from pipeline.infer import InferStage, RunContext
from pipeline.samples import clip_mp4_bytes
from pipeline.tasks import fingerprint, resolve_task


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack")
    (d / "clip.mp4").write_bytes(clip_mp4_bytes(seconds=5.0, fps=10, size=(96, 64)))
    return d


def _job(corpus, cache, stack):
    return load_job_data({"input": {"uris": [str(corpus)]}, "output": {"uri": "o"},
                          "model": {"name": "tiny", "cache_dir": str(cache)},
                          "video": {"stack_frames": stack, "clip_seconds": 3},
                          "tasks": [{"name": "video_caption", "max_new_tokens": 2}],
                          "checks": {"enabled": False}})  # tiny random replies run to the cap


def _run(job):
    tasks = {t.name: resolve_task(t) for t in job.tasks}
    ctx = RunContext("r", "tiny:minicpmv4_6", "minicpmv4_6", "transformers", tasks,
                     {n: fingerprint(t, job.model, "tiny") for n, t in tasks.items()})
    expand = ExpandSource(job, 448 * 448, {"video_caption": ["clip"]}, "minicpmv4_6")
    src = pa.Table.from_pylist([{"source_uri": job.input.uris[0] + "/clip.mp4", "source_id": "clip", "size": None,
                                 "tasks": ["video_caption"]}])
    units = pa.concat_tables(list(expand(src)))
    rows = InferStage(job, ctx)(units).to_pylist()
    return units.to_pylist(), {r["unit_index"]: r for r in rows}


def test_stacked_clips_run_and_cost_what_the_plan_says(corpus, tmp_path_factory):
    from pipeline.media.slicing import plan_stacked_video, plan_video
    from pipeline.media.stacking import stack_layout

    cache = tmp_path_factory.mktemp("cache")
    plain_units, plain = _run(_job(corpus, cache, 1))
    stacked_units, stacked = _run(_job(corpus, cache, 3))
    assert [u["stack_frames"] for u in stacked_units] == [3, 3]
    assert all(u["stack_frames"] is None for u in plain_units)
    assert all(r["status"] == "ok" and r["completion_tokens"] >= 1 for r in [*plain.values(), *stacked.values()])
    # The prompts differ only in their visual tokens, by exactly what the plans say (the processor
    # built the composites from our frames and expanded them; see tests/unit/test_stacking.py).
    for unit, plain_unit in zip(stacked_units, plain_units):
        layout = stack_layout(unit["end_s"] - unit["start_s"], 16, 3)
        assert unit["num_frames"] == layout.num_frames
        w, h = unit["width"], unit["height"]
        extra = (plan_stacked_video("minicpmv4_6", w, h, layout.units()).placeholder_tokens
                 - plan_video("minicpmv4_6", w, h, plain_unit["num_frames"]).placeholder_tokens)
        i = unit["unit_index"]
        assert stacked[i]["prompt_tokens"] - plain[i]["prompt_tokens"] == extra


def test_a_stacked_clip_with_the_wrong_frames_fails_alone():
    frames = [np.zeros((48, 64, 3), np.uint8)] * 5
    request = Request("describe", frames, is_video=True, stack=VideoStack(n=2, duration_s=3.0, max_num_frames=16))
    with pytest.raises(ValueError, match="needs 6 frames"):
        check_stack(request, supported=True)
    with pytest.raises(ValueError, match="engine.kind transformers"):
        check_stack(request, supported=False)  # what vLLM's and the HTTP engine's request checks say
    from pipeline.engines.openai_http import _check_request

    with pytest.raises(ValueError, match="stack_frames"):
        _check_request(request)


def test_stack_frames_is_checked_against_family_and_engine(tmp_path):
    from pipeline.engines.factory import check_job

    job = load_job_data({"input": {"uris": [str(tmp_path)]}, "output": {"uri": "o"}, "video": {"stack_frames": 2},
                         "tasks": [{"name": "video_caption"}]})
    check_job(job, "minicpmv4_6", "transformers")
    check_job(job, "minicpm_ocr", "transformers")
    with pytest.raises(ConfigError, match="video.stack_frames"):
        check_job(job, "minicpmv4_7", "transformers")
    with pytest.raises(ConfigError, match="engine.kind transformers"):
        check_job(job, "minicpmv4_6", "vllm")
    plain = load_job_data({"input": {"uris": [str(tmp_path)]}, "output": {"uri": "o"},
                           "tasks": [{"name": "video_caption"}]})
    check_job(plain, "minicpmv4_7", "vllm")

"""MiniCPM-V 4.6 `stack_frames`: our sampling layout against the reference video processors (transformers'
own 4.6 and MiniCPM-OCR 1.0 classes), and our token plan against the processor's expansion."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.media.stacking import STACK_FAMILIES, stack_layout

transformers = pytest.importorskip("transformers")

DURATIONS = [0.3, 1.0, 1.5, 2.0, 2.95, 3.0, 4.0, 7.25, 15.9, 16.0, 16.01, 23.3, 30.0, 47.5]
MAX_FRAMES = [1, 3, 4, 16, 64]
STACKS = [1, 2, 3, 4, 5]


def _video_processor(family: str):
    if family == "minicpmv4_6":
        from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor as cls
    else:
        from transformers.models.minicpm_ocr.video_processing_minicpm_ocr import MiniCPMOcrVideoProcessor as cls
    return cls()


@pytest.mark.parametrize("family", STACK_FAMILIES)
def test_layout_samples_the_frames_the_reference_samples(family: str) -> None:
    """Every (duration, max_num_frames, n): the reference's frame indices at 100 fps are our times' frames."""
    from transformers.video_utils import VideoMetadata

    proc = _video_processor(family)
    fps = 100.0
    checked = 0
    for duration in DURATIONS:
        total = math.ceil(duration * fps)
        meta = VideoMetadata(total_num_frames=total, fps=fps, duration=duration)
        for max_frames in MAX_FRAMES:
            for n in STACKS:
                ref = list(proc.sample_frames(meta, max_num_frames=max_frames, stack_frames=n))
                layout = stack_layout(duration, max_frames, n)
                ours = [min(int(t * fps), total - 1) for t in layout.main + layout.sub]
                assert ours == ref, (duration, max_frames, n)
                assert layout.num_frames == len(ref)
                assert sum(layout.groups) == len(layout.sub)
                checked += 1
    assert checked == len(DURATIONS) * len(MAX_FRAMES) * len(STACKS)


def test_layout_basics() -> None:
    layout = stack_layout(3.0, 16, 3)
    assert layout.main == [0.0, 1.0, 2.0]
    assert layout.sub == pytest.approx([1 / 3, 2 / 3, 4 / 3, 5 / 3, 7 / 3, 8 / 3])
    assert layout.groups == [2, 2, 2] and layout.units() == [0, 2, 0, 2, 0, 2]
    # a second cut short by the clip's end gets a smaller composite; n == 1 is plain 1 fps sampling
    assert stack_layout(2.5, 16, 4).groups == [3, 3, 1]
    plain = stack_layout(4.0, 16, 1)
    assert plain.sub == [] and plain.units() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        stack_layout(0, 16, 2)


@pytest.fixture(scope="module", params=STACK_FAMILIES)
def processor(request, tmp_path_factory):
    from transformers import AutoProcessor

    from pipeline.tiny import build_tiny

    path = build_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("duration,n,max_frames,size", [
    (3.0, 2, 16, (64, 48)), (2.5, 4, 16, (48, 64)), (4.0, 3, 16, (90, 40)), (20.0, 2, 4, (64, 48)),
    (1.0, 5, 16, (30, 100)), (0.6, 3, 16, (64, 64)),
])
def test_token_plan_matches_the_processor(processor, duration, n, max_frames, size) -> None:
    """The processor builds the composites from our frames, and expands the video to exactly as many
    video tokens as plan_stacked_video counts (canvas sizes, grouping and per-unit plans together)."""
    from transformers.video_utils import VideoMetadata

    from pipeline.media.slicing import plan_stacked_video

    family, proc = processor
    layout = stack_layout(duration, max_frames, n)
    w, h = size
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (layout.num_frames, h, w, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "describe"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = proc(text=[text], videos=[video], do_sample_frames=False, stack_frames=n, max_num_frames=max_frames,
               video_metadata=[VideoMetadata(total_num_frames=len(video), fps=len(video) / duration,
                                             duration=duration)],
               input_data_format="channels_last", return_tensors="np")
    video_token = proc.tokenizer.convert_tokens_to_ids(proc.video_token)
    plan = plan_stacked_video(family, w, h, layout.units())
    assert int((out["input_ids"][0] == video_token).sum()) == plan.visual_tokens
    assert len(out["target_sizes_videos"]) >= len(layout.units())  # one entry per unit (more when sliced)

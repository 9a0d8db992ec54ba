"""Video frames reach the engine at the size the model's processor uses for them, resampled once.

Before, frames were cut to `video.max_side` 448 on the CPU and the processor then enlarged a
1920x1080 frame's overview to 602x336 (2.6-4.5): ~44% of the reference's pixels were lost. Now the
decoder scales each frame straight to the processor's size; the processor's own resize is a no-op.
Checked against the real 2.6/4.x remote-code processor (../shared/reference, via tests/reference.py)
and, for 4.6, against the slicing plan (itself checked against the transformers processor).
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.config import load_job_data
from pipeline.expand import ExpandSource
from pipeline.media.slicing import plan_video_frame
from pipeline.models import FAMILIES, pixel_budget
from pipeline.samples import clip_mp4_bytes
from schemas.records import MARKER_KIND
from tests.reference import image_processor


def _clip_rows(tmp_path, family: str, size: tuple[int, int], **video) -> list[dict]:
    data = clip_mp4_bytes(seconds=1.0, fps=5, size=size)
    path = tmp_path / f"{family}-{size[0]}x{size[1]}.mp4"
    path.write_bytes(data)
    cfg = load_job_data({"input": {"uris": [str(path)]}, "output": {"uri": "o"},
                         "tasks": [{"name": "video_caption"}], "video": {"fps": 2, **video}})
    spec = FAMILIES[family]
    stage = ExpandSource(cfg, pixel_budget(spec, spec.image_max_slice_nums), {"video_caption": ["clip"]}, family)
    src = pa.Table.from_pylist([{"source_uri": str(path), "source_id": "v", "size": len(data),
                                 "tasks": ["video_caption"]}])
    return [r for t in stage(src) for r in t.to_pylist() if r["unit_kind"] == "clip"]


@pytest.mark.parametrize("family", ["minicpmv2_6", "minicpmv4_0", "minicpmv4_5"])
@pytest.mark.parametrize("size", [(1920, 1080), (1280, 720), (720, 1280)])
def test_frames_arrive_at_the_reference_processors_frame_size(tmp_path, family, size):
    ip = image_processor(family)
    # vLLM's video frames: max_slice_nums=1 -> never sliced -> find_best_resize(..., allow_upscale=True)
    assert ip.get_sliced_grid(size, 1) is None
    want = tuple(ip.find_best_resize(size, ip.scale_resolution, ip.patch_size, allow_upscale=True))
    (clip,) = _clip_rows(tmp_path, family, size)
    assert (clip["width"], clip["height"]) == want
    # The processor's resize of such a frame is a no-op: one resampling in all.
    assert tuple(ip.find_best_resize(want, ip.scale_resolution, ip.patch_size, allow_upscale=True)) == want
    if size == (1920, 1080):
        assert want == (602, 336)  # the figure; max_side 448 gave 448x252 (56% of its pixels)


def test_native_frames_arrive_at_the_planned_overview(tmp_path):
    (clip,) = _clip_rows(tmp_path, "minicpmv4_6", (1920, 1080))
    assert (clip["width"], clip["height"]) == plan_video_frame("minicpmv4_6", 1920, 1080).overview


def test_small_frames_are_never_upscaled_and_max_side_still_caps(tmp_path):
    (small,) = _clip_rows(tmp_path, "minicpmv2_6", (320, 240))
    assert (small["width"], small["height"]) == (320, 240)  # the processor upsamples, not the CPU
    (capped,) = _clip_rows(tmp_path, "minicpmv2_6", (1920, 1080), max_side=448)
    assert max(capped["width"], capped["height"]) <= 448

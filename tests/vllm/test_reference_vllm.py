"""Our plans against vLLM 0.32's own MiniCPM-V placeholder functions, over the real processors.

vLLM's `minicpmv.py` (../shared/reference/vllm_0.32.0_minicpmv.py, imported from there as a module of
the installed vLLM package so its relative imports resolve; never copied) decides what the model
sees: `MiniCPMVMultiModalProcessor.get_image_prompt_texts` (always `use_image_id=True` for 2.6+,
the processor's own text for 2.0/2.5), `get_video_prompt_texts` (one unsliced, id-less placeholder
per frame) and `MiniCPMVProcessingInfo.get_num_image_tokens`. They are called unbound on a small
stand-in for vLLM's processing context that hands them the real remote-code image processor, so no
engine starts. Needs .venv-vllm: `.venv-vllm/bin/python -m pytest tests/vllm/test_reference_vllm.py`.
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("vllm")

from pipeline.media.slicing import plan_image, plan_video  # noqa: E402
from pipeline.models import vllm_placeholder_image_id  # noqa: E402
from tests.reference import image_processor, load  # noqa: E402
from tests.unit.test_reference_processors import count_tokens  # noqa: E402
from tests.unit.test_slicing import random_sizes  # noqa: E402

VERSIONS = {"minicpmv2_0": (2, 0), "minicpmv2_5": (2, 5), "minicpmv2_6": (2, 6), "minicpmv4_0": (4, 0),
            "minicpmv4_5": (4, 5)}


@pytest.fixture(scope="module")
def vllm_minicpmv():
    return load("vllm_0.32.0_minicpmv", module_name="vllm.model_executor.models.cpmv_reference_minicpmv")


def _processor(ref, family: str, max_slice_nums: int):
    """vLLM's MiniCPMVMultiModalProcessor methods bound to a stand-in context (the real processor)."""
    ip = image_processor(family, max_slice_nums=max_slice_nums)
    info_cls, proc_cls = ref.MiniCPMVProcessingInfo, ref.MiniCPMVMultiModalProcessor

    class Info:
        get_image_processor = staticmethod(lambda **kwargs: ip)
        get_model_version = staticmethod(lambda: VERSIONS[family])
        get_slice_image_placeholder = info_cls.get_slice_image_placeholder
        get_sliced_grid = info_cls.get_sliced_grid
        get_num_image_tokens = info_cls.get_num_image_tokens
        get_video_max_slice_num = info_cls.get_video_max_slice_num

    class Processor:
        info = Info()
        get_image_prompt_texts = proc_cls.get_image_prompt_texts
        get_video_prompt_texts = proc_cls.get_video_prompt_texts

    return Processor()


@pytest.mark.parametrize("job_use_image_id", [None, True, False])
@pytest.mark.parametrize("max_slice_nums", [9, 4])
@pytest.mark.parametrize("family", sorted(VERSIONS))
def test_images_as_vllm_expands_them(vllm_minicpmv, family, max_slice_nums, job_use_image_id):
    """Whatever use_image_id a job sets, vLLM writes its own: our count follows vLLM's rule."""
    proc = _processor(vllm_minicpmv, family, max_slice_nums)
    ImageSize = vllm_minicpmv.ImageSize
    use_id = vllm_placeholder_image_id(family, job_use_image_id)
    rng = random.Random(max_slice_nums)
    for w, h in random_sizes(seed=32, n=1000):
        idx = rng.choice((0, 1, rng.randint(0, 99)))
        text = proc.get_image_prompt_texts(ImageSize(width=w, height=h), idx)
        plan = plan_image(family, w, h, max_slice_nums=max_slice_nums, use_image_id=use_id, image_index=idx)
        assert plan.placeholder_tokens == count_tokens(text), (family, w, h)
        assert plan.visual_tokens == text.count("<unk>") == proc.info.get_num_image_tokens(ImageSize(w, h))
        assert plan.grid == (None if (g := proc.info.get_sliced_grid(ImageSize(w, h))) is None else tuple(g))


@pytest.mark.parametrize("family", ["minicpmv2_6", "minicpmv4_0", "minicpmv4_5"])
def test_video_frames_as_vllm_expands_them(vllm_minicpmv, family):
    proc = _processor(vllm_minicpmv, family, 9)
    rng = random.Random(5)
    for w, h in random_sizes(seed=33, n=1000):
        n = rng.randint(1, 64)
        text = proc.get_video_prompt_texts(vllm_minicpmv.ImageSize(width=w, height=h), n)
        clip = plan_video(family, w, h, n)
        assert (clip.visual_tokens, clip.placeholder_tokens) == (text.count("<unk>"), count_tokens(text)), (w, h)

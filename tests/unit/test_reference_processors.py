"""Plans of MiniCPM-V 1.0-4.5 against the real remote-code image processors.

The processors are the checkpoints' own files (../shared/reference/minicpmv-remote-code, loaded by
tests/reference.py, never copied into the project). For each generation and processor setting,
over 1,000 seeded sizes: the slice grid, overview and slice sizes from the processor's own helper
methods (`get_sliced_grid`, `find_best_resize`, `get_refine_size`, `split_to_patches`' cell
arithmetic), the placeholder text of `get_slice_image_placeholder` character for character, its
visual (`<unk>`) tokens and all its tokens. On a subset, full `preprocess` calls (real resizing)
give the patch grids of every slice. vLLM's own functions over the same processors are checked
in tests/vllm/test_reference_vllm.py.
"""

from __future__ import annotations

import random
import re
import zlib

import pytest
from PIL import Image

from pipeline.media.placeholders import placeholder_from_plan, video_placeholder
from pipeline.media.slicing import plan_image, plan_video
from pipeline.models import min_image_side
from tests.reference import IMAGE_PROCESSORS, image_processor
from tests.unit.test_slicing import random_sizes

OLD = ("minicpmv2_0", "minicpmv2_5")
NEW = ("minicpmv2_6", "minicpmv4_0", "minicpmv4_5")
N_SIZES = 1000

# Every piece of an expanded placeholder is one token of the MiniCPM/Llama-3/Qwen tokenizers: the
# markers are special tokens, `<unk>` is the visual token, digits are pre-split, "\n" stands alone.
_TOKEN = re.compile(r"</?image>|</?slice>|<unk>|</?image_id>|\d|\n")


def count_tokens(text: str) -> int:
    pieces = _TOKEN.findall(text)
    assert "".join(pieces) == text, f"unexpected text in placeholder: {text[:80]!r}"
    return len(pieces)


def _reference_geometry(ip, size, grid):
    """(overview, slices) the way the processor's `slice_image` computes them."""
    if grid is None:
        return ip.find_best_resize(size, ip.scale_resolution, ip.patch_size, allow_upscale=True), []
    overview = ip.find_best_resize(size, ip.scale_resolution, ip.patch_size)
    refine = ip.get_refine_size(size, grid, ip.scale_resolution, ip.patch_size, allow_upscale=True)
    cell = (int(refine[0] / grid[0]), int(refine[1] / grid[1]))  # split_to_patches
    return tuple(overview), [cell] * (grid[0] * grid[1])


def _check(family, plan, ip_grid, ip, size, text, image_id):
    overview, slices = _reference_geometry(ip, size, ip_grid)
    assert plan.grid == (None if ip_grid is None else tuple(ip_grid)), (family, size)
    assert (plan.overview, plan.slices) == (overview, slices), (family, size)
    assert plan.visual_tokens == text.count("<unk>"), (family, size)
    assert plan.placeholder_tokens == count_tokens(text), (family, size)
    assert placeholder_from_plan(family, plan, image_id=image_id) == text, (family, size)


@pytest.mark.parametrize("max_slice_nums", [None, 1, 4, 16])
@pytest.mark.parametrize("family", OLD)
def test_2_0_and_2_5_images(family, max_slice_nums):
    """2.0/2.5 take max_slice_nums only through the processor's constructor (vLLM passes the engine's
    mm_processor_kwargs there) and have no image ids."""
    ip = image_processor(family, **({} if max_slice_nums is None else {"max_slice_nums": max_slice_nums}))
    for w, h in random_sizes(seed=12, n=N_SIZES):
        plan = plan_image(family, w, h, max_slice_nums=max_slice_nums)
        _check(family, plan, ip.get_sliced_grid((w, h)), ip, (w, h), ip.get_slice_image_placeholder((w, h)), None)


@pytest.mark.parametrize("use_image_id", [True, False])
@pytest.mark.parametrize("max_slice_nums", [None, 1, 4, 16, 36])
@pytest.mark.parametrize("family", NEW)
def test_2_6_4_0_4_5_images(family, max_slice_nums, use_image_id):
    ip = image_processor(family)
    rng = random.Random(zlib.crc32(f"{family}-{max_slice_nums}-{use_image_id}".encode()))
    for w, h in random_sizes(seed=26, n=N_SIZES):
        idx = rng.choice((0, 1, 7, rng.randint(0, 120)))
        plan = plan_image(family, w, h, max_slice_nums=max_slice_nums, use_image_id=use_image_id, image_index=idx)
        slices = ip.max_slice_nums if max_slice_nums is None else max_slice_nums
        text = ip.get_slice_image_placeholder((w, h), image_idx=idx, max_slice_nums=slices, use_image_id=use_image_id)
        _check(family, plan, ip.get_sliced_grid((w, h), slices), ip, (w, h), text, idx if use_image_id else None)


@pytest.mark.parametrize("family", NEW)
def test_video_frames(family):
    """vLLM's `get_video_prompt_texts`: each frame one placeholder of max_slice_nums=1, no id."""
    ip = image_processor(family)
    rng = random.Random(45)
    for w, h in random_sizes(seed=45, n=N_SIZES):
        n = rng.randint(1, 64)
        text = ip.get_slice_image_placeholder((w, h), image_idx=0, max_slice_nums=1, use_image_id=False) * n
        clip = plan_video(family, w, h, n)
        assert clip.frame.grid is None
        assert clip.visual_tokens == text.count("<unk>") and clip.placeholder_tokens == count_tokens(text), (w, h)
        assert video_placeholder(family, w, h, n) == text


def test_2_5_placeholder_has_no_trailing_newline_unlike_2_0():
    """The issue's case: 1000x300 at 9 slices is 394 tokens on 2.5 (not 395), 2.0 ends with "\\n"."""
    assert plan_image("minicpmv2_5", 1000, 300).placeholder_tokens == 394
    assert count_tokens(image_processor("minicpmv2_5").get_slice_image_placeholder((1000, 300))) == 394
    assert image_processor("minicpmv2_0").get_slice_image_placeholder((1000, 300)).endswith("</slice>\n")
    assert plan_image("minicpmv2_0", 1000, 300).placeholder_tokens == 66 + 2 + 3 * 66 + 1


def _pixel_sizes(n: int) -> list[tuple[int, int]]:
    return [(w, h) for w, h in random_sizes(seed=7, n=4000) if w >= 4 and h >= 4 and w * h <= 2_500_000][:n]


@pytest.mark.parametrize("family", sorted(IMAGE_PROCESSORS))
def test_full_preprocess_patch_grids(family):
    """Real `preprocess` calls (real PIL resizing and cropping): the patch grid of the overview and of
    every slice equals the plan's sizes / 14."""
    ip = image_processor(family)
    for w, h in _pixel_sizes(25):
        out = ip.preprocess(Image.new("RGB", (w, h), (120, 30, 200)), return_tensors=None)
        tgt = out["tgt_sizes"][0]
        got = [tuple(int(x) for x in row) for row in tgt]
        plan = plan_image(family, w, h, max_slice_nums=9)
        want = [(plan.overview[1] // 14, plan.overview[0] // 14)] + [(sh // 14, sw // 14) for sw, sh in plan.slices]
        assert got == want, (family, w, h)


@pytest.mark.parametrize("family", sorted(IMAGE_PROCESSORS))
def test_min_image_side_keeps_rejected_images_from_the_engine(family):
    """Every size the real processor rejects is below min_image_side; sizes at or above it pass."""
    ip = image_processor(family)
    floor = min_image_side(family)
    rejected = []
    for w in range(1, 7):
        for h in (*range(1, 7), 50):
            for size in {(w, h), (h, w)}:
                try:
                    ip.preprocess(Image.new("RGB", size), return_tensors=None)
                except Exception:  # noqa: BLE001 - any failure is a rejection
                    rejected.append(size)
                    assert min(size) < floor, (family, size)
    assert {(1, 1), (50, 1), (50, 3)} <= set(rejected)  # heights 1 and 3 fail (channel axis guessed)
    assert floor == 4


def test_min_image_side_of_native_generations():
    for family in ("minicpmv4_6", "minicpmv4_7", "minicpm_ocr"):
        assert min_image_side(family) == 1


def test_1_0_never_slices():
    """MiniCPM-V 1.0 resizes every image to 448x448: 64 visual tokens, <image>...</image>."""
    for w, h in random_sizes(seed=10, n=N_SIZES):
        plan = plan_image("minicpmv1_0", w, h)
        assert (plan.grid, plan.overview, plan.slices, plan.visual_tokens) == (None, (448, 448), [], 64)
        assert plan.placeholder_tokens == count_tokens(placeholder_from_plan("minicpmv1_0", plan)) == 66

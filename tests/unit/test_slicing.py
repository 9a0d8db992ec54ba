"""pipeline.media.slicing against the reference processors.

Native generations (4.6, 4.7, MiniCPM-OCR): the real transformers processors of tiny checkpoints
(`build_tiny`), first through their own helper methods over thousands of random sizes, then through
full processor calls (real resizing, real tokenizer) on a subset. vLLM generations (2.0-4.5): their
processors are remote code from the checkpoints: here a few values worked out by hand from that code;
tests/unit/test_reference_processors.py compares them with the real remote-code files over
thousands of sizes.
"""

from __future__ import annotations

import math
import random
import zlib

import numpy as np
import pytest

from pipeline.media import slicing
from pipeline.media.slicing import plan_image, plan_video, plan_video_frame

NATIVE = ("minicpmv4_6", "minicpmv4_7", "minicpm_ocr")
VLLM_FAMILIES = ("minicpmv2_0", "minicpmv2_5", "minicpmv2_6", "minicpmv4_0", "minicpmv4_5")
PRIMES = (2, 3, 5, 7, 11, 13, 97, 101, 443, 449, 457, 877, 1009, 1999, 2003, 4093, 7919, 9973, 19997)
SPECIAL = [
    (1, 1), (1, 20000), (20000, 1), (2, 1), (1, 2), (20000, 20000), (2, 20000), (20000, 2),
    (448, 448), (447, 449), (449, 447), (896, 448), (448, 896), (1344, 1344), (448 * 6, 448 * 6),
    (448 * 7, 448), (448, 448 * 7), (28, 28), (56, 56), (55, 57), (612, 792), (1275, 1650),
    (2480, 3508), (3508, 2480), (1920, 1080), (1080, 1920), (4032, 3024), (7919, 13), (13, 7919),
    # Squares whose candidate grids are all non-square: exact ties in aspect error (2x1 vs 1x2, 3x2 vs 2x3).
    (500, 500), (600, 600), (1100, 1100), (1200, 1200), (1600, 1600), (2100, 2100),
]
PROMPT = "Describe."


def random_sizes(seed: int, n: int) -> list[tuple[int, int]]:
    """`n` sizes: the special cases, primes, multiples of 448/56/28 (+-1), extreme aspect ratios,
    and log-uniform random sides up to 20000 (seeded: the same sizes every run)."""
    rng = random.Random(seed)
    sizes = list(SPECIAL)
    sizes += [(a, b) for a in PRIMES[::3] for b in PRIMES[1::3]]
    while len(sizes) < n:
        kind = rng.random()
        if kind < 0.15:  # multiples of the slice side and of the merge units, sometimes off by one
            unit = rng.choice((448, 56, 28, 14))
            w, h = unit * rng.randint(1, 40), unit * rng.randint(1, 40)
            w, h = w + rng.choice((-1, 0, 0, 1)), h + rng.choice((-1, 0, 0, 1))
        elif kind < 0.3:  # extreme aspect ratios: receipts, banners, 1-pixel lines
            short, long_ = rng.randint(1, 60), rng.randint(500, 20000)
            w, h = (short, long_) if rng.random() < 0.5 else (long_, short)
        elif kind < 0.4:
            w, h = rng.choice(PRIMES), rng.choice(PRIMES)
        else:  # log-uniform sides
            w = int(math.exp(rng.uniform(0, math.log(20000))))
            h = int(math.exp(rng.uniform(0, math.log(20000))))
        sizes.append((max(1, min(w, 20000)), max(1, min(h, 20000))))
    return sizes[:n]


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """The real AutoProcessor of a tiny checkpoint of each native family."""
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    from pipeline.tiny import build_tiny

    out = {}
    for family in NATIVE:
        path = build_tiny(family, tmp_path_factory.mktemp(family))
        out[family] = AutoProcessor.from_pretrained(path)
    return out


def _settings(rng: random.Random) -> dict:
    """Random processor options: the pipeline's defaults, 1/9/36 slices or any, 4x/16x, ids on/off."""
    return {
        "max_slice_nums": rng.choice((None, 1, 9, 36, rng.randint(2, 64))),
        "downsample_mode": rng.choice((None, "4x", "16x")),
        "use_image_id": rng.choice((None, True, False)),
        "image_index": rng.choice((0, 0, 3, rng.randint(0, 120))),
    }


def _resolved(family: str, s: dict) -> tuple[int, str, bool]:
    spec = slicing.get_slice_spec(family)
    slices = s["max_slice_nums"] or spec.image_max_slice_nums
    mode = s["downsample_mode"] or spec.downsample_mode
    use_id = spec.use_image_id_images if s["use_image_id"] is None else s["use_image_id"]
    return slices, mode, use_id


def _reference_target_sizes(ip, width, height, slices, mode, upsize="always"):
    """(grid [rows, cols] or None, target sizes) from the image processor's own helpers, the way its
    `_preprocess` combines them."""
    size = (height, width)
    grid = ip.get_sliced_grid(size, slices, ip.scale_resolution)
    allow_upscale = grid is None and upsize == "always"
    src_h, src_w = ip.find_best_resize(size, ip.scale_resolution, ip.patch_size, downsample_mode=mode,
                                       allow_upscale=allow_upscale)
    sizes = [[src_h // ip.patch_size, src_w // ip.patch_size]]
    if grid is not None:
        ref_h, ref_w = ip.get_refine_size(size, grid, ip.scale_resolution, ip.patch_size, downsample_mode=mode,
                                          allow_upscale=True)
        tile = [ref_h // grid[0] // ip.patch_size, ref_w // grid[1] // ip.patch_size]
        sizes += [tile] * (grid[0] * grid[1])
    return grid, sizes


def _expected_from_plan(plan, patch=14):
    sizes = [[plan.overview[1] // patch, plan.overview[0] // patch]]
    sizes += [[h // patch, w // patch] for w, h in plan.slices]
    grid = None if plan.grid is None else [plan.grid[1], plan.grid[0]]
    return grid, sizes


# ---------------------------------------------------------------------------------------------------
# Native generations: helpers of the real processors, >= 1,000 sizes per family


@pytest.mark.parametrize("family", NATIVE)
def test_native_bulk_against_processor_helpers(processors, family):
    import torch

    proc = processors[family]
    ip, tok = proc.image_processor, proc.tokenizer
    rng = random.Random(f"bulk-{family}")
    sizes = random_sizes(seed=zlib.crc32(family.encode()), n=1200)
    texts, expected = [], []
    for i, (w, h) in enumerate(sizes):
        s = _settings(rng) if i % 2 else dict.fromkeys(("max_slice_nums", "downsample_mode", "use_image_id"),
                                                              None) | {"image_index": 0}
        slices, mode, use_id = _resolved(family, s)
        plan = plan_image(family, w, h, **s)
        grid, target = _reference_target_sizes(ip, w, h, slices, mode)
        assert _expected_from_plan(plan) == (grid, target), (family, w, h, s)
        assert len(plan.slices) == (0 if grid is None else grid[0] * grid[1])

        # The processor's own placeholder builder on those target sizes.
        inputs = {"grids": [grid or [0, 0]], "num_patches_per_image": [len(target)],
                  "target_sizes": torch.tensor(target, dtype=torch.int32)}
        text = proc.replace_image_token(inputs, 0, image_token_divisor=4 if mode == "4x" else 16)
        if use_id:
            text = proc._prepend_local_ids(["x" + proc.image_token * (s["image_index"] + 1)],
                                           [""] * s["image_index"] + [text], proc.image_token)[-1]
        assert text.count(proc.image_token) == plan.visual_tokens, (family, w, h, s)
        if i % 3 == 0:  # tokenizing is the slow part: a third of the sizes is plenty
            texts.append(text)
            expected.append(plan.placeholder_tokens)
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    assert lengths == expected


@pytest.mark.parametrize("family", NATIVE)
@pytest.mark.parametrize("max_slice_nums", [1, 9, 36])
@pytest.mark.parametrize("downsample_mode", ["4x", "16x"])
def test_native_grids_for_settings(processors, family, max_slice_nums, downsample_mode):
    ip = processors[family].image_processor
    for w, h in random_sizes(seed=max_slice_nums, n=300):
        plan = plan_image(family, w, h, max_slice_nums=max_slice_nums, downsample_mode=downsample_mode)
        assert _expected_from_plan(plan) == _reference_target_sizes(ip, w, h, max_slice_nums, downsample_mode)
        if max_slice_nums == 1:
            assert plan.grid is None
        assert len(plan.slices) <= max_slice_nums


def test_ocr_never_upsize_against_helpers(processors):
    ip = processors["minicpm_ocr"].image_processor
    for w, h in random_sizes(seed=7, n=400):
        plan = plan_image("minicpm_ocr", w, h, max_slice_nums=9, small_image_upsize="never")
        assert _expected_from_plan(plan) == _reference_target_sizes(ip, w, h, 9, "4x", upsize="never")


# ---------------------------------------------------------------------------------------------------
# Native generations: the full processor (real resize, real tokenizer) on a subset


def _full_run_sizes(family: str) -> list[tuple[int, int]]:
    small = [s for s in random_sizes(seed=11, n=3000) if s[0] * s[1] <= 600_000]
    rng = random.Random(f"full-{family}")
    picked = [(1, 1), (1, 20000), (20000, 1), (448, 448), (896, 448), (449, 447), (13, 7919), (1009, 1009)]
    return picked + rng.sample(small, 60 - len(picked))


def _count(ids, token_id) -> int:
    return int((ids == token_id).sum())


@pytest.mark.parametrize("family", NATIVE)
def test_native_full_processor(processors, family):
    proc = processors[family]
    grids: list = []
    original = proc.replace_image_token

    def spy(image_inputs, image_idx, **kwargs):  # the processor drops `grids` from its output
        grids.append(list(image_inputs["grids"][image_idx]))
        return original(image_inputs, image_idx, **kwargs)

    proc.replace_image_token = spy
    try:
        base = len(proc.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
        combos = [(m, d, u) for m in (1, 9, 36) for d in ("4x", "16x") for u in (True, False)]
        for i, (w, h) in enumerate(_full_run_sizes(family)):
            slices, mode, use_id = combos[i % len(combos)]
            image = np.zeros((h, w, 3), dtype=np.uint8)
            out = proc(text=[PROMPT + proc.image_token], images=[[image]], max_slice_nums=slices,
                       downsample_mode=mode, use_image_id=use_id, input_data_format="channels_last")
            plan = plan_image(family, w, h, max_slice_nums=slices, downsample_mode=mode, use_image_id=use_id)
            grid, target = _expected_from_plan(plan)
            assert grids[-1] == (grid or [0, 0]), (w, h, slices, mode)
            assert out["target_sizes"].tolist() == target, (w, h, slices, mode)
            ids = out["input_ids"][0]
            assert _count(ids, proc.image_token_id) == plan.visual_tokens, (w, h, slices, mode)
            assert len(ids) - base == plan.placeholder_tokens, (w, h, slices, mode, use_id)
    finally:
        del proc.replace_image_token


@pytest.mark.parametrize("family", NATIVE)
def test_native_image_ids_with_many_images(processors, family):
    """Image ids count their digits: 12 images in one prompt carry ids 0..11."""
    proc = processors[family]
    sizes = [(1, 1), (500, 300), (30, 900), (1000, 1000)] * 3
    images = [np.zeros((h, w, 3), dtype=np.uint8) for w, h in sizes]
    out = proc(text=[PROMPT + proc.image_token * len(sizes)], images=[images], max_slice_nums=4,
               use_image_id=True, input_data_format="channels_last")
    plans = [plan_image(family, w, h, max_slice_nums=4, use_image_id=True, image_index=i)
             for i, (w, h) in enumerate(sizes)]
    base = len(proc.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert len(out["input_ids"][0]) - base == sum(p.placeholder_tokens for p in plans)
    assert _count(out["input_ids"][0], proc.image_token_id) == sum(p.visual_tokens for p in plans)


def test_ocr_never_upsize_full_processor(processors):
    proc = processors["minicpm_ocr"]
    base = len(proc.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    for w, h in [(1, 1), (30, 40), (100, 37), (447, 449), (800, 900), (3, 2000)]:
        image = np.zeros((h, w, 3), dtype=np.uint8)
        out = proc(text=[PROMPT + proc.image_token], images=[[image]], max_slice_nums=9, small_image_upsize="never",
                   input_data_format="channels_last")
        plan = plan_image("minicpm_ocr", w, h, max_slice_nums=9, small_image_upsize="never")
        assert out["target_sizes"].tolist() == _expected_from_plan(plan)[1]
        assert len(out["input_ids"][0]) - base == plan.placeholder_tokens


def test_ocr_adaptive_is_an_upper_bound(processors):
    pytest.importorskip("cv2")
    proc = processors["minicpm_ocr"]
    rng = np.random.default_rng(0)
    for w, h in [(30, 40), (300, 200), (1200, 900)]:
        image = (rng.random((h, w, 3)) > 0.9).astype(np.uint8) * 255
        out = proc(text=[PROMPT + proc.image_token], images=[[image]], max_slice_nums=9,
                   small_image_upsize="adaptive", input_data_format="channels_last")
        plan = plan_image("minicpm_ocr", w, h, max_slice_nums=9, small_image_upsize="adaptive")
        assert not plan.exact
        assert _count(out["input_ids"][0], proc.image_token_id) <= plan.visual_tokens


@pytest.mark.parametrize("family", NATIVE)
def test_native_video_frames(processors, family):
    proc = processors[family]
    vp = proc.video_processor
    base = len(proc.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    cases = [((448, 252), 1, True), ((1, 1), 1, True), ((640, 480), 1, False), ((1280, 720), 4, True),
             ((300, 1100), 9, False), ((2, 900), 1, True)]
    for (w, h), slices, use_id in cases:
        for mode in ("4x", "16x"):
            frames = np.zeros((3, h, w, 3), dtype=np.uint8)
            out = proc(text=[PROMPT + proc.video_token], videos=[frames], do_sample_frames=False,
                       max_slice_nums=slices, downsample_mode=mode, use_image_id=use_id,
                       input_data_format="channels_last")
            clip = plan_video(family, w, h, 3, max_slice_nums=slices, downsample_mode=mode, use_image_id=use_id)
            ids = out["input_ids"][0]
            assert _count(ids, proc.video_token_id) == clip.visual_tokens, (family, w, h, slices, mode)
            assert len(ids) - base == clip.placeholder_tokens, (family, w, h, slices, mode, use_id)
            frame = clip.frame
            per_frame = _expected_from_plan(frame)[1]
            assert out["target_sizes_videos"].tolist() == per_frame * 3
            grid = vp.get_sliced_grid((h, w), slices, vp.scale_resolution)
            assert (None if grid is None else (grid[1], grid[0])) == frame.grid


def test_native_pipeline_defaults():
    """None settings are what the pipeline passes: 36 slices, ids on, checkpoint mode; 1 slice per frame."""
    big = plan_image("minicpmv4_6", 8000, 8000)
    assert big.grid == (6, 6)
    assert big.visual_tokens == 64 * 37 and big.placeholder_tokens == 64 * 37 + 2 * 37 + 5 + 3
    assert plan_image("minicpm_ocr", 448, 448).visual_tokens == 256  # 4x: (32*32)/4
    assert plan_image("minicpmv4_6", 448, 448).visual_tokens == 64  # 16x: (32*32)/16
    assert plan_video_frame("minicpmv4_6", 8000, 8000).grid is None
    # 4.7 never tags videos with ids, 4.6 does once per video when asked.
    assert plan_video("minicpmv4_7", 448, 448, 4, use_image_id=True).placeholder_tokens == 4 * 66
    assert plan_video("minicpmv4_6", 448, 448, 4, use_image_id=True).placeholder_tokens == 4 * 66 + 3


def test_stack_canvas_matches_video_processor(processors):
    import torch

    vp = processors["minicpmv4_6"].video_processor
    for n in (2, 3, 4, 5):
        for w, h in [(640, 360), (360, 640), (500, 500)]:
            canvas = vp.concat_frames_as_image(torch.zeros((n, 3, h, w), dtype=torch.uint8))
            assert slicing.stack_canvas_size(n, w, h) == (canvas.shape[-1], canvas.shape[-2])


# ---------------------------------------------------------------------------------------------------
# vLLM generations (2.0, 2.5, 2.6, 4.0, 4.5)


# Worked out by hand from the remote-code `MiniCPMVImageProcessor` (HwwwwwwwH/MiniCPM-V-2 for 2.0,
# the same code for 2.5, the 2.6/4.x processor) and vLLM's minicpmv.py placeholder rules.
HAND_CASES = [
    # family, (w, h), grid, overview, slice, visual, placeholder
    # 448x448: one overview, upscaled to 448x448 (ratio 1 -> never sliced).
    ("minicpmv2_0", (448, 448), None, (448, 448), None, 64, 64 + 2 + 1),
    ("minicpmv2_5", (448, 448), None, (448, 448), None, 96, 96 + 2),  # no trailing "\n" on 2.5
    ("minicpmv2_6", (448, 448), None, (448, 448), None, 64, 3 + 64 + 2),
    # 1344x1344 (2.5's "1.8 million pixels"): 9 candidates -> 3x3, slices 448x448.
    # 2.5: <image>96</image> <slice> 3 rows of 3x(<image>96</image>) joined by 2 "\n" </slice>
    ("minicpmv2_5", (1344, 1344), (3, 3), (448, 448), (448, 448), 960, 98 + 2 + 9 * 98 + 2),
    # 2.6: <image_id>0</image_id> <image>64</image> then 3 rows of 3x(<slice>64</slice>) joined by "\n"
    ("minicpmv2_6", (1344, 1344), (3, 3), (448, 448), (448, 448), 640, 3 + 66 + 9 * 66 + 2),
    # 1000x300: ratio 1.49 -> multiple 2 -> candidates 2, 3; log(10/3) closest to log(3) -> 3 cols x 1 row.
    # Overview: h=int(448/sqrt(10/3))=245, w=int(245*10/3)=816 -> 812x252 (245/14=17.5 rounds to 18).
    # Refine: 999x300 -> cell 333x300 upscaled: h=int(448/sqrt(1.11))=425, w=471 -> 476x420.
    ("minicpmv2_0", (1000, 300), (3, 1), (812, 252), (476, 420), 4 * 64, 66 + 2 + 3 * 66 + 1),
    ("minicpmv4_5", (1000, 300), (3, 1), (812, 252), (476, 420), 4 * 64, 3 + 66 + 3 * 66),
    # 4000x3000 at the processor's 9 slices: ratio 59.8 -> multiple 9 -> candidates 8 and 9; log(4/3)
    # is nearest log(1) (3x3, error 0.288; 4x2 has 0.405). Overview: h=int(448/sqrt(4/3))=387, w=516
    # -> 518x392. Refine: 3999x3000 -> cell 1333x1000 -> h=388, w=517 -> 518x392.
    ("minicpmv4_0", (4000, 3000), (3, 3), (518, 392), (518, 392), 640, 3 + 66 + 9 * 66 + 2),
    # 1x1: upscaled overview 448x448.
    ("minicpmv2_6", (1, 1), None, (448, 448), None, 64, 69),
]


@pytest.mark.parametrize("family,size,grid,overview,tile,visual,placeholder", HAND_CASES)
def test_vllm_generations_hand_checked(family, size, grid, overview, tile, visual, placeholder):
    plan = plan_image(family, *size)
    assert plan.grid == grid
    assert plan.overview == overview
    assert plan.slices == ([] if tile is None else [tile] * (grid[0] * grid[1]))
    assert plan.visual_tokens == visual
    assert plan.placeholder_tokens == placeholder


def test_vllm_generation_layouts():
    """Token layouts: 2.0/2.5 one <slice> block, 2.0's with a trailing "\\n"; 2.6+ <slice> per slice and
    image ids; video frames of 2.6+ are one overview each (max_slice_nums 1, no id); 2.0/2.5 take no video."""
    for family, q, newline in (("minicpmv2_0", 64, 1), ("minicpmv2_5", 96, 0)):
        plan = plan_image(family, 1344, 896)  # 3x2 grid
        assert plan.grid == (3, 2)
        assert plan.placeholder_tokens == (q + 2) + 2 + 6 * (q + 2) + 1 + newline
        with pytest.raises(ValueError):
            plan_image(family, 100, 100, use_image_id=True)
        with pytest.raises(ValueError):
            plan_video_frame(family, 100, 100)
    for family in ("minicpmv2_6", "minicpmv4_0", "minicpmv4_5"):
        plan = plan_image(family, 1344, 896, image_index=12)
        assert plan.placeholder_tokens == 4 + 66 + 6 * 66 + 1
        assert plan_image(family, 1344, 896, use_image_id=False).placeholder_tokens == 66 + 6 * 66 + 1
        clip = plan_video(family, 1344, 896, 5)
        assert clip.frame.grid is None and clip.visual_tokens == 5 * 64 and clip.placeholder_tokens == 5 * 66
    with pytest.raises(ValueError):
        plan_image("minicpmv2_6", 100, 100, downsample_mode="4x")


# ---------------------------------------------------------------------------------------------------
# Argument checking


def test_rejects_bad_arguments():
    for bad in [dict(width=0, height=5), dict(width=5, height=-1)]:
        with pytest.raises(ValueError):
            plan_image("minicpmv4_6", **bad)
    with pytest.raises(ValueError, match="unknown model family"):
        plan_image("minicpmv9_9", 10, 10)
    with pytest.raises(ValueError):
        plan_image("minicpmv4_6", 10, 10, max_slice_nums=0)
    with pytest.raises(ValueError):
        plan_image("minicpmv4_6", 10, 10, downsample_mode="8x")
    with pytest.raises(ValueError):
        plan_image("minicpmv4_6", 10, 10, small_image_upsize="never")  # an OCR-only option

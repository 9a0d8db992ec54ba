"""What the model's processor does to an image, computed from its size alone: slice grid and token cost.

MiniCPM-V (LLaVA-UHD) resizes every image to an *overview* of about `scale_resolution`**2 pixels and,
when the image holds more pixels than that, also cuts a resized copy into a grid of *slices* chosen
from up to `max_slice_nums` by aspect-ratio fit. `plan_image` reproduces that decision and the token
count of the expanded image placeholder, so jobs can be sized (`cpmv inspect`) and token budgets
checked without loading a processor. Pure Python (no torch/transformers): cheap on CPU actors.

Two families of reference implementation, mirrored operation by operation (same float expressions,
same tie-breaking), because rounding at the boundaries decides the grid:

* **Native (transformers >= 5.7)**: MiniCPM-V 4.6, 4.7 (reuses the 4.6 image/video processors) and
  MiniCPM-OCR 1.0 (`models/minicpmv4_6/image_processing_minicpmv4_6.py`,
  `models/minicpm_ocr/image_processing_minicpm_ocr.py`, their `processing_*.py` and
  `video_processing_*.py`). Sizes are rounded to multiples of `patch_size * merge` (56 for
  `downsample_mode` 16x, 28 for 4x) and each overview/slice costs `(h/14) * (w/14) // divisor` tokens
  (divisor 16 or 4): the count varies with the size. Grids come out as `[rows, cols]`, and an exact tie
  in aspect error prefers more rows.
* **MiniCPM-V 1.0**: one 448x448 image of 64 tokens, never sliced (layout "fixed").
* **vLLM `minicpmv` (2.0, 2.5, 2.6, 4.0, 4.5)**: vLLM builds the placeholder with the checkpoint's
  remote-code `MiniCPMVImageProcessor.get_slice_image_placeholder` and counts `<unk>` tokens as
  visual. Sizes are rounded to multiples of `patch_size` (14) and every overview/slice costs a fixed
  `query_num` (the resampler's queries). Grids are `[cols, rows]` and the first candidate with the
  smallest error wins. 2.0/2.5 wrap all slices in one `<slice>...</slice>` with `<image>` around each
  slice, and 2.0's (not 2.5's) ends with "\\n"; 2.6+ wrap each slice in `<slice>...</slice>` and prefix `<image_id>N</image_id>`.

`placeholder_tokens` counts every marker token (`<image>`, `</image>`, `<slice>`, `</slice>`,
`<image_id>`, `</image_id>`) and each "\\n" as one token and each digit of an image id as one token
(true for the Qwen and MiniCPM tokenizers: digits are pre-split). A "\\n" that ends a 2.0/2.5
placeholder can merge with a newline that follows it in the prompt; the visual-token count is exact
regardless.

Not modelled (the plan raises or says so): MiniCPM-OCR's `small_image_upsize="adaptive"`, which
looks at the pixels (glyph size and density) - `plan_image` returns its upper bound with
`exact=False`; 4.6's `stack_frames` composites are sized by `stack_canvas_size`, then planned as frames.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------------
# Family table


@dataclass(frozen=True)
class SliceSpec:
    """How one generation's processor slices images and counts their tokens."""

    name: str
    display: str
    native: bool  # transformers' own processor (4.6+); else vLLM + remote-code processor
    scale_resolution: int = 448
    patch_size: int = 14
    image_max_slice_nums: int = 9  # what `plan_image` assumes when the caller passes None
    video_max_slice_nums: int = 1  # slices per video frame (vLLM hard-codes 1 for 2.6-4.5)
    processor_max_slice_nums: int = 9  # the processor's own default (tests build processors with it)
    query_num: int | None = None  # fixed tokens per overview/slice (vLLM generations)
    downsample_mode: str | None = None  # native: the checkpoint's default merge (4x / 16x)
    image_ids: bool = False  # the placeholder can carry <image_id>N</image_id>
    use_image_id_images: bool = False
    use_image_id_video: bool = False
    video_ids: bool = False  # the processor tags each *video* (once) with an id when asked
    video: bool = False  # the generation accepts video
    layout: str = "native"  # native | uhd_v2 (2.0/2.5) | uhd_v26 (2.6/4.0/4.5)
    small_image_upsize: bool = False  # MiniCPM-OCR's option for unsliced images
    # uhd_v2: 2.0's processor ends its placeholder with "\n", 2.5's does not (`get_slice_image_placeholder`
    # in v20_/v25_image_processing_minicpmv.py).
    trailing_newline: bool = False


def _native_specs() -> list[SliceSpec]:
    # One source of truth for the native families: the pipeline's registry.
    from pipeline.models import FAMILIES

    specs = []
    for f in FAMILIES.values():
        if not f.native_transformers:
            continue  # 2.0-4.5 have their own specs below (fixed query_num, remote-code layout)
        specs.append(
            SliceSpec(
                name=f.name,
                display=f.display,
                native=True,
                scale_resolution=f.scale_resolution,
                patch_size=f.patch_size,
                image_max_slice_nums=f.image_max_slice_nums,
                video_max_slice_nums=f.video_max_slice_nums,
                processor_max_slice_nums=9,
                downsample_mode=f.downsample_mode,
                image_ids=True,
                use_image_id_images=f.use_image_id_images,
                use_image_id_video=f.use_image_id_video,
                # The 4.7 processor never tags videos; 4.6 and OCR do when use_image_id is on.
                video_ids=f.hf_model_type != "minicpmv4_7",
                video=True,
                layout="native",
                small_image_upsize=f.hf_model_type == "minicpm_ocr",
            )
        )
    return specs


# vLLM generations. Sources: vllm-project/vllm `vllm/model_executor/models/minicpmv.py` (placeholders
# come from the remote-code image processor; video frames use max_slice_nums=1 and no image id;
# images always use_image_id=True for 2.6+), the 2.0 processor vLLM documents (HwwwwwwwH/MiniCPM-V-2
# `image_processing_minicpmv.py`, `preprocessor_config.json`: image_feature_size 64), the 2.6/4.x
# remote-code processor (slice layout, image ids), `query_num` per version from the checkpoints'
# configs as mirrored by llama.cpp `clip.cpp` (2.5: 96; 2.6, 4.0, 4.5: 64).
_VLLM_SPECS = [
    # 1.0's modeling code resizes every image to 448x448 (64 query tokens) and never slices.
    SliceSpec("minicpmv1_0", "MiniCPM-V 1.0", native=False, query_num=64, layout="fixed",
              image_max_slice_nums=1, processor_max_slice_nums=1),
    SliceSpec("minicpmv2_0", "MiniCPM-V 2.0", native=False, query_num=64, layout="uhd_v2", trailing_newline=True),
    SliceSpec("minicpmv2_5", "MiniCPM-Llama3-V 2.5", native=False, query_num=96, layout="uhd_v2"),
    *(
        SliceSpec(name, display, native=False, query_num=64, layout="uhd_v26", image_ids=True,
                  use_image_id_images=True, use_image_id_video=False, video=True)
        for name, display in (
            ("minicpmv2_6", "MiniCPM-V 2.6"),
            ("minicpmv4_0", "MiniCPM-V 4.0"),
            ("minicpmv4_5", "MiniCPM-V 4.5"),
        )
    ),
]

SLICE_FAMILIES: dict[str, SliceSpec] = {s.name: s for s in (*_native_specs(), *_VLLM_SPECS)}

_MERGE = {"4x": 2, "16x": 4}  # side merge factor of the native vision tower
_DIVISOR = {"4x": 4, "16x": 16}  # patches per visual token
_SMALL_IMAGE_UPSIZE = ("always", "never", "adaptive")


def get_slice_spec(family: str) -> SliceSpec:
    """The slicing spec of `family`; ValueError naming the known families otherwise."""
    try:
        return SLICE_FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(sorted(SLICE_FAMILIES))}") from None


# --------------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class SlicePlan:
    """What the processor makes of one image (or video frame)."""

    grid: tuple[int, int] | None  # (columns, rows); None when the image is not sliced
    overview: tuple[int, int]  # (width, height) of the overview (source) image after resize
    slices: list[tuple[int, int]]  # (width, height) of each slice, row-major
    visual_tokens: int  # visual (image-pad / <unk>) tokens the image expands to
    placeholder_tokens: int  # all tokens of the expanded placeholder (visual + markers + ids + "\n")
    exact: bool = True  # False: an upper bound (content-dependent processor option)

    @property
    def num_slices(self) -> int:
        return len(self.slices)


@dataclass(frozen=True)
class VideoPlan:
    """A clip of `num_frames` equally sized frames, as the video processor expands it."""

    frame: SlicePlan
    num_frames: int
    visual_tokens: int
    placeholder_tokens: int


# --------------------------------------------------------------------------------------------------
# Shared arithmetic (exactly the reference expressions)


def ensure_divide(length: float, divisor: int) -> int:
    """Nearest multiple of `divisor` (Python's round: half to even), at least `divisor`."""
    return max(round(length / divisor) * divisor, divisor)


def _scale_down(width: float, height: float, scale_resolution: int, allow_upscale: bool) -> tuple[float, float]:
    """The common head of every `find_best_resize`: fit the area to scale_resolution**2."""
    if (height * width > scale_resolution * scale_resolution) or allow_upscale:
        aspect_ratio = width / height
        height = int(scale_resolution / math.sqrt(aspect_ratio))
        width = int(height * aspect_ratio)
    return width, height


def _grid_multiple(width: int, height: int, max_slice_nums: int, scale_resolution: int) -> tuple[float, int]:
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    return log_ratio, min(math.ceil(ratio), max_slice_nums)


def native_grid(width: int, height: int, max_slice_nums: int, scale_resolution: int) -> tuple[int, int] | None:
    """transformers' `get_sliced_grid` (4.6/4.7/OCR), as (cols, rows); ties prefer more rows."""
    log_ratio, multiple = _grid_multiple(width, height, max_slice_nums, scale_resolution)
    if multiple <= 1:
        return None
    best = [1, 1]  # [rows, cols]
    min_error = float("inf")
    for num_slices in (multiple - 1, multiple, multiple + 1):
        if num_slices == 1 or num_slices > max_slice_nums:
            continue
        for num_rows in range(1, num_slices + 1):
            if num_slices % num_rows == 0:
                num_cols = num_slices // num_rows
                error = abs(log_ratio - math.log(num_cols / num_rows))
                if error < min_error:
                    best, min_error = [num_rows, num_cols], error
                elif error == min_error and num_rows > best[0]:
                    best = [num_rows, num_cols]
    return best[1], best[0]


def uhd_grid(width: int, height: int, max_slice_nums: int, scale_resolution: int) -> tuple[int, int] | None:
    """The remote-code `get_sliced_grid` (2.0-4.5), as (cols, rows); the first best candidate wins."""
    log_ratio, multiple = _grid_multiple(width, height, max_slice_nums, scale_resolution)
    if multiple <= 1:
        return None
    candidates = []
    for split in (multiple - 1, multiple, multiple + 1):
        if split == 1 or split > max_slice_nums:
            continue
        m = 1
        while m <= split:
            if split % m == 0:
                candidates.append([m, split // m])
            m += 1
    best = [1, 1]  # [cols, rows]
    min_error = float("inf")
    for grid in candidates:
        error = abs(log_ratio - math.log(grid[0] / grid[1]))
        if error < min_error:
            best, min_error = grid, error
    return best[0], best[1]


def native_resize(width: float, height: float, scale_resolution: int, patch_size: int, downsample_mode: str,
                  allow_upscale: bool = False) -> tuple[int, int]:
    """transformers' `find_best_resize`, as (width, height): multiples of patch_size * merge."""
    width, height = _scale_down(width, height, scale_resolution, allow_upscale)
    unit = patch_size * _MERGE[downsample_mode]
    return ensure_divide(width, unit), ensure_divide(height, unit)


def native_refine(width: int, height: int, grid: tuple[int, int], scale_resolution: int, patch_size: int,
                  downsample_mode: str) -> tuple[int, int]:
    """transformers' `get_refine_size(..., allow_upscale=True)`, as (width, height) of the whole grid."""
    cols, rows = grid
    refine_width = ensure_divide(width, cols)
    refine_height = ensure_divide(height, rows)
    best_w, best_h = native_resize(refine_width / cols, refine_height / rows, scale_resolution, patch_size,
                                   downsample_mode, allow_upscale=True)
    return best_w * cols, best_h * rows


def uhd_resize(width: float, height: float, scale_resolution: int, patch_size: int,
               allow_upscale: bool = False) -> tuple[int, int]:
    """The remote-code `find_best_resize`, as (width, height): multiples of patch_size."""
    width, height = _scale_down(width, height, scale_resolution, allow_upscale)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def uhd_refine(width: int, height: int, grid: tuple[int, int], scale_resolution: int,
               patch_size: int) -> tuple[int, int]:
    """The remote-code `get_refine_size(..., allow_upscale=True)`, as (width, height)."""
    cols, rows = grid
    refine_width = ensure_divide(width, cols)
    refine_height = ensure_divide(height, rows)
    best_w, best_h = uhd_resize(refine_width / cols, refine_height / rows, scale_resolution, patch_size,
                                allow_upscale=True)
    return best_w * cols, best_h * rows


def native_tokens(size: tuple[int, int], patch_size: int, downsample_mode: str) -> int:
    """Visual tokens of one native overview/slice: `target_sizes.prod(-1) // divisor`."""
    width, height = size
    return (height // patch_size) * (width // patch_size) // _DIVISOR[downsample_mode]


def image_id_tokens(index: int) -> int:
    """`<image_id>N</image_id>`: two markers and one token per digit."""
    return 2 + len(str(index))


def stack_canvas_size(num_frames: int, width: int, height: int, line_width: int = 6) -> tuple[int, int]:
    """(width, height) of 4.6's `concat_frames_as_image` canvas of `num_frames` stacked sub-frames."""
    from pipeline.media.stacking import stack_grid

    rows, cols = stack_grid(num_frames, width, height, line_width)
    return cols * width + (cols - 1) * line_width, rows * height + (rows - 1) * line_width


# --------------------------------------------------------------------------------------------------
# Planning


def _check_size(width: int, height: int) -> None:
    if isinstance(width, bool) or isinstance(height, bool) or int(width) != width or int(height) != height:
        raise ValueError(f"image size must be integers, got {width!r}x{height!r}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1, got {width}x{height}")


def _resolve(spec: SliceSpec, max_slice_nums: int | None, scale_resolution: int | None,
             downsample_mode: str | None, default_slices: int) -> tuple[int, int, str | None]:
    slices = default_slices if max_slice_nums is None else max_slice_nums
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise ValueError(f"max_slice_nums must be an int >= 1, got {slices!r}")
    scale = spec.scale_resolution if scale_resolution is None else scale_resolution
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale_resolution must be an int >= 1, got {scale!r}")
    if spec.native:
        mode = spec.downsample_mode if downsample_mode is None else downsample_mode
        if mode not in _MERGE:
            raise ValueError(f"downsample_mode must be one of {sorted(_MERGE)}, got {mode!r}")
        return slices, scale, mode
    if downsample_mode is not None:
        raise ValueError(f"{spec.display} has no downsample_mode (fixed {spec.query_num} tokens per slice)")
    return slices, scale, None


def plan_image(
    family: str,
    width: int,
    height: int,
    *,
    max_slice_nums: int | None = None,
    scale_resolution: int | None = None,
    downsample_mode: str | None = None,
    use_image_id: bool | None = None,
    image_index: int = 0,
    slice_mode: bool = True,
    small_image_upsize: str = "always",
) -> SlicePlan:
    """The processor's plan for a `width` x `height` image of `family`.

    None settings take what the pipeline passes the engine (FAMILIES recommendations: 36 slices and
    image ids for 4.6/4.7/OCR, the checkpoint's downsample mode) or, for the vLLM generations, what
    vLLM uses (the processor's 9 slices, image ids on for 2.6+). `image_index` is the image's position
    among the images of its prompt (it is written into `<image_id>`). `small_image_upsize` is the
    MiniCPM-OCR processor option; "adaptive" gives an upper bound with `exact=False`.
    """
    spec = get_slice_spec(family)
    _check_size(width, height)
    slices, scale, mode = _resolve(spec, max_slice_nums, scale_resolution, downsample_mode,
                                   spec.image_max_slice_nums)
    if use_image_id is None:
        use_image_id = spec.use_image_id_images
    if use_image_id and not spec.image_ids:
        raise ValueError(f"{spec.display} has no image ids (use_image_id must be off)")
    if image_index < 0:
        raise ValueError(f"image_index must be >= 0, got {image_index}")
    if small_image_upsize not in _SMALL_IMAGE_UPSIZE:
        raise ValueError(f"small_image_upsize must be one of {_SMALL_IMAGE_UPSIZE}, got {small_image_upsize!r}")
    if small_image_upsize != "always" and not spec.small_image_upsize:
        raise ValueError(f"small_image_upsize is a MiniCPM-OCR option; {spec.display} always upsizes")
    id_tokens = image_id_tokens(image_index) if use_image_id else 0

    if spec.native:
        plan = _plan_native(spec, width, height, slices, scale, mode, slice_mode, small_image_upsize)
        return _with_prefix(plan, id_tokens)
    return _plan_uhd(spec, width, height, slices, scale, slice_mode, id_tokens)


def _plan_native(spec: SliceSpec, width: int, height: int, slices: int, scale: int, mode: str,
                 slice_mode: bool, small_image_upsize: str) -> SlicePlan:
    patch = spec.patch_size
    grid = native_grid(width, height, slices, scale) if slice_mode else None
    if grid is None and small_image_upsize == "adaptive":
        # The OCR processor picks 448 (small dense text), 84 (tiny images) or native size from the
        # pixels; report the costliest of the three.
        options = [
            _plan_native(spec, width, height, slices, scale, mode, slice_mode, "always"),
            _plan_native(spec, width, height, slices, scale, mode, slice_mode, "never"),
            _native_overview_only(spec, width, height, 84, mode, allow_upscale=True),
        ]
        worst = max(options, key=lambda p: p.placeholder_tokens)
        return SlicePlan(worst.grid, worst.overview, worst.slices, worst.visual_tokens, worst.placeholder_tokens,
                         exact=False)
    # Unsliced images are upscaled to the budget ("always"); OCR's "never" keeps them native.
    allow_upscale = grid is None and small_image_upsize == "always"
    overview = native_resize(width, height, scale, patch, mode, allow_upscale=allow_upscale)
    visual = native_tokens(overview, patch, mode)
    placeholder = visual + 2  # <image> ... </image>
    tiles: list[tuple[int, int]] = []
    if grid is not None:
        cols, rows = grid
        refine_w, refine_h = native_refine(width, height, grid, scale, patch, mode)
        tile = (refine_w // cols, refine_h // rows)
        tiles = [tile] * (cols * rows)
        per_slice = native_tokens(tile, patch, mode)
        visual += per_slice * cols * rows
        # <slice> ... </slice> per slice, "\n" between rows
        placeholder += (per_slice + 2) * cols * rows + (rows - 1)
    # A "adaptive" sliced image may shrink some slices below the base tile: this is its upper bound.
    return SlicePlan(grid, overview, tiles, visual, placeholder, exact=small_image_upsize != "adaptive")


def _native_overview_only(spec: SliceSpec, width: int, height: int, resolution: int, mode: str,
                          allow_upscale: bool) -> SlicePlan:
    overview = native_resize(width, height, resolution, spec.patch_size, mode, allow_upscale=allow_upscale)
    visual = native_tokens(overview, spec.patch_size, mode)
    return SlicePlan(None, overview, [], visual, visual + 2)


def _with_prefix(plan: SlicePlan, extra_tokens: int) -> SlicePlan:
    if not extra_tokens:
        return plan
    return SlicePlan(plan.grid, plan.overview, plan.slices, plan.visual_tokens,
                     plan.placeholder_tokens + extra_tokens, plan.exact)


def _plan_uhd(spec: SliceSpec, width: int, height: int, slices: int, scale: int, slice_mode: bool,
              id_tokens: int) -> SlicePlan:
    q = spec.query_num
    assert q is not None
    patch = spec.patch_size
    if spec.layout == "fixed":  # <image> <unk>*q </image>, always a scale x scale square
        return SlicePlan(None, (scale, scale), [], q, q + 2)
    if not slice_mode:
        if spec.layout == "uhd_v2":
            raise ValueError(f"{spec.display}'s processor has no slice_mode switch")
        # 2.6+ with slice_mode off hand the image over unresized, one overview of query_num tokens.
        return SlicePlan(None, (width, height), [], q, id_tokens + q + 2)
    grid = uhd_grid(width, height, slices, scale)
    if grid is None:
        overview = uhd_resize(width, height, scale, patch, allow_upscale=True)
        tiles: list[tuple[int, int]] = []
        cols = rows = 0
    else:
        cols, rows = grid
        overview = uhd_resize(width, height, scale, patch)
        refine_w, refine_h = uhd_refine(width, height, grid, scale, patch)
        tiles = [(refine_w // cols, refine_h // rows)] * (cols * rows)
    n = cols * rows
    visual = (n + 1) * q
    placeholder = id_tokens + q + 2  # [<image_id>N</image_id>] <image> <unk>*q </image>
    if spec.layout == "uhd_v2":
        # <slice> rows of (<image> <unk>*q </image>)*cols joined by "\n" </slice>, then (2.0 only) "\n"
        if n:
            placeholder += 2 + n * (q + 2) + (rows - 1)
        placeholder += 1 if spec.trailing_newline else 0
    elif n:
        # rows of (<slice> <unk>*q </slice>)*cols joined by "\n"
        placeholder += n * (q + 2) + (rows - 1)
    return SlicePlan(grid, overview, tiles, visual, placeholder)


def plan_video_frame(
    family: str,
    width: int,
    height: int,
    *,
    max_slice_nums: int | None = None,
    scale_resolution: int | None = None,
    downsample_mode: str | None = None,
    slice_mode: bool = True,
) -> SlicePlan:
    """The video processor's plan for one `width` x `height` frame (placeholder without the video id).

    None settings take what the pipeline passes (FAMILIES: 1 slice per frame, the checkpoint's
    downsample mode); vLLM generations always use 1 slice per frame.
    """
    spec = get_slice_spec(family)
    if not spec.video:
        raise ValueError(f"{spec.display} does not take video")
    _check_size(width, height)
    slices, scale, mode = _resolve(spec, max_slice_nums, scale_resolution, downsample_mode,
                                   spec.video_max_slice_nums)
    if spec.native:
        # The native video processor has the image processor's arithmetic without OCR's upsize switch.
        return _plan_native(spec, width, height, slices, scale, mode, slice_mode, "always")
    return _plan_uhd(spec, width, height, slices, scale, slice_mode, 0)


def _video_id_tokens(spec: SliceSpec, use_image_id: bool | None, video_index: int, num_units: int) -> int:
    """Tokens of the id tag in front of a whole video: 4.6/OCR tag it once; 4.7 and the vLLM
    generations never tag videos (None: the family's default)."""
    if use_image_id is None:
        use_image_id = spec.use_image_id_video
    return image_id_tokens(video_index) if use_image_id and spec.video_ids and num_units else 0


def plan_video(
    family: str,
    width: int,
    height: int,
    num_frames: int,
    *,
    max_slice_nums: int | None = None,
    scale_resolution: int | None = None,
    downsample_mode: str | None = None,
    use_image_id: bool | None = None,
    video_index: int = 0,
) -> VideoPlan:
    """A clip of `num_frames` frames: per-frame plan and totals (one video id prefix when used)."""
    spec = get_slice_spec(family)
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    frame = plan_video_frame(family, width, height, max_slice_nums=max_slice_nums,
                             scale_resolution=scale_resolution, downsample_mode=downsample_mode)
    id_tokens = _video_id_tokens(spec, use_image_id, video_index, num_frames)
    return VideoPlan(
        frame=frame,
        num_frames=num_frames,
        visual_tokens=frame.visual_tokens * num_frames,
        placeholder_tokens=frame.placeholder_tokens * num_frames + id_tokens,
    )


@functools.lru_cache(maxsize=4096)  # pages of a document share a few sizes; a plan costs ~0.1 ms
def model_input_size(family: str, width: int, height: int, *, video: bool = False, **settings) -> tuple[int, int] | None:
    """The smallest size to hand the processor so that it plans exactly as for the original image.

    The processor cuts slices from the image resized to the grid's refine size (or, unsliced, uses
    the overview). Resizing to that size on a CPU actor moves fewer bytes and leaves the engine's
    processor a near no-op, but only when the processor then chooses the same grid, overview and
    slice sizes; otherwise (or when it would not shrink the image) this returns None and the
    original pixels go to the engine.
    """
    plan_fn = plan_video_frame if video else plan_image
    try:
        plan = plan_fn(family, width, height, **settings)
    except ValueError:
        return None
    if plan.grid is None:
        target = plan.overview
    else:
        cols, rows = plan.grid
        target = (sum(w for w, _ in plan.slices[:cols]), sum(h for _, h in plan.slices[::cols][:rows]))
    # The exact refine size first; then sizes of the original's aspect a little above it (the grid
    # choice depends on aspect and area, so these often keep the plan where the refine size does not).
    tw, th = target
    scale = (tw * th / (width * height)) ** 0.5
    candidates = [(tw, th)] + [(round(width * scale * k), round(height * scale * k)) for k in (1.0, 1.1, 1.25, 1.5)]
    for cw, ch in candidates:
        if cw < 1 or ch < 1 or cw * ch >= width * height:
            continue  # never upscale on the CPU side: the processor does that from the original
        again = plan_fn(family, cw, ch, **settings)
        if (again.grid, again.overview, again.slices) == (plan.grid, plan.overview, plan.slices):
            return cw, ch
    return None


def plan_stacked_video(
    family: str,
    width: int,
    height: int,
    units: list[int],
    *,
    downsample_mode: str | None = None,
    use_image_id: bool | None = None,
    video_index: int = 0,
) -> VideoPlan:
    """A clip sampled for 4.6's `stack_frames` (pipeline/media/stacking.py): `units` lists its visual
    units in order, 0 for a main frame of `width` x `height` and k for a composite of k sub-frames
    (a canvas of `stack_canvas_size`; one sub-frame is its own canvas). Each unit is planned as a frame
    of its own size; `frame` is the main frames' plan and `num_frames` the number of units."""
    spec = get_slice_spec(family)
    frame = plan_video_frame(family, width, height, downsample_mode=downsample_mode)
    visual = placeholder = 0
    for k in units:
        if k <= 1:
            plan = frame
        else:
            plan = plan_video_frame(family, *stack_canvas_size(k, width, height), downsample_mode=downsample_mode)
        visual += plan.visual_tokens
        placeholder += plan.placeholder_tokens
    id_tokens = _video_id_tokens(spec, use_image_id, video_index, len(units))
    return VideoPlan(frame=frame, num_frames=len(units), visual_tokens=visual, placeholder_tokens=placeholder + id_tokens)

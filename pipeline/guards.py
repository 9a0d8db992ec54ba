"""Guards before the engine: a unit whose prompt cannot fit the model's context never reaches it.

vLLM rejects a prompt longer than `max_model_len` (and Ray Data LLM's own tracker has jobs killed by
one such prompt); transformers runs past `max_position_embeddings` into garbage or out of memory.
So the inference stage estimates every unit's prompt length first:

    text tokens of the rendered prompt (the engine's tokenizer and chat template where it has one,
    else a character estimate) + the visual placeholder tokens the processor will expand the
    unit's images / frames to (pipeline.media.slicing, from the unit's width, height and frame
    count and the job's processor settings) + max_new_tokens

and when that exceeds the limit the unit is re-sliced with fewer slices (max_slice_nums halved until
it fits or reaches 1; only where the engine takes slice options per request and the job allows it)
or becomes an error row `prompt_too_long` whose message carries the numbers.

Pure Python (no torch/vllm): cheap enough to run for every unit on the engine actor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

#: error_type of a unit whose estimated prompt exceeds the model's context.
PROMPT_TOO_LONG = "prompt_too_long"


@dataclass(frozen=True)
class Estimate:
    """The token budget of one unit and task."""

    text_tokens: int
    visual_tokens: int  # all placeholder tokens of the images/frames (visual + markers + ids)
    max_new_tokens: int
    max_slice_nums: int | None  # the slices the estimate assumed (None: unsliced clip / no images)

    @property
    def total(self) -> int:
        return self.text_tokens + self.visual_tokens + self.max_new_tokens


@dataclass(frozen=True)
class Verdict:
    """What the stage does with a unit: run it (maybe with fewer slices) or write an error row."""

    estimate: Estimate
    limit: int | None
    max_slice_nums: int | None = None  # set when re-sliced: pass this per request
    flag: str | None = None  # `resliced_<n>` when re-sliced
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_message is None


def estimate_text_tokens(text: str, count: Callable[..., int | None] | None = None,
                         examples: tuple[tuple[str, str], ...] = ()) -> int:
    """Tokens of `text` as the engine renders it, after the few-shot `examples` ((prompt, answer)
    turns); without a tokenizer, a generous character estimate."""
    if count is not None:
        n = count(text, examples) if examples else count(text)
        if n is not None:
            return int(n)
    # ~4 characters per token for English, fewer for CJK or digits: err high; plus each turn's frame.
    chars = len(text.encode("utf-8")) + sum(len(p.encode("utf-8")) + len(a.encode("utf-8")) for p, a in examples)
    return math.ceil(chars / 3) + 16 * (1 + 2 * len(examples))


def visual_tokens(
    family: str,
    unit_kind: str,
    width: int | None,
    height: int | None,
    num_images: int,
    *,
    max_slice_nums: int | None = None,
    downsample_mode: str | None = None,
    use_image_id: bool | None = None,
    stack_units: list[int] | None = None,
    sizes: list[tuple[int, int]] | None = None,
) -> int:
    """Placeholder tokens the processor expands this unit's images (or clip frames) to, plus the
    separator the engine writes after each image (clip) placeholder (`models.separator_tokens`).

    `stack_units`: a clip in 4.6's stack_frames layout, as `StackLayout.units()` lists it.
    `sizes`: every image of the prompt as (width, height), in placeholder order (few-shot examples'
    images, then the unit's: a page window's pages may differ in size); image ids count through all
    of them. Unset: `num_images` images of width x height.
    """
    from pipeline.media.slicing import plan_image, plan_stacked_video, plan_video
    from pipeline.models import separator_tokens

    if sizes is not None and unit_kind != "clip":
        return sum(
            plan_image(family, w, h, max_slice_nums=max_slice_nums, downsample_mode=downsample_mode,
                       use_image_id=use_image_id, image_index=k).placeholder_tokens
            for k, (w, h) in enumerate(sizes)
        )
    if not num_images or not width or not height:
        return 0
    sep = separator_tokens(family)
    if unit_kind == "clip" and stack_units is not None:
        return plan_stacked_video(family, width, height, stack_units, downsample_mode=downsample_mode).placeholder_tokens
    if unit_kind == "clip":
        return plan_video(family, width, height, num_images, downsample_mode=downsample_mode).placeholder_tokens + sep
    return sum(
        plan_image(family, width, height, max_slice_nums=max_slice_nums, downsample_mode=downsample_mode,
                   use_image_id=use_image_id, image_index=k).placeholder_tokens + sep
        for k in range(num_images)
    )


def check_unit(
    family: str,
    unit_kind: str,
    width: int | None,
    height: int | None,
    num_images: int,
    text_tokens: int,
    max_new_tokens: int,
    limit: int | None,
    *,
    max_slice_nums: int | None = None,
    default_slice_nums: int | None = None,
    downsample_mode: str | None = None,
    use_image_id: bool | None = None,
    reslice: bool = True,
    stack_units: list[int] | None = None,
    sizes: list[tuple[int, int]] | None = None,
) -> Verdict:
    """Decide whether a unit fits `limit` tokens, re-slicing it when allowed.

    `max_slice_nums` is what the job asks (None: the family's recommendation `default_slice_nums`).
    A clip's frames are never sliced (1 slice per frame in every engine), so a clip only fits or not.
    """

    def est(slices: int | None) -> Estimate:
        vis = visual_tokens(family, unit_kind, width, height, num_images, max_slice_nums=slices,
                            downsample_mode=downsample_mode, use_image_id=use_image_id, stack_units=stack_units,
                            sizes=sizes)
        return Estimate(text_tokens, vis, max_new_tokens, slices if num_images and unit_kind != "clip" else None)

    first = est(max_slice_nums)
    if limit is None or first.total <= limit:
        return Verdict(first, limit)
    if reslice and unit_kind != "clip" and num_images:
        slices = max_slice_nums or default_slice_nums
        if slices is None:
            from pipeline.media.slicing import get_slice_spec

            slices = get_slice_spec(family).image_max_slice_nums
        while slices > 1:
            slices = max(1, slices // 2)
            again = est(slices)
            if again.total <= limit:
                return Verdict(again, limit, max_slice_nums=slices, flag=f"resliced_{slices}")
        smallest = est(1)
        detail = f"; still {smallest.total} with max_slice_nums=1"
    else:
        smallest, detail = first, ""
    message = (
        f"estimated prompt {first.total} tokens (text {first.text_tokens} + visual {first.visual_tokens} "
        f"+ max_new_tokens {first.max_new_tokens}) > max_model_len {limit}{detail}"
    )
    return Verdict(smallest, limit, error_message=message)


def context_limit_from_config(config: dict | None) -> int | None:
    """`max_position_embeddings` of a checkpoint's config.json (its text config for VLMs), if known."""
    if not isinstance(config, dict):
        return None
    for section in (config.get("text_config"), config.get("llm_config"), config):
        if isinstance(section, dict):
            value = section.get("max_position_embeddings")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None

"""The expanded image placeholder text of MiniCPM-V 1.0-4.5, from a slicing plan.

vLLM's `minicpmv` model replaces each `(<image>./</image>)` of a prompt with the text its
checkpoint's remote-code image processor returns from `get_slice_image_placeholder`, and counts the
`<unk>` tokens in it as visual tokens. This module writes the same text from
`pipeline.media.slicing.plan_image` (no processor, no torch), so that the plan's token counts can be
checked character by character against the real processors (tests/unit/test_reference_processors.py)
and a prompt can be sized without loading a checkpoint.

Layouts (sources: `v20_/v25_image_processing_minicpmv.py` and `o26_fix_image_processing_minicpmv.py`
in ../shared/reference/minicpmv-remote-code, and vLLM 0.32's `minicpmv.py`):

* 2.0 / 2.5: `<image>` + `<unk>`*q + `</image>`, then, when sliced, `<slice>` + rows of
  (`<image>` + `<unk>`*q + `</image>`)*cols joined by "\\n" + `</slice>`; 2.0 (only) adds "\\n".
* 2.6 / 4.0 / 4.5: [`<image_id>N</image_id>`] + `<image>` + `<unk>`*q + `</image>`, then rows of
  (`<slice>` + `<unk>`*q + `</slice>`)*cols joined by "\\n". A video frame is the unsliced form
  without id, once per frame.
* 1.0: `<image>` + `<unk>`*64 + `</image>` (its modeling code; never sliced).
"""

from __future__ import annotations

from pipeline.media.slicing import SlicePlan, get_slice_spec, plan_image, plan_video_frame

UNK = "<unk>"


def _rows(cell: str, grid: tuple[int, int]) -> str:
    cols, rows = grid
    return "\n".join(cell * cols for _ in range(rows))


def placeholder_from_plan(family: str, plan: SlicePlan, *, image_id: int | None = None) -> str:
    """The placeholder text of `plan` for `family` (a 1.0-4.5 generation); `image_id` None: no id tag.

    Raises ValueError for the native generations (their processors write other tokens) and for an
    id on a generation without ids.
    """
    spec = get_slice_spec(family)
    if spec.native:
        raise ValueError(f"{spec.display}: placeholder text is built by its transformers processor")
    q = spec.query_num
    assert q is not None
    image = "<image>" + UNK * q + "</image>"
    if image_id is not None and not spec.image_ids:
        raise ValueError(f"{spec.display} has no image ids")
    prefix = "" if image_id is None else f"<image_id>{image_id}</image_id>"
    if spec.layout == "fixed":
        return image
    if spec.layout == "uhd_v2":
        text = image
        if plan.grid is not None:
            text += "<slice>" + _rows(image, plan.grid) + "</slice>"
        return text + ("\n" if spec.trailing_newline else "")
    text = prefix + image
    if plan.grid is not None:
        text += _rows("<slice>" + UNK * q + "</slice>", plan.grid)
    return text


def image_placeholder(family: str, width: int, height: int, *, max_slice_nums: int | None = None,
                      image_id: int | None = None) -> str:
    """Placeholder text of one `width` x `height` image (see `placeholder_from_plan`)."""
    plan = plan_image(family, width, height, max_slice_nums=max_slice_nums,
                      use_image_id=image_id is not None, image_index=image_id or 0)
    return placeholder_from_plan(family, plan, image_id=image_id)


def video_placeholder(family: str, width: int, height: int, num_frames: int) -> str:
    """vLLM's text for a clip of `num_frames` frames (`get_video_prompt_texts`): one unsliced frame
    placeholder without id per frame."""
    frame = plan_video_frame(family, width, height)
    return placeholder_from_plan(family, frame) * num_frames

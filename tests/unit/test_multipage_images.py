"""Multi-page stills are documents (one unit per page); animations have a stated policy; left-out
pages make the document `partial`; images too small for the model's processors are turned away."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ImageConfig, LimitsConfig
from pipeline.media.base import MediaError
from pipeline.media.image import expand_image, frame_policy
from tests import hostile


def inspect(capsys, path: Path, *sets: str) -> list[dict]:
    argv = ["inspect", str(path)] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_fax_tiff_gives_one_unit_per_page_by_default() -> None:
    units = list(expand_image(hostile.tiff_pages(3), ImageConfig(), LimitsConfig()))
    assert [u.unit_index for u in units] == [0, 1, 2] and all(u.flags == [] for u in units)
    assert [int(u.frames[0][0, 0, 0]) for u in units] == [40, 100, 160]  # each page's own pixels


def test_pages_left_out_are_flagged() -> None:
    capped = list(expand_image(hostile.tiff_pages(3), ImageConfig(max_frames=2), LimitsConfig()))
    assert len(capped) == 2 and all("multi_frame_capped" in u.flags for u in capped)
    first = list(expand_image(hostile.tiff_pages(3), ImageConfig(multi_frame="first"), LimitsConfig()))
    assert len(first) == 1 and first[0].flags == ["multi_frame_first_only"]


def test_animation_policy_is_first_frame_flagged() -> None:
    units = list(expand_image(hostile.animated_gif(4), ImageConfig(), LimitsConfig()))
    assert len(units) == 1 and units[0].flags == ["animation_first_frame"]
    assert frame_policy("PSD", 3, ImageConfig()) == (1, [])  # layers beside the composite: the composite


def test_skipped_pages_make_the_document_partial() -> None:
    from pipeline.media.image import SKIPPED_FRAME_FLAGS
    from pipeline.sink import _SKIPPED_FRAMES
    from tests.unit.test_sink import complete, doc, row

    assert _SKIPPED_FRAMES == SKIPPED_FRAME_FLAGS  # the sink's copy of the image module's rule
    for flag in sorted(SKIPPED_FRAME_FLAGS):
        d = doc(complete("t", [row("t", 0, "ocr", "ok", media="image", flags=[flag])], tasks=("ocr",)))
        assert d["status"] == "partial" and d["error_type"] == "frames_skipped" and flag in d["error_message"]
    # An animation's first frame is the stated policy, not a loss.
    d = doc(complete("g", [row("g", 0, "ocr", "ok", media="image", flags=["animation_first_frame"])], tasks=("ocr",)))
    assert d["status"] == "ok" and d["error_type"] is None


def test_inspect_tiff_pages(tmp_path: Path, capsys) -> None:
    (tmp_path / "fax.tif").write_bytes(hostile.tiff_pages(3))
    rows = inspect(capsys, tmp_path / "fax.tif")
    assert [(r["unit_index"], r["error_type"], r["flags"]) for r in rows] == [(0, None, []), (1, None, []), (2, None, [])]


@pytest.mark.parametrize("size", [(1, 1), (2, 1), (20000, 1), (1, 20000), (3, 3)])
def test_images_too_small_for_the_processors(size: tuple[int, int]) -> None:
    with pytest.raises(MediaError) as err:
        list(expand_image(hostile.pil_bytes("PNG", size), ImageConfig(), LimitsConfig()))
    assert err.value.error_type == "image_too_small"
    assert err.value.message == (f"{size[0]}x{size[1]} pixels: a side is below the minimum of 4 pixels "
                                 "(limits.min_image_side) that the model's image processors accept")


def test_smallest_accepted_image_and_the_setting(tmp_path: Path, capsys) -> None:
    assert len(list(expand_image(hostile.pil_bytes("PNG", (4, 4)), ImageConfig(), LimitsConfig()))) == 1
    (tmp_path / "line.png").write_bytes(hostile.pil_bytes("PNG", (20000, 1)))
    rows = inspect(capsys, tmp_path / "line.png")
    assert [(r["unit_index"], r["error_type"]) for r in rows] == [(-1, "image_too_small")]
    rows = inspect(capsys, tmp_path / "line.png", "limits.min_image_side=1")
    assert rows[0]["error_type"] is None

"""Multi-image manifest rows (`input.manifest_images_column`): one source and one unit of several images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import InputConfig, StorageConfig, load_job_data
from pipeline.expand import ExpandSource
from pipeline.sources import NoMatchError, discover

FAMILY = "minicpmv4_6"


def _png(path: Path, h: int, w: int, seed: int) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def images(tmp_path) -> list[str]:
    return [_png(tmp_path / f"{k}.png", 60 + 20 * k, 80, k) for k in range(3)]


def test_csv_and_parquet_rows_become_one_source_each(tmp_path, images):
    csv = tmp_path / "m.csv"
    csv.write_text(f"views,label\n{images[0]}|{images[1]},a\n{images[2]},b\n")
    found = discover(InputConfig(manifest=str(csv), manifest_images_column="views"), StorageConfig())
    assert sorted(s.parts for s in found) == sorted([(images[0], images[1]), (images[2],)])
    two = next(s for s in found if len(s.parts) == 2)
    assert two.uri == f"{images[0]}|{images[1]}" and two.size == sum(os.path.getsize(p) for p in images[:2])

    pq.write_table(pa.table({"views": [[images[0], images[1]], [images[2]]]}), tmp_path / "m.parquet")
    again = discover(InputConfig(manifest=str(tmp_path / "m.parquet"), manifest_images_column="views"),
                     StorageConfig())
    assert {s.source_id for s in again} == {s.source_id for s in found}  # same images, same ids

    os.utime(images[1], (1, 1))  # one image changed (its mtime): the row's id changes, the other's not
    changed = discover(InputConfig(manifest=str(csv), manifest_images_column="views"), StorageConfig())
    assert {s.source_id for s in changed} & {s.source_id for s in found} == {
        s.source_id for s in found if s.parts == (images[2],)}


def test_bad_manifest_rows_fail_before_any_work(tmp_path, images):
    csv = tmp_path / "m.csv"
    csv.write_text(f"views\n{images[0]}|\n")
    with pytest.raises(ValueError, match=r"empty URI.*row\(s\) \[0\]"):
        discover(InputConfig(manifest=str(csv), manifest_images_column="views"), StorageConfig())
    csv.write_text(f"views\n{images[0]}|{tmp_path / 'missing.png'}\n")
    with pytest.raises(NoMatchError):
        discover(InputConfig(manifest=str(csv), manifest_images_column="views"), StorageConfig())
    with pytest.raises(ValueError, match="input.manifest"):
        InputConfig(uris=["x"], manifest_images_column="views")


def _expand(tmp_path, parts, **limits):
    job = load_job_data({"input": {"uris": ["x"]}, "output": {"uri": str(tmp_path / "o")},
                         "tasks": [{"name": "caption"}, {"name": "video_caption"}], "limits": limits})
    ex = ExpandSource(job, 36 * 448 * 448, {"caption": ["image", "page"], "video_caption": ["clip"]}, FAMILY)
    src = {"source_uri": "|".join(parts), "source_id": "s", "size": None, "tasks": ["caption", "video_caption"],
           "parts": parts}
    return [r for t in ex(pa.Table.from_pylist([src])) for r in t.to_pylist()]


def test_a_row_is_one_image_unit_with_every_image_in_order(tmp_path, images):
    (row,) = _expand(tmp_path, images)
    assert row["unit_kind"] == "image" and row["unit_index"] == 0 and row["tasks"] == ["caption"]
    assert row["num_frames"] == 3 and row["frame_sizes"] == [[80, 60], [80, 80], [80, 100]]
    first = np.asarray(Image.open(images[0]).convert("RGB"))
    assert row["pixels"][0] == first.tobytes()  # the listed order


def test_a_bad_image_or_too_many_pixels_is_the_rows_error(tmp_path, images):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    (row,) = _expand(tmp_path, [images[0], str(broken)])
    assert row["unit_index"] == -1 and row["error_type"] == "image_decode_failed"
    assert "image 1 of the row" in row["error_message"] and "broken.png" in row["error_message"]
    (row,) = _expand(tmp_path, images, max_pixels=80 * 60 + 80 * 80)  # the third image is one too many
    assert row["error_type"] == "image_too_large" and "first 3 images" in row["error_message"]


def test_inspect_counts_every_image_of_a_row(tmp_path, images):
    from pipeline.inspect_units import inspect_sources
    from pipeline.media.slicing import plan_image
    from pipeline.sources import image_groups

    job = load_job_data({"input": {"uris": ["x"]}, "output": {"uri": str(tmp_path / "o")},
                         "tasks": [{"name": "caption"}]})
    ((_, (rec,)),) = list(inspect_sources(job, FAMILY, image_groups([images[:2]], StorageConfig())))
    assert rec["images"] == 2
    assert rec["placeholder_tokens"] == sum(plan_image(FAMILY, 80, h, use_image_id=True, image_index=k).placeholder_tokens
                                            for k, h in enumerate((60, 80)))

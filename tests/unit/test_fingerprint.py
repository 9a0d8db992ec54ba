"""Resume keys: what changes the question asked of the model changes the task's fingerprint."""

import pytest

from pipeline.config import ModelConfig, TaskConfig, load_job_data
from pipeline.tasks import fingerprint, resolve_task

BASE = {"input": {"uris": ["/data"]}, "output": {"uri": "/out"}}


def _job(**sections):
    return load_job_data({**BASE, **sections})


def _keys(job):
    model = ModelConfig()
    return {name: fingerprint(resolve_task(TaskConfig(name=name)), model, "m", job)
            for name in ("ocr", "video_caption")}


def test_same_settings_same_key():
    assert _keys(_job()) == _keys(_job())
    ocr = resolve_task(TaskConfig(name="ocr"))
    assert fingerprint(ocr, ModelConfig(), "m") != fingerprint(ocr, ModelConfig(max_slice_nums=4), "m")


@pytest.mark.parametrize("sections,changes", [
    # what a page or an image looks like to the model: page and image tasks only
    ({"pdf": {"min_dpi": 100}}, {"ocr"}),
    ({"pdf": {"max_dpi": 200}}, {"ocr"}),
    ({"pdf": {"detect_text_orientation": False}}, {"ocr"}),
    ({"pdf": {"text_layer_min_chars": 10}}, {"ocr"}),  # decides which pages `text_layer: use` skips
    ({"tiling": {"enabled": False}}, {"ocr"}),
    ({"tiling": {"overlap": 0.1}}, {"ocr"}),
    ({"image": {"multi_frame": "all"}}, {"ocr"}),
    ({"limits": {"max_pixels": 10_000_000}}, {"ocr"}),
    # which frames a clip shows: clip tasks only
    ({"video": {"stack_frames": 3}}, {"video_caption"}),
    ({"video": {"max_side": 224}}, {"video_caption"}),
    ({"video": {"fps": 2.0}}, {"video_caption"}),
    ({"limits": {"max_frames": 64}}, {"video_caption"}),
    # speed, or only whether a unit is an error row: no task's key
    ({"pdf": {"plan_ahead_pages": 4}}, set()),
    ({"limits": {"max_pages": 10}}, set()),
    ({"limits": {"max_bytes": 2**20}}, set()),
])
def test_each_setting_changes_the_keys_of_the_tasks_it_affects(sections, changes):
    base, other = _keys(_job()), _keys(_job(**sections))
    assert {name for name in base if base[name] != other[name]} == changes

"""Resume keys: what changes the question asked of the model changes the task's fingerprint."""

from pipeline.config import ModelConfig, TaskConfig, VideoConfig
from pipeline.tasks import fingerprint, resolve_task


def test_video_sampling_is_part_of_a_clip_tasks_key_only():
    model = ModelConfig()
    caption, ocr = resolve_task(TaskConfig(name="video_caption")), resolve_task(TaskConfig(name="ocr"))
    base, stacked = VideoConfig(), VideoConfig(stack_frames=3)
    assert fingerprint(caption, model, "m", base) != fingerprint(caption, model, "m", stacked)
    assert fingerprint(caption, model, "m", base) != fingerprint(caption, model, "m", VideoConfig(max_side=224))
    assert fingerprint(caption, model, "m", base) == fingerprint(caption, model, "m", VideoConfig())
    # pages and images do not depend on video sampling: their keys stay as they were
    assert fingerprint(ocr, model, "m", base) == fingerprint(ocr, model, "m", stacked) == fingerprint(ocr, model, "m")
    assert fingerprint(ocr, model, "m") != fingerprint(ocr, ModelConfig(max_slice_nums=4), "m")

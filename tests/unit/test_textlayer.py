"""Text-layer quality rule and the hint prompt."""

from pipeline.config import TaskConfig
from pipeline.media.textlayer import quality, usable
from pipeline.tasks import resolve_task


def test_quality_and_rule():
    good = "Quarterly report: pages rendered at the model's budget. " * 3
    assert quality(good) == 1.0 and usable(good, 50, 0.97)
    assert quality(None) is None and not usable(None, 50, 0.97) and not usable("", 50, 0.97)
    assert not usable("Page 1", 50, 0.97)  # a scan with a stray page number is not a text layer
    broken = "\ufffd\ufffd\ue000\ue001 abc " * 20  # what broken font encodings give
    assert quality(broken) < 0.5 and not usable(broken, 50, 0.97)


def test_hint_prompt_and_version():
    plain = resolve_task(TaskConfig(name="ocr"))
    hinted = resolve_task(TaskConfig(name="ocr", text_layer="hint", hint_max_chars=100))
    assert hinted.prompt_version == plain.prompt_version + "+hint"
    p = hinted.prompt_for("Hello text layer " * 50)
    assert p.startswith(plain.prompt) and "<text_layer>" in p and len(p) < len(plain.prompt) + 400
    assert hinted.prompt_for(None) == plain.prompt and plain.prompt_for("x" * 80) == plain.prompt

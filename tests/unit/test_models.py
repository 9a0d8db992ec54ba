"""The MiniCPM-V family registry: lookup, detection from config.json, pixel budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.models import FAMILIES, FamilySpec, detect_family, get_family, pixel_budget

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(tmp_path: Path, config: object, name: str = "ckpt") -> Path:
    model_dir = tmp_path / name
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def test_registry_has_the_three_native_families() -> None:
    assert set(FAMILIES) == {"minicpmv4_6", "minicpmv4_7", "minicpm_ocr"}
    for name, spec in FAMILIES.items():
        assert isinstance(spec, FamilySpec) and spec.name == name
        assert spec.native_transformers
        assert spec.scale_resolution == 448 and spec.patch_size == 14
        assert spec.video_max_slice_nums == 1 and not spec.use_image_id_video and spec.use_image_id_images
        assert spec.stop_tokens == ("<|im_end|>", "<|endoftext|>")
    assert FAMILIES["minicpmv4_6"].image_max_slice_nums == 36  # DESIGN.md recommendation
    assert FAMILIES["minicpm_ocr"].downsample_mode == "4x"
    assert FAMILIES["minicpmv4_6"].downsample_mode == "16x"


def test_spec_is_frozen() -> None:
    with pytest.raises(AttributeError):
        FAMILIES["minicpmv4_6"].scale_resolution = 1  # type: ignore[misc]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_detect_family_reads_model_type(tmp_path: Path, family: str) -> None:
    model_dir = _checkpoint(tmp_path, {"model_type": FAMILIES[family].hf_model_type, "architectures": ["X"]})
    assert detect_family(model_dir) == family
    assert detect_family(str(model_dir)) == family


def test_detect_family_unknown_type_lists_supported(tmp_path: Path) -> None:
    model_dir = _checkpoint(tmp_path, {"model_type": "minicpmv"})
    with pytest.raises(ValueError) as err:
        detect_family(model_dir)
    message = str(err.value)
    assert "'minicpmv'" in message
    for spec in FAMILIES.values():
        assert spec.hf_model_type in message


def test_detect_family_missing_model_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported model_type None"):
        detect_family(_checkpoint(tmp_path, {"architectures": ["X"]}))
    with pytest.raises(ValueError, match="unsupported model_type None"):
        detect_family(_checkpoint(tmp_path, ["not", "a", "dict"], name="list"))


def test_detect_family_missing_or_broken_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        detect_family(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        detect_family(broken)


def test_get_family() -> None:
    assert get_family("minicpm_ocr").display == "MiniCPM-OCR 1.0"
    with pytest.raises(ValueError) as err:
        get_family("minicpmv2_6")
    assert "'minicpmv2_6'" in str(err.value)
    assert "minicpm_ocr, minicpmv4_6, minicpmv4_7" in str(err.value)


def test_pixel_budget() -> None:
    spec = get_family("minicpmv4_6")
    assert pixel_budget(spec, 1) == 448 * 448
    assert pixel_budget(spec, 36) == 36 * 448 * 448 == 7_225_344
    assert pixel_budget(spec, spec.image_max_slice_nums) == 7_225_344
    with pytest.raises(ValueError, match="max_slice_nums must be >= 1"):
        pixel_budget(spec, 0)


def test_registry_imports_no_heavy_modules() -> None:
    # The registry is used on CPU actors and in the driver; it must not pull torch/transformers.
    code = "import sys, pipeline.models; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.strip() == "[]"

"""The MiniCPM-V family registry: lookup, detection from config.json, pixel budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.models import (FAMILIES, FamilySpec, check_transformers_version, detect_family, get_family,
                             pixel_budget)

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(tmp_path: Path, config: object, name: str = "ckpt") -> Path:
    model_dir = tmp_path / name
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


NATIVE = {"minicpmv4_6", "minicpmv4_7", "minicpm_ocr"}
LEGACY = {"minicpmv2_0": None, "minicpmv2_5": "2.5", "minicpmv2_6": "2.6", "minicpmv4_0": "4.0", "minicpmv4_5": "4.5"}
UNSERVED = {"minicpmv1_0", "omnilmm_12b"}  # detected, but no engine serves them yet


def test_registry_has_the_native_and_the_minicpmv_generations() -> None:
    assert set(FAMILIES) == NATIVE | set(LEGACY) | UNSERVED
    for name in UNSERVED:
        assert FAMILIES[name].engines == () and FAMILIES[name].note
    for name in LEGACY:
        spec = FAMILIES[name]
        assert not spec.native_transformers and spec.hf_model_type == "minicpmv" and spec.version == LEGACY[name]
        assert "transformers" not in spec.engines and "vllm" in spec.engines
    assert "vllm" not in FAMILIES["minicpm_ocr"].engines  # no vLLM model for it in vLLM 0.32
    for name in NATIVE:
        spec = FAMILIES[name]
        assert isinstance(spec, FamilySpec) and spec.name == name
        assert spec.native_transformers
        assert spec.scale_resolution == 448 and spec.patch_size == 14
        assert spec.video_max_slice_nums == 1 and not spec.use_image_id_video and spec.use_image_id_images
        assert spec.stop_tokens == ("<|im_end|>", "<|endoftext|>")
    assert FAMILIES["minicpmv4_6"].image_max_slice_nums == 36  # the 4.6 model card's recommendation
    assert FAMILIES["minicpm_ocr"].downsample_mode == "4x"
    assert FAMILIES["minicpmv4_6"].downsample_mode == "16x"


def test_spec_is_frozen() -> None:
    with pytest.raises(AttributeError):
        FAMILIES["minicpmv4_6"].scale_resolution = 1  # type: ignore[misc]


@pytest.mark.parametrize("family", sorted(NATIVE))
def test_detect_family_reads_model_type(tmp_path: Path, family: str) -> None:
    model_dir = _checkpoint(tmp_path, {"model_type": FAMILIES[family].hf_model_type, "architectures": ["X"]})
    assert detect_family(model_dir) == family
    assert detect_family(str(model_dir)) == family


@pytest.mark.parametrize("family", sorted(LEGACY))
def test_detect_family_reads_minicpmv_version(tmp_path: Path, family: str) -> None:
    config = {"model_type": "minicpmv", "architectures": ["MiniCPMV"], "version": LEGACY[family]}
    if LEGACY[family] is None:  # 2.0's config has no version: vLLM tells it by its MiniCPM-2B sizes
        config.update(hidden_size=2304, query_num=64)
    model_dir = _checkpoint(tmp_path, config)
    (model_dir / "preprocessor_config.json").write_text("{}")  # every 2.0-4.5 checkpoint ships one
    assert detect_family(model_dir) == family


def test_detect_family_unknown_type_lists_supported(tmp_path: Path) -> None:
    model_dir = _checkpoint(tmp_path, {"model_type": "llava"})
    with pytest.raises(ValueError) as err:
        detect_family(model_dir)
    message = str(err.value)
    assert "'llava'" in message and "minicpmv (1.0-4.5)" in message and "omnilmm" in message
    for name in NATIVE:
        assert FAMILIES[name].hf_model_type in message
    with pytest.raises(ValueError, match="unsupported MiniCPM-V version '9.9'"):
        detect_family(_checkpoint(tmp_path, {"model_type": "minicpmv", "version": "9.9"}, name="v99"))


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
        get_family("minicpmv9_9")
    assert "'minicpmv9_9'" in str(err.value) and "minicpmv4_5" in str(err.value)
    assert "allowed: " + ", ".join(sorted(FAMILIES)) in str(err.value)


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


@pytest.mark.parametrize("family,too_old", [("minicpmv4_6", "5.6.2"), ("minicpmv4_7", "5.17.0"),
                                            ("minicpm_ocr", "5.20.2")])
def test_an_older_transformers_is_refused_with_the_version_and_the_fix(family: str, too_old: str) -> None:
    # transformers 5.17 (a real GPU image's) lacks minicpmv4_7 and minicpm_ocr: from_pretrained
    # then failed with "Unrecognized model identifier" and ~800 model types.
    spec = get_family(family)
    with pytest.raises(RuntimeError) as err:
        check_transformers_version(spec, too_old)
    msg = str(err.value)
    assert spec.display in msg and too_old in msg and f"pip install 'transformers>={spec.min_transformers}'" in msg
    check_transformers_version(spec, spec.min_transformers)  # the minimum itself serves


def test_the_installed_transformers_ships_every_native_family() -> None:
    import importlib

    import transformers
    from packaging.version import Version

    for spec in FAMILIES.values():
        if spec.native_transformers:
            assert Version(transformers.__version__) >= Version(spec.min_transformers)
            importlib.import_module(f"transformers.models.{spec.hf_model_type}")
        else:
            assert spec.min_transformers is None
            check_transformers_version(spec, "4.0.0")  # remote code: no native minimum


def test_tiny_build_refuses_an_older_transformers_before_writing(tmp_path: Path, monkeypatch) -> None:
    import transformers

    from pipeline.tiny import build_tiny

    # Fault injection: the installed version string is what an older environment reports.
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(RuntimeError, match="MiniCPM-V 4.7 needs transformers >= 5.18"):
        build_tiny("minicpmv4_7", tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_use_image_id_that_vllm_would_not_apply_is_refused() -> None:
    """vLLM 0.32 tags every 2.6/4.0/4.5 image with <image_id>N</image_id> and never 2.0/2.5 images."""
    from pipeline.models import check_use_image_id, vllm_placeholder_image_id

    for family in ("minicpmv2_6", "minicpmv4_0", "minicpmv4_5"):
        for engine in ("vllm", "openai"):
            with pytest.raises(ValueError, match="use_image_id=false.*always writes.*remove model.use_image_id"):
                check_use_image_id(family, engine, False)
            check_use_image_id(family, engine, True)
            check_use_image_id(family, engine, None)
        assert vllm_placeholder_image_id(family, False) is True
    for family in ("minicpmv2_0", "minicpmv2_5"):
        with pytest.raises(ValueError, match="never writes"):
            check_use_image_id(family, "vllm", True)
        check_use_image_id(family, "vllm", False)
        assert vllm_placeholder_image_id(family, None) is False
    for family in ("minicpmv4_6", "minicpm_ocr"):  # native processors honour the option
        check_use_image_id(family, "vllm", False)
        assert vllm_placeholder_image_id(family, False) is False


def test_check_job_refuses_use_image_id_false_for_vllm_2_6() -> None:
    from pipeline.config import ConfigError, load_job_data
    from pipeline.engines.factory import check_job

    job = load_job_data({"input": {"uris": ["/tmp/x.png"]}, "output": {"uri": "o"}, "model": {"use_image_id": False}})
    with pytest.raises(ConfigError, match="engine.kind vllm: model.use_image_id=false"):
        check_job(job, "minicpmv2_6", "vllm")
    check_job(job, "minicpmv4_6", "vllm")


@pytest.mark.parametrize("family", sorted(UNSERVED))
def test_unserved_families_fail_fast_with_the_reason(family: str) -> None:
    from pipeline.config import ConfigError
    from pipeline.engines.factory import resolve_kind

    for kind in ("auto", "vllm", "transformers"):
        with pytest.raises(ConfigError, match=f"no engine serves {FAMILIES[family].display}"):
            resolve_kind(kind, family)


def test_detection_per_generation_from_the_reference_checkpoint_files(tmp_path: Path) -> None:
    """The real 2.0 and 2.5 config.json files; 1.0 is 2.0's config without an image processor
    config (the README's facts: 1.0 has no preprocessor_config.json, vLLM cannot load it)."""
    from tests.reference import reference_dir

    ref = reference_dir()
    for family, prefix in (("minicpmv2_0", "v20"), ("minicpmv2_5", "v25")):
        model_dir = tmp_path / family
        model_dir.mkdir()
        (model_dir / "config.json").write_text((ref / f"{prefix}_config.json").read_text())
        (model_dir / "preprocessor_config.json").write_text((ref / f"{prefix}_preprocessor_config.json").read_text())
        assert detect_family(model_dir) == family
    one = tmp_path / "one"
    one.mkdir()
    config = json.loads((ref / "v20_config.json").read_text())
    config["_name_or_path"] = "openbmb/MiniCPM-V"
    (one / "config.json").write_text(json.dumps(config))
    assert detect_family(one) == "minicpmv1_0"
    from pipeline.models import family_from_config

    assert family_from_config(config) == "minicpmv1_0"  # config only: its hub name tells
    config["_name_or_path"] = "somewhere/else"
    assert family_from_config(config, files=["config.json"]) == "minicpmv1_0"
    assert family_from_config(config, files=["config.json", "preprocessor_config.json"]) == "minicpmv2_0"
    omni = _checkpoint(tmp_path, {"model_type": "omnilmm", "architectures": ["OmniLMMForCausalLM"]}, name="omni")
    assert detect_family(omni) == "omnilmm_12b"

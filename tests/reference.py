"""The real MiniCPM-V remote-code files and vLLM's minicpmv.py, loaded from ../shared/reference.

They are third-party test data kept outside the project (never copied into it): tests import them
from their file paths. CPMV_REFERENCE_DIR names another copy; without one the tests that need them
skip, saying where the files were looked for.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """The directory of the reference files, or a pytest skip naming where it was looked for."""
    named = os.environ.get("CPMV_REFERENCE_DIR")
    candidates = [Path(named)] if named else [ROOT.parent / "shared/reference/minicpmv-remote-code",
                                              Path("/work/shared/reference/minicpmv-remote-code")]
    for path in candidates:
        if (path / "README.md").is_file():
            return path
    pytest.skip(f"reference remote-code files not found in {', '.join(map(str, candidates))} "
                f"(set CPMV_REFERENCE_DIR)")


@cache
def load(stem: str, module_name: str | None = None) -> ModuleType:
    """Import `<reference_dir>/<stem>.py` as a module (once per process)."""
    path = reference_dir() / f"{stem}.py"
    name = module_name or f"cpmv_reference_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# family -> (image processor file stem, preprocessor_config kwargs that differ from the class defaults)
IMAGE_PROCESSORS = {
    "minicpmv2_0": ("v20_image_processing_minicpmv", {"image_feature_size": 64}),
    "minicpmv2_5": ("v25_image_processing_minicpmv", {"image_feature_size": 96, "version": 2.5}),
    # 2.6, 4.0 and 4.5 share the slicing and placeholder methods of this processor (README).
    "minicpmv2_6": ("o26_fix_image_processing_minicpmv", {"image_feature_size": 64, "version": 2.6}),
    "minicpmv4_0": ("o26_fix_image_processing_minicpmv", {"image_feature_size": 64, "version": 4.0}),
    "minicpmv4_5": ("o26_fix_image_processing_minicpmv", {"image_feature_size": 64, "version": 4.5}),
}


def image_processor(family: str, **kwargs):
    """The real `MiniCPMVImageProcessor` of `family`, built as its preprocessor_config builds it."""
    stem, defaults = IMAGE_PROCESSORS[family]
    return load(stem).MiniCPMVImageProcessor(**{**defaults, **kwargs})

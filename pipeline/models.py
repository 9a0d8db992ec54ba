"""The MiniCPM-V family registry: one table of what differs between model generations.

Every other module asks this table (never `if family == ...`) for slicing parameters, recommended
processor options and stop tokens. It reads checkpoints' `config.json` only, so it stays free of
torch/transformers imports and is cheap to use on CPU actors and in the driver.

Values come from the transformers >= 5.7 processors (`models/minicpmv4_6`, `minicpmv4_7`,
`minicpm_ocr`) and the recommended settings of the MiniCPM-V 4.6 model card. The processors' own class defaults differ from the
recommended values below: they use `max_slice_nums=9` and `use_image_id=True` for images *and*
video frames; the engines pass the recommended values explicitly.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FamilySpec:
    """What the pipeline needs to know about one MiniCPM-V generation."""

    name: str  # registry key, also the `family` value in job files
    hf_model_type: str  # `model_type` in the checkpoint's config.json
    display: str  # human-readable name for reports
    scale_resolution: int  # side of the pixel budget of the overview and of each slice
    image_max_slice_nums: int  # recommended slices per image (processor default is 9)
    video_max_slice_nums: int  # recommended slices per video frame (1: frames are not sliced)
    use_image_id_images: bool  # prefix each image with <image_id>N</image_id>
    use_image_id_video: bool  # video frames carry no id tag
    stop_tokens: tuple[str, ...]  # generation stops on any of these (chat turn end, document end)
    native_transformers: bool  # served by transformers' own classes (no trust_remote_code)
    patch_size: int = 14  # vision patch side the processors assume
    downsample_mode: str = "16x"  # default visual-token downsampling of the checkpoint/processor
    version: str | None = None  # `version` in config.json of the `minicpmv` generations (2.6 ... 4.5)
    engines: tuple[str, ...] = ("transformers", "vllm", "openai")  # engines that serve this family
    # First transformers release that ships this family's native classes (`models/<model_type>/` in
    # the wheel): 5.7.0 has minicpmv4_6 only, 5.18.0 adds minicpmv4_7, 5.21.0 adds minicpm_ocr.
    min_transformers: str | None = None
    # Smallest image side (px) the processor takes. The remote-code processors of 2.0-4.5 infer the
    # channel axis from the first image's array: an (H, W, 3) image with H of 1 or 3 is taken for
    # channels-first and `preprocess` raises (seen with the real v20/v25/o26 files). We refuse every
    # side below 4 for them: such an image carries nothing the model can read anyway.
    min_image_side: int = 1
    # How a user turn becomes the prompt: "template" (the tokenizer's chat template) or "minicpm_v2"
    # (`<用户>...<AI>`: 1.0/2.0's tokenizer has no chat template and its own apply_chat_template).
    chat_format: str = "template"
    # Text between an image placeholder and the prompt text: 2.0's placeholder already ends with "\n".
    image_separator: str = "\n"
    # vLLM's `minicpmv` model writes `<image_id>N</image_id>` before every image whatever
    # `use_image_id` says (2.6/4.0/4.5); 2.0/2.5's placeholders have no id at all.
    vllm_image_id: bool | None = None  # None: the engine honours use_image_id
    slices: bool = True  # False: the processor never slices (1.0 resizes every image to 448x448)
    note: str = ""  # why no engine (or which engine not) serves it, shown by `cpmv models`
    # A thinking mode behind the chat template's `enable_thinking` (Qwen3 / Qwen3.5 backbones: 4.5, 4.6,
    # 4.7; what tasks[].thinking needs). Older generations have no reasoning training; MiniCPM-OCR 1.0 is an
    # OCR model whose thinking mode we have no evidence of, so it is refused rather than guessed.
    thinking: bool = False


# The Qwen3.5 text backbone ends an assistant turn with <|im_end|>; <|endoftext|> ends a document
# and is what a base-style continuation emits. Both are generation stops (ids 248046/248044 in the
# real vocab).
_QWEN_STOPS = ("<|im_end|>", "<|endoftext|>")

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="minicpmv4_6",
            hf_model_type="minicpmv4_6",
            thinking=True,
            display="MiniCPM-V 4.6",
            scale_resolution=448,
            image_max_slice_nums=36,
            video_max_slice_nums=1,
            use_image_id_images=True,
            use_image_id_video=False,
            stop_tokens=_QWEN_STOPS,
            native_transformers=True,
            downsample_mode="16x",
            min_transformers="5.7",
        ),
        FamilySpec(
            name="minicpmv4_7",
            hf_model_type="minicpmv4_7",
            thinking=True,
            display="MiniCPM-V 4.7",
            scale_resolution=448,
            image_max_slice_nums=36,
            video_max_slice_nums=1,
            use_image_id_images=True,
            # The 4.7 processor never tags video frames with ids, whatever use_image_id says.
            use_image_id_video=False,
            stop_tokens=_QWEN_STOPS,
            native_transformers=True,
            downsample_mode="16x",
            min_transformers="5.18",
        ),
        FamilySpec(
            name="minicpm_ocr",
            hf_model_type="minicpm_ocr",
            display="MiniCPM-OCR 1.0",
            scale_resolution=448,
            image_max_slice_nums=36,
            video_max_slice_nums=1,
            use_image_id_images=True,
            use_image_id_video=False,
            stop_tokens=_QWEN_STOPS,
            native_transformers=True,
            # Text-dense pages are read with 4x more visual tokens than the V models.
            downsample_mode="4x",
            min_transformers="5.21",
            engines=("transformers", "openai"),  # no vLLM model for it in vLLM 0.32
        ),
    )
}


def _legacy(name: str, display: str, version: str | None, stops: tuple[str, ...], **extra) -> FamilySpec:
    # vLLM's `minicpmv` model with the checkpoint's remote-code processor: 9 slices of 448^2, fixed
    # query_num tokens per slice, ids on images; transformers has no native class for them.
    fields = dict(name=name, hf_model_type="minicpmv", display=display, scale_resolution=448,
                  image_max_slice_nums=9, video_max_slice_nums=1, use_image_id_images=True,
                  use_image_id_video=False, stop_tokens=stops, native_transformers=False,
                  version=version, engines=("vllm", "openai"), min_image_side=4, vllm_image_id=True)
    fields.update(extra)
    return FamilySpec(**fields)


_NOT_SERVED_1_0 = ("vLLM cannot load it (no image processor config) and transformers has no native class; "
                   "a remote-code transformers engine is designed but not built (issue 12)")
_NO_OPENAI_2_0 = ("a vLLM OpenAI server cannot render its prompt: 2.0's tokenizer has no chat template and overrides "
                  "apply_chat_template(conversation, add_image_msg), which vLLM's server calls with tools=, "
                  "chat_template= and tokenize= (TypeError, HTTP 400 for every request, with or without "
                  "--chat-template); engine.kind vllm writes 2.0's <用户>...<AI> prompt itself")
_NOT_SERVED_OMNI = ("model_type omnilmm (EVA02 vision tower + resampler + Mistral-7B): no vLLM or transformers "
                    "model exists for it; a remote-code engine is designed but not built (issue 12)")

FAMILIES.update({
    spec.name: spec
    for spec in (
        # 1.0 (openbmb/MiniCPM-V): 2.0's config and prompt format, but one 448x448 image of 64 tokens.
        _legacy("minicpmv1_0", "MiniCPM-V 1.0", None, ("</s>",), use_image_id_images=False,
                vllm_image_id=None, chat_format="minicpm_v2", image_separator="", image_max_slice_nums=1,
                slices=False, engines=(), note=_NOT_SERVED_1_0),
        # 2.0/2.5 placeholders carry no image id (vLLM asks their processor without one).
        _legacy("minicpmv2_0", "MiniCPM-V 2.0", None, ("</s>", "<|im_end|>"), use_image_id_images=False,
                vllm_image_id=False, chat_format="minicpm_v2", image_separator="", engines=("vllm",),
                note=_NO_OPENAI_2_0),
        _legacy("minicpmv2_5", "MiniCPM-Llama3-V 2.5", "2.5", ("<|eot_id|>", "<|end_of_text|>"),
                use_image_id_images=False, vllm_image_id=False),
        _legacy("minicpmv2_6", "MiniCPM-V 2.6", "2.6", _QWEN_STOPS),
        _legacy("minicpmv4_0", "MiniCPM-V 4.0", "4.0", _QWEN_STOPS),
        _legacy("minicpmv4_5", "MiniCPM-V 4.5", "4.5", _QWEN_STOPS, thinking=True),
        FamilySpec(name="omnilmm_12b", hf_model_type="omnilmm", display="OmniLMM-12B", scale_resolution=448,
                   image_max_slice_nums=1, video_max_slice_nums=1, use_image_id_images=False,
                   use_image_id_video=False, stop_tokens=("</s>",), native_transformers=False, engines=(),
                   slices=False, note=_NOT_SERVED_OMNI),
    )
})

_BY_MODEL_TYPE: dict[str, str] = {spec.hf_model_type: spec.name for spec in FAMILIES.values()
                                   if spec.hf_model_type != "minicpmv"}
_BY_VERSION: dict[str, str] = {spec.version: spec.name for spec in FAMILIES.values() if spec.version}


def family_from_config(config: dict, files: Collection[str] | None = None) -> str:
    """Family of a checkpoint from its config.json: native `model_type`, else `minicpmv` + `version`.

    `files` are the file names at the checkpoint's root when known. They tell MiniCPM-V 1.0 from
    2.0: both configs are `minicpmv` without a version, with hidden_size 2304 and query_num 64, but
    only 2.0 ships an image processor (`preprocessor_config.json`; 1.0 resizes in its modeling code,
    which is also why vLLM cannot load 1.0). Without `files`, a `_name_or_path` of
    `openbmb/MiniCPM-V` means 1.0; otherwise such a config is taken for 2.0 (vLLM's rule).
    Raises ValueError naming what is supported.
    """
    if not isinstance(config, dict):
        config = {}
    model_type = config.get("model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    if model_type == "minicpmv" or "MiniCPMV" in (config.get("architectures") or []):
        version = config.get("version")
        if version is None:  # the oldest configs carry no version (vLLM's own rule tells 2.0 from 2.5)
            if config.get("hidden_size") != 2304 or config.get("query_num") != 64:
                return "minicpmv2_5"
            if files is not None:
                return "minicpmv2_0" if "preprocessor_config.json" in files else "minicpmv1_0"
            return "minicpmv1_0" if config.get("_name_or_path") == "openbmb/MiniCPM-V" else "minicpmv2_0"
        if str(version) in _BY_VERSION:
            return _BY_VERSION[str(version)]
        raise ValueError(f"unsupported MiniCPM-V version {version!r}; supported: {', '.join(sorted(_BY_VERSION))}")
    supported = ", ".join(sorted(_BY_MODEL_TYPE)) + ", minicpmv (1.0-4.5)"
    raise ValueError(f"unsupported model_type {model_type!r}; supported model types: {supported}")


def check_thinking(family: str, tasks: Collection[str]) -> None:
    """Refuse `tasks[].thinking` (the ids in `tasks`) for a generation without a thinking mode
    (FamilySpec.thinking). Raises ValueError naming the field and the fix."""
    spec = get_family(family)
    if tasks and not spec.thinking:
        with_it = ", ".join(f"{n} ({s.display})" for n, s in FAMILIES.items() if s.thinking)
        raise ValueError(f"tasks[].thinking is set for task(s) {', '.join(sorted(tasks))}, but {spec.display} has no "
                         f"thinking mode: remove `thinking: true`, or run a generation that has one: {with_it}")


def min_image_side(family: str) -> int:
    """Smallest width and height (px) an image of `family` may have to reach the engine.

    2.0-4.5 (and 1.0, same code lineage): 4, because their remote-code processors raise on an image
    whose height is 1 or 3 px (the channel axis is guessed from the array shape); 4.6/4.7/OCR: 1
    (their processors take any size). Preprocessing turns smaller images into `image_too_small` rows.
    """
    return get_family(family).min_image_side


def separator_tokens(family: str) -> int:
    """Tokens the engines write between each image (or clip) placeholder and the prompt text.

    2.5-4.5 prompts are `placeholder + "\\n"` per image, then the text (the model cards' `chat()`
    joins image and text with "\\n"; vLLM's own examples and its OpenAI server do the same): one
    token, a lone "\\n" in the Llama 3 and Qwen2 vocabularies. 1.0/2.0's placeholder ends with its
    own "\\n" (counted in the placeholder); the native 4.6+ chat templates place the image tokens
    themselves (counted with the text by the engine's tokenizer, or not at all): 0.
    """
    spec = get_family(family)
    return 1 if spec.image_separator and not spec.native_transformers else 0


def vllm_placeholder_image_id(family: str, use_image_id: bool | None) -> bool:
    """Whether vLLM's prompt for an image of `family` carries `<image_id>N</image_id>`.

    vLLM 0.32's `minicpmv` model asks the processor for the placeholder with `use_image_id=True` for
    2.6/4.0/4.5 and without ids for 2.0/2.5 (`MiniCPMVMultiModalProcessor.get_image_prompt_texts`),
    whatever the job says; native models honour the option (None: the family default).
    """
    spec = get_family(family)
    if spec.vllm_image_id is not None:
        return spec.vllm_image_id
    return spec.use_image_id_images if use_image_id is None else use_image_id


def check_use_image_id(family: str, engine: str, use_image_id: bool | None) -> None:
    """Refuse a `use_image_id` that `engine` would not apply to `family` (ValueError naming the fix).

    vLLM (offline or behind the HTTP engine) always tags 2.6/4.0/4.5 images and never 2.0/2.5
    images, so the model would see other tokens than the job, `cpmv inspect` and the guard count.
    """
    spec = get_family(family)
    if use_image_id is None or engine not in ("vllm", "openai") or spec.vllm_image_id is None:
        return
    if use_image_id != spec.vllm_image_id:
        forced = "always writes" if spec.vllm_image_id else "never writes"
        raise ValueError(
            f"model.use_image_id={str(use_image_id).lower()}: vLLM {forced} an <image_id> tag for {spec.display} "
            f"images, whatever the option says; remove model.use_image_id (or set it to "
            f"{str(spec.vllm_image_id).lower()})"
        )


def served_by(family: str) -> tuple[str, ...]:
    """Engines that serve `family` (empty when none does yet; `note` says why)."""
    return get_family(family).engines


def check_transformers_version(spec: FamilySpec, installed: str) -> None:
    """Fail fast when the installed transformers predates `spec`'s native classes.

    Without this, an older transformers (5.17 on a GPU image, say) fails inside `from_pretrained`
    with "Unrecognized model identifier" and a list of some 800 model types. Raises RuntimeError
    naming the family, both versions and the pip command; a no-op for families without native classes.
    """
    from packaging.version import Version

    if spec.min_transformers is None or Version(installed) >= Version(spec.min_transformers):
        return
    raise RuntimeError(
        f"{spec.display} needs transformers >= {spec.min_transformers} (its native `{spec.hf_model_type}` "
        f"classes first ship there); this environment has transformers {installed}. "
        f"Fix: pip install 'transformers>={spec.min_transformers}'"
    )


def get_family(name: str) -> FamilySpec:
    """Return the spec of family `name`; ValueError naming the allowed values otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        allowed = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unknown model family {name!r}; allowed: {allowed}") from None


def detect_family(model_dir: str | Path) -> str:
    """Read `model_dir/config.json` and map it to a family name (see `family_from_config`).

    Raises ValueError (not KeyError/FileNotFoundError) with the supported types, so a job pointing
    at the wrong checkpoint fails at startup with a message a user can act on.
    """
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no config.json in {model_dir}; expected a MiniCPM-V checkpoint") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {config_path}: {exc}") from exc
    files = {p.name for p in Path(model_dir).iterdir()}
    try:
        return family_from_config(config, files)
    except ValueError as exc:
        raise ValueError(f"{exc} (in {config_path})") from None


def pixel_budget(spec: FamilySpec, max_slice_nums: int) -> int:
    """Pixels worth rendering for one image: beyond this the processor only downsamples.

    The processor cuts an image into at most `max_slice_nums` slices of about
    `scale_resolution`**2 pixels each, so rendering a PDF page (or decoding an image) larger than
    that budget spends CPU on detail the model never sees.
    """
    if max_slice_nums < 1:
        raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")
    return max_slice_nums * spec.scale_resolution**2

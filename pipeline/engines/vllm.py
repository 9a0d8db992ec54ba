"""The vLLM engine: every MiniCPM-V generation vLLM serves, behind the Engine interface.

Two kinds of model sit behind vLLM:

* MiniCPM-V 2.0 - 4.5 go through vLLM's `minicpmv` model with the checkpoint's remote-code
  processor (`trust_remote_code`). Prompts are strings with one `(<image>./</image>)` per image
  (`(<video>./</video>)` per clip) in the user turn; vLLM expands them.
* MiniCPM-V 4.6 / 4.7 go through vLLM's native models and the transformers processors. Prompts
  come from the chat template with one image (or video) content item per image (clip); the
  template renders the tokenizer's `image_token` / `video_token`, which vLLM expands.

What differs between generations is one table, not `if`s: the family facts (stop tokens, slices,
downsample mode) are pipeline.models.FAMILIES, the vLLM-only knobs are `VLLM_SETTINGS` here. Per request the engine
resolves the processor options (family recommendation < engine setting < request override),
passes them as `mm_processor_kwargs`, and returns replies in input order. One generate call
serves the whole batch; if vLLM rejects the batch (a prompt longer than `max_model_len`, an
image its processor cannot take), the requests run one by one so that only the bad ones become
error replies. A dead engine raises: the stage restarts the actor.

vLLM is imported inside methods only: importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engines.base import Engine, Reply, Request, check_visuals, error_reply
from pipeline.models import min_image_side

log = logging.getLogger(__name__)

_PROCESSOR_OPTIONS = ("max_slice_nums", "use_image_id", "downsample_mode")
_DOWNSAMPLE_MODES = ("4x", "16x")


@dataclass(frozen=True)
class VLLMSettings:
    """How vLLM drives one generation: only what vLLM adds to the family facts in pipeline.models."""

    native: bool  # vLLM native model + transformers processor (else `minicpmv` + remote code)
    supports_video: bool = True
    # Resampler code calls torch.cuda.is_current_stream_capturing(), which fails without a GPU.
    needs_stream_capture_patch: bool = False
    # vLLM 0.32's MiniCPMV dispatcher reads LoRA tables that its 2.0 class lacks (AttributeError).
    needs_v20_dispatch_patch: bool = False
    # transformers 5 drops the tokenizer.json pipeline of a remote-code fast tokenizer with its own
    # __init__ (2.5's): prompts would lose every space and newline (_patch_remote_tokenizer_json).
    needs_tokenizer_json_patch: bool = False


# Placeholders of the `minicpmv` generations (vLLM's MiniCPMVProcessingInfo patterns).
LEGACY_IMAGE_PLACEHOLDER = "(<image>./</image>)"
LEGACY_VIDEO_PLACEHOLDER = "(<video>./</video>)"

#: vLLM-specific knobs per family. Stop tokens, recommended slices, image ids, downsample mode and
#: which engines serve a family come from pipeline.models.FAMILIES (one table for every engine).
VLLM_SETTINGS: dict[str, VLLMSettings] = {
    # 2.0 (MiniCPM-2B) and 2.5 (Llama-3) are images only in vLLM.
    "minicpmv2_0": VLLMSettings(native=False, supports_video=False, needs_stream_capture_patch=True,
                                needs_v20_dispatch_patch=True),
    "minicpmv2_5": VLLMSettings(native=False, supports_video=False, needs_stream_capture_patch=True,
                                needs_tokenizer_json_patch=True),
    "minicpmv2_6": VLLMSettings(native=False, needs_stream_capture_patch=True),
    "minicpmv4_0": VLLMSettings(native=False, needs_stream_capture_patch=True),
    "minicpmv4_5": VLLMSettings(native=False),
    "minicpmv4_6": VLLMSettings(native=True),
    "minicpmv4_7": VLLMSettings(native=True),
    "minicpm_ocr": VLLMSettings(native=True),  # no vLLM model in 0.32 (FAMILIES' engines say so)
}


@dataclass(frozen=True)
class Generation:
    """One family as the vLLM engine sees it: the FAMILIES facts plus VLLM_SETTINGS."""

    name: str
    native: bool
    stop_tokens: tuple[str, ...]
    image_max_slice_nums: int
    video_max_slice_nums: int
    use_image_id_images: bool
    downsample_mode: str | None  # only the native (4.6+) models have 4x/16x visual-token downsampling
    supports_video: bool
    needs_stream_capture_patch: bool
    vllm_supported: bool
    needs_v20_dispatch_patch: bool = False
    chat_format: str = "template"  # pipeline.models.FamilySpec.chat_format
    image_separator: str = "\n"  # between the image placeholders and the prompt text
    max_images: int | None = None  # the reference processor's limit per prompt (2.0: one)


def generation(family: str) -> Generation:
    """The vLLM view of `family` (ValueError naming the allowed families otherwise)."""
    from pipeline.models import get_family

    spec = get_family(family)
    try:
        knobs = VLLM_SETTINGS[family]
    except KeyError:
        raise ValueError(f"{spec.display} has no vLLM settings; known: {', '.join(VLLM_SETTINGS)}") from None
    return Generation(
        name=spec.name, native=knobs.native, stop_tokens=spec.stop_tokens,
        image_max_slice_nums=spec.image_max_slice_nums, video_max_slice_nums=spec.video_max_slice_nums,
        use_image_id_images=spec.use_image_id_images,
        downsample_mode=spec.downsample_mode if knobs.native else None,
        supports_video=knobs.supports_video, needs_stream_capture_patch=knobs.needs_stream_capture_patch,
        needs_v20_dispatch_patch=knobs.needs_v20_dispatch_patch,
        vllm_supported="vllm" in spec.engines, chat_format=spec.chat_format, image_separator=spec.image_separator,
        # 2.0's processor asserts at most one image per prompt (v20_processing_minicpmv.py).
        max_images=1 if spec.chat_format == "minicpm_v2" else None,
    )


#: MiniCPM-V 1.0/2.0 turns (their tokenizer's own `apply_chat_template`, v20_tokenization_minicpmv.py):
#: `<用户>` + user text + `<AI>`; the tokenizer adds `<s>` when the prompt is encoded.
MINICPM_V2_USER, MINICPM_V2_AI = "<用户>", "<AI>"


def legacy_user_content(gen: Generation, n_items: int, prompt: str, token: str = LEGACY_IMAGE_PLACEHOLDER) -> str:
    """The user text of a 2.0-4.5 prompt: one `token` per image (or clip), then the prompt.

    2.0's placeholder ends with "\\n" (its tokenizer's `apply_chat_template` puts the image right
    before the text); 2.5+ placeholders do not, so a "\\n" separates them (vLLM's own examples).
    """
    return "".join(token + gen.image_separator for _ in range(n_items)) + prompt


def render_user_turn(gen: Generation, content: Any, tokenizer: Any, thinking: bool = False) -> str:
    """The prompt text of one user turn and the start of the reply, as the family's reference builds it.

    `content` is a string (the legacy generations: placeholders + text) or a list of content items
    (native chat templates). 1.0/2.0 have no chat template: their tokenizer's `apply_chat_template`
    takes (conversation, add_image_msg) and writes `<用户>...<AI>`, so calling it the ChatML way raises
    TypeError; this writes the same text. `thinking`: the template's `enable_thinking` (tasks[].thinking;
    only generations with a thinking mode get it, pipeline.models.check_thinking).
    """
    if gen.chat_format == "minicpm_v2":
        return MINICPM_V2_USER + content + MINICPM_V2_AI
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )


def render_conversation(gen: Generation, turns: list[tuple[str, Any]], tokenizer: Any, thinking: bool = False) -> str:
    """The prompt text of a conversation (`(role, content)` turns ending with the user's) and the start
    of the reply: few-shot examples as earlier user/assistant turns (the MiniCPM-V model card's layout,
    which the 2.6-4.5 `chat()` renders through the tokenizer's chat template). One user turn is
    `render_user_turn`. 1.0/2.0 take one image per prompt, so no examples: ValueError. `thinking` as
    in `render_user_turn`.
    """
    if len(turns) == 1:
        return render_user_turn(gen, turns[0][1], tokenizer, thinking=thinking)
    if gen.chat_format == "minicpm_v2":
        raise ValueError(f"{gen.name} takes one image per prompt (its processor's limit): few-shot examples with "
                         f"images cannot go before the unit; remove tasks[].examples")
    return tokenizer.apply_chat_template(
        [{"role": role, "content": content} for role, content in turns], tokenize=False,
        add_generation_prompt=True, enable_thinking=thinking,
    )


def conversation_turns(gen: Generation, request: Any, image_token: str = LEGACY_IMAGE_PLACEHOLDER,
                       video_token: str = LEGACY_VIDEO_PLACEHOLDER) -> list[tuple[str, Any]]:
    """(role, content) turns of `request` (an engines.base.Request): each few-shot example as a user
    turn of its images and prompt and an assistant turn of its answer, then the unit's user turn (one
    item per image, or one for a clip). Content is a list of items for the native templates and the
    placeholder text for 2.0-4.5 (`legacy_user_content`, as their `chat()` joins images and text);
    the examples' images come first in multi_modal_data, as their placeholders do in the text."""

    def user(n_items: int, text: str, kind: str) -> Any:
        if gen.native:
            return [{"type": kind} for _ in range(n_items)] + [{"type": "text", "text": text}]
        return legacy_user_content(gen, n_items, text, video_token if kind == "video" else image_token)

    turns: list[tuple[str, Any]] = []
    for ex in request.examples:
        turns += [("user", user(len(ex.images), ex.prompt, "image")),
                  ("assistant", [{"type": "text", "text": ex.answer}] if gen.native else ex.answer)]
    n_items = (1 if request.images else 0) if request.is_video else len(request.images)
    turns.append(("user", user(n_items, request.prompt, "video" if request.is_video else "image")))
    return turns


def _patch_stream_capture_on_cpu() -> None:
    """vLLM's 2.x/4.0 resampler asks CUDA whether a graph is being captured; on CPU say no."""
    import torch

    if not torch.cuda.is_available():
        torch.cuda.is_current_stream_capturing = lambda: False  # type: ignore[assignment]


def _patch_v20_dispatch() -> None:
    """Two faults that stop every MiniCPM-V 2.0 request in vLLM 0.32 (found with the real 2.0 files).

    `MiniCPMV.__new__` copies `packed_modules_mapping` and `embedding_modules` from the class it
    dispatches to, and `MiniCPMV2_0` (not a LoRA model) has neither: the load stops with
    AttributeError; empty tables are what a model without LoRA support means. And the image sizes
    (below). The patches are in this process: they reach vLLM's engine core where that runs
    in-process (CPU) or is forked."""
    from vllm.model_executor.models import minicpmv
    from vllm.transformers_utils.processors import minicpmv as processors

    cls = getattr(minicpmv, "MiniCPMV2_0", None)
    for name in ("packed_modules_mapping", "embedding_modules"):
        if cls is not None and not hasattr(cls, name):
            setattr(cls, name, {})
    # vLLM's processor wants `image_sizes` per prompt ([[(w, h), ...]], as 2.5+'s image processors
    # return it); 2.0's image processor returns one flat list [(w, h), ...], so every 2.0 image
    # failed vLLM's `len(image_tags) == len(image_sizes[0])` check. Nest it (one prompt per call).
    proc = processors.MiniCPMVProcessor
    convert = proc._convert_images_texts_to_inputs
    if getattr(convert, "_cpmv_nests_sizes", False):
        return

    def nested_sizes(self, images, texts, *args, **kwargs):
        sizes = images.get("image_sizes") if len(images) else None
        if sizes is not None and _flat_sizes(sizes):
            images["image_sizes"] = [sizes]
        return convert(self, images, texts, *args, **kwargs)

    nested_sizes._cpmv_nests_sizes = True  # type: ignore[attr-defined]
    proc._convert_images_texts_to_inputs = nested_sizes


def _patch_remote_tokenizer_json() -> None:
    """Load a remote-code fast tokenizer from its tokenizer.json as a whole (MiniCPM-Llama3-V 2.5).

    transformers 5 (seen in 5.19 and 5.24) rebuilds a `TokenizersBackend` subclass that defines its
    own `__init__` - 2.5's `MiniCPMVTokenizerFast` does - from the vocab and merges alone: no
    pre-tokenizer and no byte-level decoder, so every space, newline and non-ASCII character of a
    prompt is silently dropped. `convert_to_native_format` keeps the whole tokenizer.json when told
    `trust_remote_code`, but `from_pretrained` never passes that flag on; this passes it for classes
    loaded as remote code (module `transformers_modules.*`), which the user opted into. The patch
    is in this process, where vLLM tokenizes prompts and detokenizes replies (its front end).
    """
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    convert = TokenizersBackend.convert_to_native_format.__func__
    if getattr(convert, "_cpmv_keeps_json", False):
        return

    def keep_json(cls, trust_remote_code=False, **kwargs):
        remote = cls.__module__.startswith("transformers_modules.")
        return convert(cls, trust_remote_code=trust_remote_code or remote, **kwargs)

    keep_json._cpmv_keeps_json = True  # type: ignore[attr-defined]
    TokenizersBackend.convert_to_native_format = classmethod(keep_json)


def _check_whitespace_kept(tokenizer: Any, model_dir: str) -> None:
    """Fail fast when the loaded tokenizer drops spaces or newlines (a broken tokenizer pipeline,
    see _patch_remote_tokenizer_json): every prompt would reach the model mangled."""
    def ids(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    if ids("a b") == ids("ab") or ids("a\nb") == ids("ab"):
        raise ValueError(
            f"the tokenizer of {model_dir} ({type(tokenizer).__name__}) drops spaces or newlines: its "
            f"tokenizer.json pre-tokenizer was not loaded (transformers {_transformers_version()}); "
            f"prompts would reach the model without them. Fix: a tokenizer class without its own __init__ in the "
            f"checkpoint, or a transformers release that loads tokenizer.json whole for remote-code tokenizers "
            f"(the engine does this itself for MiniCPM-Llama3-V 2.5)"
        )


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _flat_sizes(sizes: Any) -> bool:
    """Whether `sizes` is one flat list of (width, height) (tuples, (2,) tensors, or one (n, 2)
    tensor), rather than one such list per prompt."""
    ndim = getattr(sizes, "ndim", None)
    if ndim is not None:
        return ndim == 2
    first = sizes[0] if len(sizes) else None
    if getattr(first, "ndim", None) is not None:  # a list of (2,) tensors: what 2.0's processor returns
        return first.ndim == 1 and len(first) == 2
    return isinstance(first, (tuple, list)) and len(first) == 2 and all(isinstance(v, int) for v in first)


def _bos_added_twice(tokenizer: Any) -> str | None:
    """The BOS text when `tokenizer` adds BOS on encode itself (so a template's own copy would double
    it), else None. Qwen's tokenizers (2.6+) add none; 2.0's adds `<s>` but its prompt has none."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return None
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bos if ids[:1] == [bos_id] and tokenizer.encode("a", add_special_tokens=False)[:1] != [bos_id] else None


def _is_engine_dead(exc: BaseException) -> bool:
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover - other vLLM layouts
        return False
    return isinstance(exc, EngineDeadError)


class VLLMEngine(Engine):
    """MiniCPM-V through `vllm.LLM` (offline, batched)."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        family: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        downsample_mode: str | None = None,
        max_model_len: int = 8192,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        load_format: str = "auto",
        enforce_eager: bool = False,
        max_images_per_prompt: int = 8,
        max_frames_per_video: int = 64,
        cpu_kvcache_space_gib: float = 2.0,
        seed: int = 0,
        max_num_seqs: int | None = None,
    ) -> None:
        """Start a vLLM engine over the local checkpoint `model_dir`.

        `max_slice_nums` / `use_image_id` set the image defaults (video frames keep 1 slice and no
        ids), `downsample_mode` (4.6+) applies to both. On a CPU-only host the engine runs
        in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: 3-10 s instead of ~20+ s to start), sizes its
        KV cache to `cpu_kvcache_space_gib` (vLLM would otherwise take most of the RAM) and uses
        bfloat16 for dtype "auto" (vLLM's CPU kernels for the 4.6+ backbone require it).
        `max_num_seqs` (engine.vllm.max_num_seqs) caps the sequences vLLM schedules in one step;
        None keeps vLLM's own default.
        """
        from pipeline.models import check_use_image_id, detect_family

        self.model_dir = str(model_dir)
        self.family = family or detect_family(model_dir)
        self.gen = generation(self.family)
        check_use_image_id(self.family, "vllm", use_image_id)
        if not self.gen.vllm_supported:
            raise ValueError(f"{self.family} has no vLLM model in this vLLM version; use engine: transformers")
        if not self.gen.native and not trust_remote_code:
            raise ValueError(f"{self.family} loads its processor from the checkpoint: set trust_remote_code")
        if downsample_mode is not None:
            if self.gen.downsample_mode is None:
                raise ValueError(f"{self.family} has no downsample_mode (4.6+ only)")
            if downsample_mode not in _DOWNSAMPLE_MODES:
                raise ValueError(f"downsample_mode must be one of {_DOWNSAMPLE_MODES}, got {downsample_mode!r}")
        if max_slice_nums is not None and max_slice_nums < 1:
            raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")

        on_cpu = _cpu_only()
        if on_cpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(cpu_kvcache_space_gib)))))
            if dtype == "auto":
                dtype = "bfloat16"
        if self.gen.needs_stream_capture_patch:
            _patch_stream_capture_on_cpu()
        if self.gen.needs_v20_dispatch_patch:
            _patch_v20_dispatch()
        if VLLM_SETTINGS[self.family].needs_tokenizer_json_patch:
            _patch_remote_tokenizer_json()

        from vllm import LLM

        default_mode = self.gen.downsample_mode
        self._image_defaults: dict[str, Any] = {
            "max_slice_nums": max_slice_nums or self.gen.image_max_slice_nums,
            "use_image_id": self.gen.use_image_id_images if use_image_id is None else use_image_id,
        }
        self._video_defaults: dict[str, Any] = {"max_slice_nums": self.gen.video_max_slice_nums, "use_image_id": False}
        if default_mode is not None:
            self._image_defaults["downsample_mode"] = downsample_mode or default_mode
            self._video_defaults["downsample_mode"] = downsample_mode or default_mode
        # vLLM's `minicpmv` model builds the prompt placeholder with the engine-wide processor
        # options but slices with the per-request ones: a per-request max_slice_nums that differs
        # makes the counts disagree and kills the engine ("Attempted to assign 0 = 0 multimodal
        # tokens to N placeholders", then every later step hangs). So the <= 4.5 generations get
        # their options once, here, and requests may not change them (see _options).
        engine_mm_kwargs = None if self.gen.native else dict(self._image_defaults)

        self.max_model_len = max_model_len
        self._failed: str | None = None
        limits = {"image": max_images_per_prompt}
        if self.gen.supports_video:
            # vLLM profiles memory with the largest clip it allows; frames are 1 slice each.
            limits["video"] = 1
        start = time.perf_counter()
        self.llm = LLM(
            model=self.model_dir,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            load_format=load_format,
            enforce_eager=enforce_eager,
            limit_mm_per_prompt=limits,
            mm_processor_kwargs=engine_mm_kwargs,
            seed=seed,
            # the job's setting, which also sizes the calls each engine actor overlaps (resources.py)
            **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}),
            # JSON of json_schema tasks without free whitespace between tokens: a looping (or random)
            # model cannot pad a reply with tabs to the token cap (seen: "{" then 47 tabs). Engine-wide
            # in vLLM 0.32 (its xgrammar backend ignores the per-request flag) and only for the xgrammar
            # and guidance backends; xgrammar, as in the transformers engine.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        )
        self.start_seconds = time.perf_counter() - start
        self.max_frames_per_video = max_frames_per_video
        self.dtype = dtype
        self.tokenizer = self.llm.get_tokenizer()
        try:
            _check_whitespace_kept(self.tokenizer, model_dir)
        except ValueError:
            self.close()  # fail fast without leaving the engine's memory and threads behind
            raise

        vocab = self.tokenizer.get_vocab()
        self.stop_ids = [vocab[t] for t in self.gen.stop_tokens if t in vocab]
        if not self.stop_ids:
            raise ValueError(f"none of the stop tokens {self.gen.stop_tokens} is in the tokenizer of {model_dir}")
        if self.gen.native:
            self._image_token = getattr(self.tokenizer, "image_token", None) or "<|image_pad|>"
            self._video_token = getattr(self.tokenizer, "video_token", None) or "<|video_pad|>"
        else:
            self._image_token, self._video_token = LEGACY_IMAGE_PLACEHOLDER, LEGACY_VIDEO_PLACEHOLDER
        # A prompt that spells a placeholder or chat marker would shift or break the visual tokens.
        self._reserved = [self._image_token, self._video_token, "<|im_start|>", "<|im_end|>"]
        if self.gen.chat_format == "minicpm_v2":
            self._reserved += [MINICPM_V2_USER, MINICPM_V2_AI]
        self._template_bos = _bos_added_twice(self.tokenizer)

    # -- public API -------------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Reply]:
        """Answer every request, in input order (see Engine.generate).

        Each request is handed to vLLM on its own (`LLM.enqueue`), so one that vLLM rejects (prompt
        longer than `max_model_len`, an image its processor cannot take) becomes that request's
        error reply; then all accepted requests run together (`LLM.wait_for_completion`). An error
        while the engine runs leaves it unusable (seen with vLLM 0.32: later steps never finish),
        so it raises, now and on every later call: the stage must restart the actor.
        """
        if self._failed is not None:
            raise RuntimeError(f"vLLM engine failed earlier and must be restarted: {self._failed}")
        replies: list[Reply | None] = [None] * len(requests)
        pending: dict[str, int] = {}
        for i, request in enumerate(requests):
            try:
                prompt, params = self._prompt(request), self._sampling(request)
                (request_id,) = self.llm.enqueue([prompt], [params], use_tqdm=False)
            except Exception as exc:  # noqa: BLE001 - any bad input becomes that request's error
                if _is_engine_dead(exc):
                    self._failed = repr(exc)
                    raise
                replies[i] = error_reply(exc)
                continue
            pending[str(request_id)] = i
        if pending:
            try:
                outputs = self.llm.wait_for_completion(use_tqdm=False)
            except BaseException as exc:
                self._failed = repr(exc)
                raise
            for output in outputs:
                # enqueue() returns the internal id "<external>-<suffix>"; outputs carry the external one.
                key = str(output.request_id)
                match = key if key in pending else next((k for k in pending if k.split("-", 1)[0] == key), None)
                if match is not None:
                    replies[pending.pop(match)] = _reply(output)
        return [r if r is not None else error_reply(RuntimeError("no reply produced")) for r in replies]

    @property
    def dead(self) -> bool:
        """True once the engine failed while running: it must be rebuilt (InferStage does)."""
        return self._failed is not None

    @property
    def per_request_slices(self) -> bool:
        """Whether a request may set its own max_slice_nums (the guard's re-slicing needs it)."""
        return self.gen.native

    def count_text_tokens(self, text: str, examples: tuple[tuple[str, str], ...] = ()) -> int | None:
        """Tokens of `text` as a text-only user turn rendered by the chat template, after the
        few-shot `examples` ((prompt, answer) pairs) as text-only turns (visual tokens of the
        placeholders the engine adds are counted by the guard from the slicing plan)."""
        turns: list[tuple[str, Any]] = []
        for prompt, answer in examples:
            turns += [("user", prompt if not self.gen.native else [{"type": "text", "text": prompt}]),
                      ("assistant", answer if not self.gen.native else [{"type": "text", "text": answer}])]
        turns.append(("user", text if not self.gen.native else [{"type": "text", "text": text}]))
        # Encoded as vLLM encodes a text prompt (special tokens on: 2.0/2.5's tokenizers add BOS).
        return len(self.tokenizer.encode(self._render(turns), add_special_tokens=True))

    def model_info(self) -> dict[str, str]:
        import vllm

        return {
            "engine": self.name,
            "model": Path(self.model_dir).name,
            "model_path": self.model_dir,
            "family": self.family,
            "dtype": str(self.dtype),
            "vllm_version": vllm.__version__,
        }

    def close(self) -> None:
        """Shut the engine down and free its memory, so another engine can start in this process."""
        import gc

        llm, self.llm = self.llm, None  # type: ignore[assignment]
        if llm is not None:
            shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        gc.collect()

    # -- internals --------------------------------------------------------------------------------

    def _options(self, request: Request) -> dict[str, Any]:
        unknown = set(request.processor_kwargs) - set(_PROCESSOR_OPTIONS)
        if unknown:
            raise ValueError(f"unknown processor option(s) {sorted(unknown)}; allowed: {list(_PROCESSOR_OPTIONS)}")
        resolved = dict(self._video_defaults if request.is_video else self._image_defaults)
        for key, value in request.processor_kwargs.items():
            if value is None:
                continue
            if key == "downsample_mode" and "downsample_mode" not in resolved:
                raise ValueError(f"{self.family} has no downsample_mode (4.6+ only)")
            resolved[key] = value
        if not self.gen.native and not request.is_video and resolved != self._image_defaults:
            raise ValueError(f"{self.family} through vLLM takes processor options per engine, not per request: "
                             f"engine has {self._image_defaults}, request asks {resolved}")
        slices = resolved["max_slice_nums"]
        if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
            raise ValueError(f"max_slice_nums must be an int >= 1, got {slices!r}")
        if not isinstance(resolved["use_image_id"], bool):
            raise ValueError(f"use_image_id must be a bool, got {resolved['use_image_id']!r}")
        if resolved.get("downsample_mode", "16x") not in _DOWNSAMPLE_MODES:
            raise ValueError(f"downsample_mode must be one of {_DOWNSAMPLE_MODES}, got {resolved['downsample_mode']!r}")
        return resolved

    def _prompt(self, request: Request) -> dict[str, Any]:
        """vLLM prompt dict: chat-template text, multi_modal_data and mm_processor_kwargs."""
        check_visuals(request)
        found = [t for text in request.texts() for t in self._reserved if t in text]
        if found:
            raise ValueError(f"prompt contains reserved token(s) {found}; images are attached by the engine")
        if request.is_video and not self.gen.supports_video:
            raise ValueError(f"{self.family} takes no video in vLLM")
        floor = min_image_side(self.family)
        for image in request.all_images():  # the 2.0-4.5 processors raise on these (pipeline.models.min_image_side)
            if min(image.shape[:2]) < floor:
                raise ValueError(f"image {image.shape[1]}x{image.shape[0]} has a side under {floor} px, "
                                 f"the least {self.family}'s processor takes")
        n_images = len(request.all_images())
        if self.gen.max_images is not None and not request.is_video and n_images > self.gen.max_images:
            raise ValueError(f"{self.family} takes at most {self.gen.max_images} image(s) per prompt "
                             f"(its processor's limit), got {n_images}")
        if request.is_video and len(request.images) > self.max_frames_per_video:
            raise ValueError(f"{len(request.images)} frames > max_frames_per_video={self.max_frames_per_video}")
        options = self._options(request)
        n_items = (1 if request.images else 0) if request.is_video else len(request.images)
        token = self._video_token if request.is_video else self._image_token
        if request.thinking:
            from pipeline.models import check_thinking

            check_thinking(self.family, ["(this request)"])
        turns = conversation_turns(self.gen, request, self._image_token, self._video_token)
        text = self._render(turns, thinking=request.thinking)
        # Guard against a template that drops visual items: the images would be silently lost.
        expected = n_items + sum(len(ex.images) for ex in request.examples)
        placed = text.count(token)  # a clip has no examples (check_visuals): one kind of token
        if placed != expected:
            raise ValueError(f"chat template placed {placed} {token} placeholder(s), expected {expected}")
        prompt: dict[str, Any] = {"prompt": text}
        if request.images:
            if request.is_video:
                prompt["multi_modal_data"] = {"video": np.stack(request.images)}
            else:
                from PIL import Image

                prompt["multi_modal_data"] = {"image": [Image.fromarray(im) for im in request.all_images()]}
            if self.gen.native:
                prompt["mm_processor_kwargs"] = options
        return prompt

    def _render(self, turns: list[tuple[str, Any]], thinking: bool = False) -> str:
        """The prompt text of a conversation (render_conversation: few-shot turns, then the unit's
        user turn) as vLLM must receive it.

        vLLM encodes a text prompt with special tokens on, so a tokenizer that adds BOS itself
        (Llama 3's, 2.5) would put a second one after the one its chat template writes: the
        template's copy is left out, giving the one BOS the model was trained with (as
        `apply_chat_template(tokenize=True)` in 2.5's original `chat()` and vLLM's OpenAI server do).
        """
        text = render_conversation(self.gen, turns, self.tokenizer, thinking=thinking)
        if self._template_bos and text.startswith(self._template_bos):
            text = text[len(self._template_bos):]
        return text

    def _sampling(self, request: Request) -> Any:
        from vllm import SamplingParams

        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if request.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {request.temperature}")
        return SamplingParams(
            max_tokens=request.max_new_tokens,
            temperature=float(request.temperature),
            stop_token_ids=list(self.stop_ids),
            skip_special_tokens=True,
            structured_outputs=structured_outputs(request),
        )


def structured_outputs(request: Request) -> Any:
    """vLLM's constraint for a request with a json_schema or choices (None without): its structured
    outputs (xgrammar; the engine disables free whitespace in JSON)."""
    if request.json_schema is None and not request.choices:
        return None
    import json

    from vllm.sampling_params import StructuredOutputsParams

    if request.json_schema is not None:
        return StructuredOutputsParams(json=json.loads(request.json_schema))
    return StructuredOutputsParams(choice=list(request.choices))


def _cpu_only() -> bool:
    """True where vLLM runs on its CPU platform (checked without initialising CUDA)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _reply(output: Any) -> Reply:
    completion = output.outputs[0]
    return Reply(
        text=completion.text.strip(),
        prompt_tokens=len(output.prompt_token_ids or []),
        completion_tokens=len(completion.token_ids),
        finish_reason=completion.finish_reason,
    )


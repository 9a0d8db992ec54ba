"""The transformers engine: MiniCPM-V 4.6 / 4.7 / MiniCPM-OCR through their native classes.

Batched, left-padded generation with the checkpoint's own processor and chat template, so the
slicing, placeholders and image ids are the reference implementation's. torch and transformers
are imported inside methods only: importing this module costs nothing on CPU actors.

Per request the engine resolves the processor options (family recommendation < engine setting <
request override), groups requests that can share one processor call and one `generate` call
(same modality and options), and returns replies in input order. A request that fails alone in
preprocessing gets an error reply; an exception from `generate` fails the whole batch, as the
Engine contract says.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engines.base import Engine, Reply, Request, check_visuals, error_reply
from pipeline.media.stacking import STACK_FAMILIES
from pipeline.models import check_transformers_version, detect_family, get_family

log = logging.getLogger(__name__)

_DOWNSAMPLE_MODES = ("4x", "16x")
_PROCESSOR_OPTIONS = ("max_slice_nums", "use_image_id", "downsample_mode")
_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


def pick_device(requested: str = "auto") -> str:
    """Resolve "auto" to cuda, then mps, then cpu; check that an explicit device exists."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    kind = requested.split(":", 1)[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {requested!r} requested but MPS is not available; use 'auto' or 'cpu'")
    if kind not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    return requested


def _resolve_dtype(dtype: str, device: str) -> str:
    """'auto' means bfloat16 on CUDA (what the checkpoints are trained in) and float32 elsewhere."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(set(_DTYPES.values())))}") from None


@dataclass(frozen=True)
class _Options:
    """Everything that must be equal for requests to share one processor and generate call."""

    is_video: bool
    has_visuals: bool
    max_slice_nums: int
    use_image_id: bool
    downsample_mode: str
    temperature: float
    # 4.6 stack_frames clips: n and the processor's max_num_frames (each clip's duration goes per video).
    stack_frames: int = 1
    max_num_frames: int = 0
    # Constrained decoding: one grammar per generate call (json_schema text, or the choices).
    json_schema: str | None = None
    choices: tuple[str, ...] = ()


class TransformersEngine(Engine):
    """MiniCPM-V through `AutoProcessor` + `AutoModelForImageTextToText`."""

    name = "transformers"

    def __init__(
        self,
        model_dir: str,
        family: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        downsample_mode: str | None = None,
    ) -> None:
        """Load processor and model from `model_dir` (a local checkpoint directory).

        `max_slice_nums` and `use_image_id` set the image defaults (videos keep the family's
        recommendation of 1 slice and no ids unless a request overrides them); `downsample_mode`
        applies to both. None means the family recommendation.
        """
        import torch
        import transformers
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_dir = str(model_dir)
        self.family = family or detect_family(model_dir)
        self.spec = get_family(self.family)
        check_transformers_version(self.spec, transformers.__version__)
        self.device = pick_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        if downsample_mode is not None and downsample_mode not in _DOWNSAMPLE_MODES:
            raise ValueError(f"downsample_mode must be one of {_DOWNSAMPLE_MODES}, got {downsample_mode!r}")
        if max_slice_nums is not None and max_slice_nums < 1:
            raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")

        self.processor = AutoProcessor.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.model_dir, dtype=getattr(torch, self.dtype), trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval()
        self.tokenizer = self.processor.tokenizer

        # The checkpoint's config is the authority on its default downsampling mode.
        default_mode = getattr(self.model.config, "downsample_mode", None) or self.spec.downsample_mode
        self._image_defaults = {
            "max_slice_nums": max_slice_nums or self.spec.image_max_slice_nums,
            "use_image_id": self.spec.use_image_id_images if use_image_id is None else use_image_id,
            "downsample_mode": downsample_mode or default_mode,
        }
        self._video_defaults = {
            "max_slice_nums": self.spec.video_max_slice_nums,
            "use_image_id": self.spec.use_image_id_video,
            "downsample_mode": downsample_mode or default_mode,
        }

        vocab = self.tokenizer.get_vocab()
        missing = [t for t in self.spec.stop_tokens if t not in vocab]
        if len(missing) == len(self.spec.stop_tokens):
            raise ValueError(f"none of the stop tokens {self.spec.stop_tokens} is in the tokenizer of {model_dir}")
        self.stop_ids = [vocab[t] for t in self.spec.stop_tokens if t in vocab]
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]
        # A prompt that spells a placeholder or chat marker would shift or break the visual tokens.
        self._reserved = [t for t in (self.processor.image_token, self.processor.video_token, "<|im_start|>",
                                      "<|im_end|>") if t]

    # -- public API -------------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Reply]:
        """Answer every request, in input order (see Engine.generate)."""
        replies: list[Reply | None] = [None] * len(requests)
        groups: dict[_Options, list[int]] = {}
        for i, request in enumerate(requests):
            try:
                options = self._options(request)
                check_visuals(request, stack_ok=self.family in STACK_FAMILIES)
                for text in request.texts():
                    self._check_prompt(text)
            except Exception as exc:  # noqa: BLE001 - any bad input becomes that request's error
                replies[i] = error_reply(exc)
                continue
            groups.setdefault(options, []).append(i)

        for options, indices in groups.items():
            for i, reply in zip(indices, self._run_group(options, [requests[i] for i in indices])):
                replies[i] = reply
        return [r if r is not None else error_reply(RuntimeError("no reply produced")) for r in replies]

    def model_info(self) -> dict[str, str]:
        """Provenance: engine, model path, family, model type, revision where known, dtype, device."""
        import transformers

        config = self.model.config
        return {
            "engine": self.name,
            "model": Path(self.model_dir).name,
            "model_path": self.model_dir,
            "family": self.family,
            "model_type": str(getattr(config, "model_type", "")),
            "revision": str(getattr(config, "_commit_hash", None) or ""),
            "dtype": self.dtype,
            "device": self.device,
            "transformers_version": transformers.__version__,
        }

    def close(self) -> None:
        """Drop the model and free accelerator memory."""
        import gc

        import torch

        self.model = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- internals --------------------------------------------------------------------------------

    def _options(self, request: Request) -> _Options:
        """Family default < engine setting < request override, validated."""
        unknown = set(request.processor_kwargs) - set(_PROCESSOR_OPTIONS)
        if unknown:
            raise ValueError(f"unknown processor option(s) {sorted(unknown)}; allowed: {list(_PROCESSOR_OPTIONS)}")
        resolved = dict(self._video_defaults if request.is_video else self._image_defaults)
        resolved.update({k: v for k, v in request.processor_kwargs.items() if v is not None})
        slices = resolved["max_slice_nums"]
        if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
            raise ValueError(f"max_slice_nums must be an int >= 1, got {slices!r}")
        if not isinstance(resolved["use_image_id"], bool):
            raise ValueError(f"use_image_id must be a bool, got {resolved['use_image_id']!r}")
        if resolved["downsample_mode"] not in _DOWNSAMPLE_MODES:
            raise ValueError(f"downsample_mode must be one of {_DOWNSAMPLE_MODES}, got {resolved['downsample_mode']!r}")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if request.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {request.temperature}")
        stack = request.stack
        return _Options(
            is_video=request.is_video,
            has_visuals=bool(request.all_images()),
            max_slice_nums=int(resolved["max_slice_nums"]),
            use_image_id=bool(resolved["use_image_id"]),
            downsample_mode=str(resolved["downsample_mode"]),
            temperature=float(request.temperature),
            stack_frames=stack.n if stack is not None else 1,
            max_num_frames=stack.max_num_frames if stack is not None else 0,
            json_schema=request.json_schema,
            choices=tuple(request.choices),
        )

    def _check_prompt(self, prompt: str) -> None:
        found = [t for t in self._reserved if t in prompt]
        if found:
            raise ValueError(f"prompt contains reserved token(s) {found}; images are attached by the engine")

    def _render(self, request: Request) -> str:
        """Chat-template text: the few-shot examples as earlier user (image items + prompt) and
        assistant (answer) turns, then the unit's turn with one placeholder per image (or one for the
        clip) and the prompt (the MiniCPM-V model card's few-shot layout)."""
        if request.is_video:
            content: list[dict[str, Any]] = [{"type": "video"}] if request.images else []
        else:
            content = [{"type": "image"} for _ in request.images]
        content.append({"type": "text", "text": request.prompt})
        messages: list[dict[str, Any]] = []
        for ex in request.examples:
            messages.append({"role": "user", "content": [*({"type": "image"} for _ in ex.images),
                                                         {"type": "text", "text": ex.prompt}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": ex.answer}]})
        messages.append({"role": "user", "content": content})
        # enable_thinking=False unless the task asks: batch extraction wants the answer, not a reasoning trace.
        if request.thinking:
            self._check_thinking()
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, enable_thinking=request.thinking
        )
        # Guard against a template that drops visual items: the images would be silently lost.
        token = self.processor.video_token if request.is_video else self.processor.image_token
        expected = len(content) - 1 + sum(len(ex.images) for ex in request.examples)
        if text.count(token) != expected:
            raise ValueError(f"chat template placed {text.count(token)} {token} placeholder(s), expected {expected}")
        return text

    def _check_thinking(self) -> None:
        """Refuse thinking when this checkpoint's chat template ignores `enable_thinking` (the same
        prompt either way): the family table says the generation has it, the template must agree."""
        if getattr(self, "_thinking_ok", None) is None:
            turn = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
            on, off = (self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False,
                                                          enable_thinking=flag) for flag in (True, False))
            self._thinking_ok = on != off
        if not self._thinking_ok:
            raise ValueError(f"tasks[].thinking: the chat template of {self.model_dir} ignores enable_thinking "
                             f"(no thinking mode): remove `thinking: true` from the task")

    def _logits_processor(self, options: _Options) -> Any:
        """An xgrammar logits processor that keeps every row of one generate call inside the task's
        JSON schema (no free whitespace: a random or looping model cannot pad forever) or its choices;
        None without a constraint. xgrammar: the grammar engine vLLM uses too, with an HF processor."""
        if options.json_schema is None and not options.choices:
            return None
        import json

        import xgrammar as xgr
        from xgrammar.contrib.hf import LogitsProcessor

        if getattr(self, "_grammars", None) is None:
            vocab_size = self.model.config.get_text_config().vocab_size
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=vocab_size,
                                                      stop_token_ids=list(self.stop_ids))
            self._grammars = xgr.GrammarCompiler(info, max_threads=1)
        if options.json_schema is not None:
            compiled = self._grammars.compile_json_schema(options.json_schema, any_whitespace=False,
                                                          separators=(",", ":"))  # compact, as vLLM's
        else:  # the labels as EBNF string literals (JSON escaping is EBNF's)
            compiled = self._grammars.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in options.choices))
        return LogitsProcessor(compiled)  # one per generate call: it keeps per-row matcher state

    def _preprocess(self, options: _Options, requests: Sequence[Request]) -> Any:
        """One processor call for requests that share `options` (raises on any bad request)."""
        texts = [self._render(r) for r in requests]
        kwargs: dict[str, Any] = {
            "text": texts,
            "max_slice_nums": options.max_slice_nums,
            "use_image_id": options.use_image_id,
            "downsample_mode": options.downsample_mode,
            # Arrays are HxWx3; without this the processors guess the channel axis and get tiny
            # images (a side of 1 or 3 pixels) wrong.
            "input_data_format": "channels_last",
            "return_tensors": "pt",
        }
        if options.has_visuals and options.is_video:
            # The frames were already sampled by the pipeline: never resample them here.
            kwargs["videos"] = [np.stack(r.images) for r in requests]
            kwargs["do_sample_frames"] = False
            if options.stack_frames > 1:
                # The processor rebuilds 4.6's main-frame/composite layout from each clip's duration;
                # the frames already are the ones it samples (pipeline/media/stacking.py, checked above).
                from transformers.video_utils import VideoMetadata

                kwargs["stack_frames"] = options.stack_frames
                kwargs["max_num_frames"] = options.max_num_frames
                kwargs["video_metadata"] = [
                    VideoMetadata(total_num_frames=len(r.images), fps=len(r.images) / r.stack.duration_s,
                                  duration=r.stack.duration_s)
                    for r in requests if r.stack is not None
                ]
        elif options.has_visuals:
            kwargs["images"] = [r.all_images() for r in requests]  # in placeholder order: examples first
        return self.processor(**kwargs)

    def _run_group(self, options: _Options, requests: list[Request]) -> list[Reply]:
        replies: list[Reply | None] = [None] * len(requests)
        try:
            inputs = self._preprocess(options, requests)
            ok = list(range(len(requests)))
        except Exception:  # noqa: BLE001 - find which request(s) broke the batch
            ok = []
            for i, request in enumerate(requests):
                try:
                    self._preprocess(options, [request])
                    ok.append(i)
                except Exception as exc:  # noqa: BLE001
                    replies[i] = error_reply(exc)
            if not ok:
                return [r for r in replies if r is not None]
            # The survivors passed alone; together they must pass too (else the batch fails).
            inputs = self._preprocess(options, [requests[i] for i in ok])

        for i, reply in zip(ok, self._generate(options, [requests[i] for i in ok], inputs)):
            replies[i] = reply
        return [r for r in replies if r is not None]

    def _generate(self, options: _Options, requests: list[Request], inputs: Any) -> list[Reply]:
        import torch

        inputs = inputs.to(self.device)
        max_new = max(r.max_new_tokens for r in requests)
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.pad_id,
            # The vision tower must merge with the same mode the processor counted placeholders with.
            "downsample_mode": options.downsample_mode,
        }
        constraint = self._logits_processor(options)
        if constraint is not None:
            gen_kwargs["logits_processor"] = [constraint]
        if options.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=options.temperature)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **gen_kwargs)

        prompt_len = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        new_tokens = output[:, prompt_len:].tolist()
        stops = set(self.stop_ids)
        replies = []
        for request, n_prompt, tokens in zip(requests, prompt_tokens, new_tokens):
            # Rows run to the group's longest budget; each reply honours its own.
            tokens = tokens[: request.max_new_tokens]
            stop_at = next((k for k, t in enumerate(tokens) if t in stops), None)
            if stop_at is not None:
                answer, completion, finish = tokens[:stop_at], stop_at + 1, "stop"
            else:
                # No stop token: every token is real (padding only follows a stop token).
                answer, completion = tokens, len(tokens)
                finish = "length" if completion >= request.max_new_tokens else "stop"
            text = self.tokenizer.decode(answer, skip_special_tokens=True).strip()
            replies.append(Reply(text=text, prompt_tokens=int(n_prompt), completion_tokens=completion,
                                 finish_reason=finish))
        return replies


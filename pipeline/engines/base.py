"""The engine interface: what the inference stage needs from any backend.

The stage (pipeline/infer.py) owns batching, retries and error rows; an engine only turns a list of
requests into a list of replies. That keeps engines swappable (transformers, vLLM, HTTP, a fake in
tests) and keeps heavy imports (torch, transformers, vllm) inside the engine modules.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class VideoStack:
    """A clip sampled for MiniCPM-V 4.6's `stack_frames` (pipeline/media/stacking.py): its frames are the
    main frames then the sub-frames, as 4.6's video processor samples a clip of `duration_s` seconds."""

    n: int  # stack_frames
    duration_s: float
    max_num_frames: int  # the processor's max_num_frames (the job's video.max_frames_per_clip)


@dataclass(frozen=True)
class Example:
    """A few-shot example (tasks[].examples): an earlier user turn of `images` (RGB uint8 HxWx3, preprocessed
    like a unit's) and `prompt`, and the assistant's reply `answer`, put before the request's own turn."""

    images: tuple[np.ndarray, ...]
    prompt: str
    answer: str


@dataclass
class Request:
    """One unit and task to run: a prompt plus the images (RGB uint8 HxWx3 arrays) it refers to."""

    prompt: str
    images: list[np.ndarray] = field(default_factory=list)
    is_video: bool = False  # frames of one clip rather than independent images
    max_new_tokens: int = 1024
    temperature: float = 0.0
    # Per-request processor options (max_slice_nums, use_image_id, downsample_mode); None = family default.
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    stack: VideoStack | None = None  # a clip in 4.6's stack_frames layout (engines that can take it)
    examples: list[Example] = field(default_factory=list)  # few-shot turns before this one (images only)

    def all_images(self) -> list[np.ndarray]:
        """Every image of the prompt in placeholder order: the examples' images, then the unit's."""
        return [im for ex in self.examples for im in ex.images] + list(self.images)

    def texts(self) -> list[str]:
        """Every text the caller wrote into the prompt (examples' prompts and answers, then the prompt)."""
        return [t for ex in self.examples for t in (ex.prompt, ex.answer)] + [self.prompt]
    # Constrained decoding (pipeline/structured.py): the reply must be JSON valid under this schema
    # (canonical JSON text), or exactly one of `choices`. An engine that cannot constrain sends them
    # as they are; the reply checks validate either way.
    json_schema: str | None = None
    choices: tuple[str, ...] = ()
    thinking: bool = False  # render the chat template with enable_thinking=True (reasoning first)


@dataclass
class Reply:
    """The engine's answer for one request; `error` set means the request failed and text is empty."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    reasoning: str | None = None  # reasoning a server returned apart from the answer (pipeline/checks.py)


class Engine(abc.ABC):
    """A loaded model that answers batches of requests."""

    #: Name written to provenance columns, e.g. "transformers".
    name: str = "engine"

    @abc.abstractmethod
    def generate(self, requests: list[Request]) -> list[Reply]:
        """Answer every request, in order; one reply per request.

        A failure that concerns one request should come back as that reply's error; an exception
        means the whole batch failed (the stage then retries requests one at a time).
        """

    def count_text_tokens(self, text: str, examples: tuple[tuple[str, str], ...] = ()) -> int | None:
        """Tokens of `text` as the prompt of one user turn (chat template included) after the few-shot
        `examples` ((prompt, answer) turns), for the prompt-length guard (pipeline/guards.py); None:
        this engine cannot tell, the guard estimates."""
        return None

    def model_info(self) -> dict[str, str]:
        """Provenance: model name, family, revision/commit where known."""
        return {}

    def close(self) -> None:
        """Release the model (called on actor teardown)."""


def check_stack(request: Request, supported: bool) -> None:
    """A stacked clip must carry exactly the frames its layout names (else the processor would pair
    main frames and composites wrongly, silently); an engine that cannot stack refuses it."""
    stack = request.stack
    if stack is None:
        return
    if not supported:
        raise ValueError(
            "this engine cannot take MiniCPM-V 4.6 stack_frames clips (vLLM 0.32 sizes every frame of a video "
            "like its first, and composites differ in size): run it with engine.kind transformers, or set "
            "video.stack_frames: 1"
        )
    from pipeline.media.stacking import stack_layout

    if not request.is_video:
        raise ValueError("stack_frames applies to video clips only")
    expected = stack_layout(stack.duration_s, stack.max_num_frames, stack.n).num_frames
    if len(request.images) != expected:
        raise ValueError(f"a stack_frames={stack.n} clip of {stack.duration_s:g} s needs {expected} frames "
                         f"(main frames then sub-frames), got {len(request.images)}")


def check_visuals(request: Request, stack_ok: bool = False) -> None:
    """Cheap checks that catch bad arrays before they reach (and fail) a whole engine batch."""
    if request.examples and request.is_video:
        raise ValueError("few-shot examples are images: they cannot go before a video clip")
    for k, image in enumerate(request.all_images()):
        if not isinstance(image, np.ndarray):
            raise TypeError(f"image {k}: expected a numpy array, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {k}: expected an RGB HxWx3 array, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"image {k}: expected dtype uint8, got {image.dtype}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"image {k}: empty image of shape {image.shape}")
    if request.is_video and len({im.shape for im in request.images}) > 1:
        raise ValueError(f"video frames must share one size, got {sorted({im.shape for im in request.images})}")
    check_stack(request, stack_ok)


def error_reply(exc: BaseException) -> Reply:
    """The reply for a request that failed alone: the exception's type and (bounded) message."""
    return Reply(error_type=type(exc).__name__, error_message=str(exc)[:2000] or repr(exc))

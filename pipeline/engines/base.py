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


@dataclass
class Reply:
    """The engine's answer for one request; `error` set means the request failed and text is empty."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None


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

    def count_text_tokens(self, text: str) -> int | None:
        """Tokens of `text` as the prompt of one user turn (chat template included), for the
        prompt-length guard (pipeline/guards.py); None: this engine cannot tell, the guard estimates."""
        return None

    def model_info(self) -> dict[str, str]:
        """Provenance: model name, family, revision/commit where known."""
        return {}

    def close(self) -> None:
        """Release the model (called on actor teardown)."""

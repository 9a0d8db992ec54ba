"""What every expander yields: units ready for inference, or per-unit errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np


class MediaError(Exception):
    """A whole source cannot be expanded; `error_type` is a short stable code for the results table."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


@dataclass
class MediaUnit:
    """One inference unit: a page, an image (or one frame of a multi-frame image), or a video clip.

    `frames` holds RGB uint8 arrays (H, W, 3): one for a page or an image, several for a clip.
    A unit that failed on its own (a page that will not render) has `error_type` set and no frames;
    the rest of its source goes on.
    """

    unit_index: int
    unit_kind: str  # "page" | "image" | "clip"
    frames: list[np.ndarray] = field(default_factory=list)
    text_layer: str | None = None
    start_s: float | None = None  # clips: where the clip starts/ends in the video
    end_s: float | None = None
    frame_times: list[float] = field(default_factory=list)  # clips: timestamp of each sampled frame
    stack_frames: int | None = None  # clips sampled for 4.6's stack_frames (pipeline/media/stacking.py)
    error_type: str | None = None
    error_message: str | None = None
    flags: list[str] = field(default_factory=list)  # e.g. "pdf_repaired", "exif_rotated", "alpha_flattened"
    # What `frames` may be views of (a MuPDF pixmap): hold it until the pixels are copied into Arrow.
    # Copying a 20 MB page into a fresh Python buffer costs ~10x MuPDF's render (page faults).
    keepalive: object = None


# Per-run noise in library messages: object reprs with addresses ("<_io.BytesIO object at 0x7f..>")
# and bare addresses. Users group errors by message, so a message must not change from run to run.
_OBJECT_REPR = re.compile(r"<([A-Za-z_][\w.]*) object at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")


def describe(err: BaseException) -> str:
    """A library exception's own text, stable across runs: object reprs and addresses removed.

    The exception's class name stands in only when it says nothing (an empty message); callers put
    the explanation of what failed in front of it, so a class name is never the whole message.
    """
    text = " ".join(str(err).split())
    text = _ADDRESS.sub("<address>", _OBJECT_REPR.sub(r"<\1>", text))
    return text or type(err).__name__

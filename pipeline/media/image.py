"""Image file -> RGB uint8 units, with pixels bounded from the header before anything is decoded.

Order matters (measured with Pillow; tests/unit/test_image.py): size check from the header (Image.open is lazy), then `load()`
(so a corrupt file fails here, loudly), and only then EXIF (reading EXIF first loads the image as a
side effect and hides decode errors behind the EXIF try/except).
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config import ImageConfig, LimitsConfig
from pipeline.media.base import MediaError, MediaUnit, describe

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that displays the image upright (the same table ImageOps.exif_transpose uses).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WHITE = 255.0


# Formats whose frames are pages of a document (a fax, a scanned batch): each page is a unit by default.
PAGE_FORMATS = frozenset({"TIFF", "DCX"})
# Formats whose frames are an animation: by default its first frame stands for it (flag
# "animation_first_frame"). Other multi-image formats hold one picture in several forms (PSD layers
# beside the composite, icon sizes, MPO stereo pairs): their main image is the unit.
ANIMATION_FORMATS = frozenset({"GIF", "PNG", "WEBP", "FLI", "AVIF"})
# Flags of frames left out against the file's nature: the document is then `partial` (pipeline/sink.py).
SKIPPED_FRAME_FLAGS = frozenset({"multi_frame_first_only", "multi_frame_capped"})


def frame_policy(fmt: str | None, n_frames: int, cfg: ImageConfig) -> tuple[int, list[str]]:
    """How many frames of a file become units, and the flags every unit of it carries.

    multi_frame "auto": every page of a multi-page still (TIFF, DCX), the first frame of an
    animation (flag "animation_first_frame"), the main image of anything else. "first": the first
    frame; a multi-page still then loses pages (flag "multi_frame_first_only"). "all": every frame.
    Frames beyond image.max_frames are left out with flag "multi_frame_capped".
    """
    if n_frames <= 1:
        return 1, []
    if cfg.multi_frame == "all" or (cfg.multi_frame == "auto" and fmt in PAGE_FORMATS):
        count = min(n_frames, cfg.max_frames)
        return count, (["multi_frame_capped"] if count < n_frames else [])
    if fmt in PAGE_FORMATS:
        return 1, ["multi_frame_first_only"]
    if fmt in ANIMATION_FORMATS:
        return 1, ["animation_first_frame"]
    return 1, ([] if cfg.multi_frame == "auto" else ["multi_frame_first_only"])


def expand_image(data: bytes, cfg: ImageConfig, limits: LimitsConfig) -> Iterator[MediaUnit]:
    """Yield one "image" unit per frame that `frame_policy` takes, each an RGB uint8 array.

    Raises MediaError: "empty_file", "file_too_large", "image_too_large" (from the header, nothing
    decoded), "image_too_small" (a side below limits.min_image_side, from the header),
    "image_decode_failed" (corrupt, truncated, not an image, unsupported mode).
    """
    im = _open(data, limits)
    with im:
        n_frames = getattr(im, "n_frames", 1)
        count, common = frame_policy(im.format, n_frames, cfg)
        first = _load_frame(im, 0, limits)  # also proves the file decodes before any EXIF is read
        orientation = _orientation(im)
        yield _unit(0, first, orientation, common)
        if count > 1:
            yield from _later_frames(im, count, orientation, limits, common)


def to_rgb(im: Image.Image) -> tuple[np.ndarray, list[str]]:
    """Convert a decoded image of any mode to an (H, W, 3) uint8 array; flags say what was lost."""
    mode = im.mode
    if (mode == "P" and "transparency" in im.info) or mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        return _flatten_alpha(im.convert("RGBA"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _scale_high_depth(im, mode)
        return np.repeat(gray[:, :, None], 3, axis=2), []
    if mode != "RGB":
        im = im.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX
    return np.asarray(im, dtype=np.uint8), []


def _open(data: bytes, limits: LimitsConfig) -> Image.Image:
    if not data:
        raise MediaError("empty_file", "the image has zero bytes")
    if len(data) > limits.max_bytes:
        raise MediaError("file_too_large", f"{len(data)} bytes exceeds limits.max_bytes={limits.max_bytes}")
    # Our own bound (checked below from the header) replaces Pillow's bomb guard; keep Pillow's at least as
    # loose so it cannot reject what the job allows, and still catch it should it fire.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limits.max_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        # Pillow's guard fires from the header too; say which job limit applies and how to change it.
        # Its text names Pillow's own threshold (twice MAX_IMAGE_PIXELS), not the job's: say the job's.
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{found.group(1)} pixels" if found else "the image's pixel count"
        raise MediaError("image_too_large", f"{size} (from the header) exceeds limits.max_pixels={limits.max_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise MediaError("image_decode_failed", f"Pillow cannot read the image header: {describe(err)}") from None
    _check_pixels(im, limits)
    return im


def _check_pixels(im: Image.Image, limits: LimitsConfig, close: bool = True) -> None:
    width, height = im.size  # from the header: nothing decoded yet
    if width * height > limits.max_pixels:
        if close:
            im.close()
        raise MediaError(
            "image_too_large",
            f"{width}x{height} = {width * height} pixels exceeds limits.max_pixels={limits.max_pixels}",
        )
    if min(width, height) < limits.min_image_side:
        if close:
            im.close()
        raise MediaError(
            "image_too_small",
            f"{width}x{height} pixels: a side is below the minimum of {limits.min_image_side} pixels "
            "(limits.min_image_side) that the model's image processors accept",
        )


def _load_frame(im: Image.Image, index: int, limits: LimitsConfig) -> Image.Image:
    """Seek to a frame and decode it (conversion waits until orientation is known); errors become MediaError."""
    try:
        if index:
            im.seek(index)
            _check_pixels(im, limits, close=False)  # TIFF pages can each have their own size
        im.load()
        return im
    except MediaError:
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError...
        raise MediaError("image_decode_failed",
                         f"frame {index + 1} cannot be decoded (corrupt or truncated image data): {describe(err)}") from None


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not fail a picture that decoded fine
        return 1
    return value if value in _ORIENTATION_FIX else 1


def _unit(index: int, im: Image.Image, orientation: int, common: list[str]) -> MediaUnit:
    flags = list(common)
    frame = im
    if orientation != 1:
        frame = im.transpose(_ORIENTATION_FIX[orientation])
        flags.append("exif_rotated")
    try:
        array, convert_flags = to_rgb(frame)
    except (ValueError, OSError) as err:  # e.g. a mode Pillow cannot convert
        raise MediaError("image_decode_failed", f"cannot convert mode {frame.mode} to RGB: {describe(err)}") from None
    return MediaUnit(unit_index=index, unit_kind="image", frames=[array], flags=flags + convert_flags)


def _later_frames(
    im: Image.Image, count: int, orientation: int, limits: LimitsConfig, common: list[str]
) -> Iterator[MediaUnit]:
    """Frames 1..count-1. A frame of the wrong size is its own error unit; the first undecodable
    frame becomes an error unit and ends the file (the frames after it cannot be reached)."""
    for index in range(1, count):
        try:
            frame = _load_frame(im, index, limits)
        except MediaError as err:
            sized = err.error_type in ("image_too_large", "image_too_small")
            yield MediaUnit(
                unit_index=index, unit_kind="image", error_type=err.error_type if sized else "frame_decode_failed",
                error_message=f"frame {index + 1}: {err.message}" if sized else err.message, flags=list(common),
            )
            if sized:
                continue
            return
        yield _unit(index, frame, orientation, common)


def _flatten_alpha(rgba: Image.Image) -> tuple[np.ndarray, list[str]]:
    """Composite onto white; flag only when some pixel was actually transparent."""
    arr = np.asarray(rgba, dtype=np.uint8)
    alpha = arr[:, :, 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(arr[:, :, :3]), []
    a = alpha[:, :, None].astype(np.float32) / 255.0
    rgb = arr[:, :, :3].astype(np.float32) * a + _WHITE * (1.0 - a)
    return np.rint(rgb).astype(np.uint8), ["alpha_flattened"]


def _scale_high_depth(im: Image.Image, mode: str) -> np.ndarray:
    """16-bit / 32-bit / float greyscale -> 8 bits by scaling the range, not clipping at 255."""
    values = np.asarray(im).astype(np.float64)
    if mode.startswith("I;16"):
        scaled = values / 257.0  # 65535 -> 255 exactly
    elif mode == "I" and values.size and values.min() >= 0 and values.max() <= 65535:
        scaled = values / 257.0  # "I" from files (PNG/PGM/TIFF) nearly always holds 16-bit samples
    elif mode == "F" and values.size and values.min() >= 0 and values.max() <= 1.0:
        scaled = values * 255.0  # normalised float data
    else:
        scaled = _min_max(values)  # anything else (32-bit ints, HDR floats): stretch to the full range
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _min_max(values: np.ndarray) -> np.ndarray:
    finite = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros_like(finite)
    return (finite - lo) * (255.0 / (hi - lo))

"""Images: pixel bound from the header, EXIF orientation, every mode to RGB, multi-frame policy."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ImageConfig, LimitsConfig
from pipeline.media.base import MediaError
from pipeline.media.image import expand_image
from pipeline.samples import photo_jpeg_bytes


def _save(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _one(data, **cfg):
    units = list(expand_image(data, ImageConfig(**cfg), LimitsConfig()))
    assert len(units) == 1
    return units[0]


def test_exif_orientation_is_applied():
    unit = _one(photo_jpeg_bytes(orientation=6))
    h, w, _ = unit.frames[0].shape
    assert (w, h) == (480, 640) and "exif_rotated" in unit.flags  # stored 640x480, shown rotated 90
    plain = _one(photo_jpeg_bytes(orientation=1))
    assert plain.frames[0].shape[:2] == (480, 640) and "exif_rotated" not in plain.flags


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "L", "1", "I;16", "I", "F", "YCbCr"])
def test_every_mode_becomes_rgb_uint8(mode):
    base = Image.fromarray(np.linspace(0, 255, 32 * 32 * 3).astype(np.uint8).reshape(32, 32, 3))
    im = base.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F", "YCbCr") else "PNG"
    if mode == "YCbCr":
        fmt = "JPEG"
    arr = _one(_save(im, fmt)).frames[0]
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8


def test_palette_with_transparency_is_flattened():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    unit = _one(_save(p, transparency=1))
    assert (unit.frames[0] == 255).all() and "alpha_flattened" in unit.flags


def test_transparency_is_flattened_onto_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    unit = _one(_save(Image.fromarray(rgba, "RGBA")))
    assert (unit.frames[0] == 255).all() and "alpha_flattened" in unit.flags


def test_sixteen_bit_scales_instead_of_clipping():
    arr16 = np.tile(np.array([[0, 32768, 65535]], dtype=np.uint16), (4, 2))  # 6x4: above limits.min_image_side
    unit = _one(_save(Image.fromarray(arr16)))
    row = unit.frames[0][0, :, 0]
    assert row[0] == 0 and row[2] == 255 and 120 <= row[1] <= 135


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_pixel_bound_checked_from_the_header_without_decoding():
    # 20000x20000 would need 1.2 GB decoded; the file has no pixel data at all, so only the header is read
    with pytest.raises(MediaError) as err:
        list(expand_image(_png_header_only(20000, 20000), ImageConfig(), LimitsConfig(max_pixels=50_000_000)))
    assert err.value.error_type == "image_too_large" and "limits.max_pixels" in err.value.message


def test_corrupt_and_truncated_images():
    good = photo_jpeg_bytes()
    for data in (b"\xff\xd8\xff" + b"\x00" * 50, good[: len(good) // 3] + b"garbage" * 0):
        with pytest.raises(MediaError) as err:
            list(expand_image(data, ImageConfig(), LimitsConfig()))
        assert err.value.error_type == "image_decode_failed"


def _gif(n: int) -> bytes:
    frames = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(n)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def test_multi_frame_policies():
    first = _one(_gif(4))
    assert "animation_first_frame" in first.flags  # default "auto": an animation's first frame
    every = list(expand_image(_gif(4), ImageConfig(multi_frame="all"), LimitsConfig()))
    assert [u.unit_index for u in every] == [0, 1, 2, 3]
    assert every[1].frames[0][0, 0, 0] != every[0].frames[0][0, 0, 0]
    capped = list(expand_image(_gif(5), ImageConfig(multi_frame="all", max_frames=2), LimitsConfig()))
    assert len(capped) == 2 and "multi_frame_capped" in capped[0].flags

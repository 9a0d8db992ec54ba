"""expand_image: header pixel bound, load-then-EXIF, orientation, every mode to RGB, multi-frame policies."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline import samples
from pipeline.config import ImageConfig, LimitsConfig
from pipeline.media.base import MediaError
from pipeline.media.image import expand_image, to_rgb

CFG = ImageConfig()
LIMITS = LimitsConfig()


def _save(im: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _one(data: bytes, cfg: ImageConfig = CFG, limits: LimitsConfig = LIMITS):
    units = list(expand_image(data, cfg, limits))
    assert len(units) == 1
    (frame,) = units[0].frames
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    return units[0], frame


def _error(data: bytes, **kw) -> MediaError:
    with pytest.raises(MediaError) as info:
        list(expand_image(data, kw.get("cfg", CFG), kw.get("limits", LIMITS)))
    return info.value


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT: only a full decode would notice."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def test_exif_orientation_6_rotates_and_flags() -> None:
    unit, frame = _one(samples.photo_jpeg_bytes())
    assert frame.shape == (640, 480, 3)  # stored 640x480 landscape, displayed portrait
    assert "exif_rotated" in unit.flags
    # The red marker stored top-left is displayed top-right (90 degrees clockwise).
    assert tuple(frame[10, 470]) == pytest.approx((220, 20, 20), abs=25)
    assert frame[10, 10, 0] < 150
    unit, frame = _one(samples.photo_jpeg_bytes(orientation=1))
    assert frame.shape == (480, 640, 3) and "exif_rotated" not in unit.flags


def test_rgba_logo_flattened_onto_white() -> None:
    unit, frame = _one(samples.logo_png_bytes())
    assert "alpha_flattened" in unit.flags
    assert tuple(frame[0, 0]) == (255, 255, 255)  # transparent corner -> white
    centre = frame[128, 128].astype(int)  # 50% orange over white
    assert centre == pytest.approx([252, 197, 137], abs=3)


def test_opaque_rgba_is_not_flagged() -> None:
    unit, frame = _one(_save(Image.new("RGBA", (4, 4), (10, 20, 30, 255))))
    assert "alpha_flattened" not in unit.flags and tuple(frame[0, 0]) == (10, 20, 30)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),  # fully transparent black -> white
        (lambda: Image.new("LA", (4, 4), (40, 255)), (40, 40, 40)),
        (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
        (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
    ],
)
def test_grey_modes(make, expected) -> None:
    _, frame = _one(_save(make()))
    assert tuple(frame[1, 1]) == expected


def test_palette_with_transparency() -> None:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    unit, frame = _one(_save(im, transparency=0))
    assert "alpha_flattened" in unit.flags
    assert tuple(frame[0, 0]) == (255, 255, 255) and tuple(frame[1, 1]) == (200, 0, 0)


def test_cmyk_jpeg() -> None:
    _, frame = _one(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = frame[4, 4].astype(int)
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full: red


def test_16_bit_scaled_not_clipped() -> None:
    # Tiled to 4x4: limits.min_image_side turns away smaller images.
    arr = np.tile(np.array([[65535, 32768], [257, 0]], dtype=np.uint16), (2, 2))
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    _, frame = _one(_save(im))
    assert frame[:2, :2, 0].tolist() == [[255, 128], [1, 0]]
    _, frame = _one(_save(im, "TIFF"))
    assert frame[0, 0, 0] == 255 and frame[0, 1, 0] == 128


def test_to_rgb_other_modes() -> None:
    rgb = Image.new("RGB", (2, 2), (200, 100, 50))
    out, _ = to_rgb(rgb.convert("YCbCr"))
    assert out[0, 0].astype(int) == pytest.approx([200, 100, 50], abs=3)
    out, _ = to_rgb(Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)))
    assert out[:, :, 0].tolist() == [[0, 128], [255, 64]]
    out, _ = to_rgb(Image.fromarray(np.array([[-100, 0], [100, 50]], dtype=np.int32)))  # mode I, signed: stretched
    assert out[:, :, 0].astype(int) == pytest.approx(np.array([[0, 128], [255, 191]]), abs=1)


def test_header_bound_rejects_without_decoding(monkeypatch) -> None:
    data = _png_header_only(20000, 20000)
    assert len(data) < 200

    def no_decode(self):  # pragma: no cover - failing here is the bug
        raise AssertionError("decoded an image that the header already rejected")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    for limits in (LIMITS, LimitsConfig(max_pixels=300_000_000), LimitsConfig(max_pixels=1000)):
        err = _error(data, limits=limits)  # Pillow's bomb guard or our header check: either way, nothing decoded
        assert err.error_type == "image_too_large" and "limits.max_pixels" in err.message
    err = _error(_png_header_only(5000, 5000), limits=LimitsConfig(max_pixels=1_000_000))  # under Pillow's guard
    assert err.error_type == "image_too_large" and "5000x5000" in err.message


def test_pillow_bomb_guard_never_stricter_than_the_job(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    _one(_save(Image.new("L", (4, 4))), limits=LimitsConfig(max_pixels=300_000_000))
    assert Image.MAX_IMAGE_PIXELS >= 300_000_000  # a 250 MP image the job allows must not be refused by Pillow


def test_corrupt_and_not_images() -> None:
    assert _error(b"").error_type == "empty_file"
    assert _error(b"plain text with a .jpg name").error_type == "image_decode_failed"
    jpeg = samples.photo_jpeg_bytes()
    err = _error(jpeg[: len(jpeg) // 2])
    assert err.error_type == "image_decode_failed" and "truncated" in err.message.lower()
    png = _save(Image.fromarray(samples.photo_array()))
    assert _error(png[: len(png) // 2]).error_type == "image_decode_failed"
    assert _error(png, limits=LimitsConfig(max_bytes=100)).error_type == "file_too_large"


def _gif(n: int) -> bytes:
    frames = [Image.new("RGB", (16, 12), (i * 40 % 256, 0, 255 - i * 40 % 256)) for i in range(n)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def test_multi_frame_first() -> None:
    unit, frame = _one(_gif(5))  # default "auto": an animation gives its first frame, flagged
    assert unit.flags == ["animation_first_frame"] and frame.shape == (12, 16, 3)
    assert tuple(frame[0, 0]) == (0, 0, 255)


def test_multi_frame_all_and_cap() -> None:
    units = list(expand_image(_gif(5), ImageConfig(multi_frame="all"), LIMITS))
    assert [u.unit_index for u in units] == [0, 1, 2, 3, 4]
    assert [int(u.frames[0][0, 0, 0]) for u in units] == [0, 40, 80, 120, 160]
    capped = list(expand_image(_gif(5), ImageConfig(multi_frame="all", max_frames=2), LIMITS))
    assert len(capped) == 2 and all("multi_frame_capped" in u.flags for u in capped)


def test_multi_page_tiff_with_different_sizes_and_webp() -> None:
    pages = [Image.new("RGB", (10, 10), "red"), Image.new("L", (30, 20), 90)]
    tiff = _save(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    units = list(expand_image(tiff, ImageConfig(multi_frame="all"), LIMITS))
    assert [u.frames[0].shape for u in units] == [(10, 10, 3), (20, 30, 3)]
    webp = _save(pages[0], "WEBP", save_all=True, append_images=[Image.new("RGB", (10, 10), "blue")], lossless=True)
    units = list(expand_image(webp, ImageConfig(multi_frame="all"), LIMITS))
    assert len(units) == 2 and tuple(units[1].frames[0][0, 0]) == (0, 0, 255)

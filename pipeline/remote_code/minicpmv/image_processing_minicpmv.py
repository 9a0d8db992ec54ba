"""MiniCPM-V (2.6 / 4.0 / 4.5) image processor, loaded with `trust_remote_code`.

LLaVA-UHD slicing: an image becomes an overview resized into a `scale_resolution`**2 pixel budget
and, when it is larger than that, a grid of slices chosen among `max_slice_nums` candidates by the
best aspect-ratio fit. Each slice is normalised and flattened into a [3, patch_size, L] strip of
patches; `tgt_sizes` gives each slice's (rows, cols) of patches. The prompt placeholder of an
image is `<image_id>N</image_id>` (optional), `<image>` + `query_num` x `<unk>` + `</image>`, then
one `<slice>...</slice>` per slice, rows separated by newlines.

The method names and signatures are the ones vLLM's `minicpmv` model calls:
`get_sliced_grid`, `get_slice_image_placeholder`, `image_feature_size`, `max_slice_nums`,
`im_id_start`/`im_id_end` and `__call__(images, do_pad=..., return_tensors=...)`.
"""

from __future__ import annotations

import math
from typing import Any, TypedDict

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_base import BatchFeature, ImageProcessingMixin


class MiniCPMVImageProcessorKwargs(TypedDict, total=False):
    max_slice_nums: int
    scale_resolution: int
    patch_size: int
    use_image_id: bool
    slice_mode: bool
    image_feature_size: int
    norm_mean: list[float]
    norm_std: list[float]


def _ensure_divide(length: float, patch_size: int) -> int:
    return max(round(length / patch_size) * patch_size, patch_size)


def _best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int, upscale: bool = False) -> tuple[int, int]:
    """(width, height) within scale_resolution**2 pixels, keeping the aspect ratio, in whole patches."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return _ensure_divide(width, patch_size), _ensure_divide(height, patch_size)


def _is_single(item: Any) -> bool:
    """One image: a PIL image or an HxWxC array (a 4-D array is a clip of frames)."""
    return isinstance(item, Image.Image) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 3)


class MiniCPMVImageProcessor(ImageProcessingMixin):
    model_input_names = ["pixel_values"]
    valid_kwargs = MiniCPMVImageProcessorKwargs

    def __init__(
        self,
        max_slice_nums: int = 9,
        scale_resolution: int = 448,
        patch_size: int = 14,
        use_image_id: bool = True,
        slice_mode: bool = True,
        image_feature_size: int = 64,
        norm_mean: list[float] | None = None,
        norm_std: list[float] | None = None,
        im_start: str = "<image>",
        im_end: str = "</image>",
        slice_start: str = "<slice>",
        slice_end: str = "</slice>",
        unk: str = "<unk>",
        im_id_start: str = "<image_id>",
        im_id_end: str = "</image_id>",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.max_slice_nums = int(max_slice_nums)
        self.scale_resolution = int(scale_resolution)
        self.patch_size = int(patch_size)
        self.use_image_id = bool(use_image_id)
        self.slice_mode = bool(slice_mode)
        self.image_feature_size = int(image_feature_size)
        self.norm_mean = list(norm_mean or [0.5, 0.5, 0.5])
        self.norm_std = list(norm_std or [0.5, 0.5, 0.5])
        self.im_start_token, self.im_end_token = im_start, im_end
        self.slice_start_token, self.slice_end_token = slice_start, slice_end
        self.unk_token = unk
        self.im_id_start, self.im_id_end = im_id_start, im_id_end

    # -- slicing ----------------------------------------------------------------------------------

    def get_sliced_grid(self, image_size: Any, max_slice_nums: int | None = None, nerver_split: bool = False) -> list[int] | None:
        """Best [cols, rows] grid for an image of (width, height), or None when it is not sliced."""
        max_slice_nums = self.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        width, height = image_size
        ratio = width * height / (self.scale_resolution * self.scale_resolution)
        multiple = min(math.ceil(ratio), max_slice_nums)
        if multiple <= 1 or nerver_split or not self.slice_mode:
            return None
        counts = [n for n in (multiple - 1, multiple, multiple + 1) if 1 < n <= max_slice_nums]
        grids = [[m, n // m] for n in counts for m in range(1, n + 1) if n % m == 0]
        log_ratio = math.log(width / height)
        return min(grids, key=lambda g: abs(log_ratio - math.log(g[0] / g[1])))

    def slice_image(self, image: Image.Image, max_slice_nums: int | None = None) -> tuple[Image.Image, list[Image.Image]]:
        """(overview, slices in row-major order)."""
        grid = self.get_sliced_grid(image.size, max_slice_nums)
        s, p = self.scale_resolution, self.patch_size
        if grid is None:
            return image.resize(_best_resize(image.size, s, p, upscale=True), Image.Resampling.BICUBIC), []
        overview = image.resize(_best_resize(image.size, s, p), Image.Resampling.BICUBIC)
        cols, rows = grid
        cell = _best_resize((_ensure_divide(image.width, cols) / cols, _ensure_divide(image.height, rows) / rows),
                            s, p, upscale=True)
        refined = image.resize((cell[0] * cols, cell[1] * rows), Image.Resampling.BICUBIC)
        slices = [refined.crop((c * cell[0], r * cell[1], (c + 1) * cell[0], (r + 1) * cell[1]))
                  for r in range(rows) for c in range(cols)]
        return overview, slices

    # -- placeholders -----------------------------------------------------------------------------

    def get_image_id_placeholder(self, idx: int = 0) -> str:
        return f"{self.im_id_start}{idx}{self.im_id_end}"

    def get_grid_placeholder(self, grid: list[int] | None) -> str:
        if grid is None:
            return ""
        one = self.slice_start_token + self.unk_token * self.image_feature_size + self.slice_end_token
        cols, rows = grid
        return "\n".join(one * cols for _ in range(rows))

    def get_slice_image_placeholder(self, image_size: Any, image_idx: int = 0, max_slice_nums: int | None = None,
                                    use_image_id: bool | None = None) -> str:
        grid = self.get_sliced_grid(image_size, max_slice_nums)
        text = self.im_start_token + self.unk_token * self.image_feature_size + self.im_end_token
        if self.use_image_id if use_image_id is None else use_image_id:
            text = self.get_image_id_placeholder(image_idx) + text
        return text + self.get_grid_placeholder(grid)

    # -- pixels -----------------------------------------------------------------------------------

    def reshape_by_patch(self, image: np.ndarray) -> torch.Tensor:
        """[3, H, W] -> [3, patch_size, (H/patch)*(W/patch)*patch_size], patches in row-major order."""
        x = torch.from_numpy(image)
        p = self.patch_size
        patches = torch.nn.functional.unfold(x, (p, p), stride=(p, p))  # [3*p*p, n]
        patches = patches.reshape(x.size(0), p, p, -1)
        return patches.permute(0, 1, 3, 2).reshape(x.size(0), p, -1)

    def _to_chw(self, image: Image.Image) -> np.ndarray:
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.norm_mean, np.float32)) / np.asarray(self.norm_std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def preprocess(self, images: Any, do_pad: bool = True, max_slice_nums: int | None = None,
                   return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        """images: one image, a list of images (one prompt), or a list with one list of images or
        one [T, H, W, 3] array of video frames per prompt."""
        if _is_single(images):
            images = [[images]]
        elif images and _is_single(images[0]):
            images = [list(images)]
        pixel_values, image_sizes, tgt_sizes = [], [], []
        for group in images:
            group = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in group]
            values, sizes = [], []
            for image in group:
                overview, slices = self.slice_image(image.convert("RGB"), max_slice_nums)
                for part in [overview, *slices]:
                    chw = self._to_chw(part)
                    values.append(self.reshape_by_patch(chw))
                    sizes.append((chw.shape[1] // self.patch_size, chw.shape[2] // self.patch_size))
            pixel_values.append(values)
            image_sizes.append([torch.tensor(im.size) for im in group])
            tgt_sizes.append(torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2))
        return BatchFeature(data={"pixel_values": pixel_values, "image_sizes": image_sizes, "tgt_sizes": tgt_sizes})

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

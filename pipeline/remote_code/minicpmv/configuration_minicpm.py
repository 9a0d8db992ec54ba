"""MiniCPM-V (2.6 / 4.0 / 4.5) configuration, loaded with `trust_remote_code` from a checkpoint dir.

A flat text-model config (hidden_size, num_hidden_layers, ... of the language backbone at the top
level, as the published checkpoints have it) plus a SigLIP `vision_config`, the resampler's
`query_num`, the slicing parameters in `slice_config` and the generation `version` that vLLM's
`minicpmv` model dispatches on. Qwen3Config is the base because it carries every field the
Qwen2 (2.6), Llama-style (4.0) and Qwen3 (4.5) backbones read.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, Qwen3Config, SiglipVisionConfig


class MiniCPMVSliceConfig(PretrainedConfig):
    """LLaVA-UHD slicing: slices of `scale_resolution`**2 pixels in patches of `patch_size`."""

    model_type = "minicpmv"

    def __init__(self, patch_size: int = 14, max_slice_nums: int = 9, scale_resolution: int = 448, **kwargs: Any):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution


class MiniCPMVConfig(Qwen3Config):
    model_type = "minicpmv"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        use_cache: bool = True,
        query_num: int = 64,
        image_size: int = 448,
        drop_vision_last_layer: bool = False,
        batch_vision_input: bool = True,
        slice_config: dict[str, Any] | None = None,
        vision_config: dict[str, Any] | SiglipVisionConfig | None = None,
        use_image_id: bool = True,
        vision_batch_size: int = 16,
        version: float = 4.5,
        **kwargs: Any,
    ):
        self.use_cache = use_cache
        self.query_num = query_num
        self.image_size = image_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input
        self.use_image_id = use_image_id
        self.vision_batch_size = vision_batch_size
        self.version = version

        if isinstance(slice_config, MiniCPMVSliceConfig):
            self.slice_config = slice_config
        else:
            self.slice_config = MiniCPMVSliceConfig(**(slice_config or {}))
        self.slice_mode = True

        if isinstance(vision_config, SiglipVisionConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = SiglipVisionConfig(**(vision_config or {}))
        self.patch_size = self.vision_config.patch_size

        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("slice_config", "vision_config"):
            value = out.get(key)
            if isinstance(value, PretrainedConfig):
                out[key] = value.to_dict()
        return out

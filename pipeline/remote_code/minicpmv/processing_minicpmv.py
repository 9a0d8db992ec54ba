"""MiniCPM-V (2.6 / 4.0 / 4.5) processor, loaded with `trust_remote_code`.

Text holds one `(<image>./</image>)` per image; each is replaced by the image processor's
placeholder (image id, overview, slices) and the result tokenized. `image_bound` gives the
[start, end) token ranges between each `<image>`/`<slice>` opener and its closer, where the
resampler's query embeddings go. vLLM uses this class only for its tokenizer (it runs its own
copy of the upstream processor around our image processor); transformers users call it directly.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import ProcessorMixin

IMAGE_PATTERN = "(<image>./</image>)"


class MiniCPMVProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, text: str | list[str], images: Any = None, max_slice_nums: int | None = None,
                 use_image_id: bool | None = None, return_tensors: Any = "pt", **kwargs: Any) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            return BatchFeature(data=dict(self.tokenizer(texts, return_tensors=return_tensors, padding=True)))
        pixels = self.image_processor(images, max_slice_nums=max_slice_nums)
        ip = self.image_processor
        starts = {self.tokenizer.convert_tokens_to_ids(t) for t in (ip.im_start_token, ip.slice_start_token)}
        ends = {self.tokenizer.convert_tokens_to_ids(t) for t in (ip.im_end_token, ip.slice_end_token)}
        ids_list, bounds_list = [], []
        for k, prompt in enumerate(texts):
            chunks = prompt.split(IMAGE_PATTERN)
            sizes = pixels["image_sizes"][k]
            if len(chunks) - 1 != len(sizes):
                raise ValueError(f"prompt {k} has {len(chunks) - 1} {IMAGE_PATTERN} placeholders for {len(sizes)} images")
            parts = [chunks[0]]
            for i, size in enumerate(sizes):
                parts.append(ip.get_slice_image_placeholder(tuple(size.tolist()), image_idx=i,
                                                            max_slice_nums=max_slice_nums, use_image_id=use_image_id))
                parts.append(chunks[i + 1])
            ids = torch.tensor(self.tokenizer.encode("".join(parts), add_special_tokens=False), dtype=torch.int64)
            opener = torch.tensor([int(t) in starts for t in ids])
            closer = torch.tensor([int(t) in ends for t in ids])
            bounds = torch.stack([torch.where(opener)[0] + 1, torch.where(closer)[0]], dim=1)
            ids_list.append(ids)
            bounds_list.append(bounds)
        width = max(len(ids) for ids in ids_list)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids_list), width), pad, dtype=torch.int64)
        mask = torch.zeros((len(ids_list), width), dtype=torch.int64)
        for k, ids in enumerate(ids_list):  # left padding, as for generation
            input_ids[k, width - len(ids):] = ids
            mask[k, width - len(ids):] = 1
            bounds_list[k] = bounds_list[k] + (width - len(ids))
        return BatchFeature(data={"input_ids": input_ids, "attention_mask": mask, "image_bound": bounds_list,
                                  **pixels})

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

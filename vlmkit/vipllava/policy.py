"""What the generic layers need from the LLaVA family beyond its config, model and processor, referenced from
its registry entry (vlmkit.models): how a prompt and its pictures become processor inputs, how a rendered
training conversation becomes a sample, and how the samples' pictures batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlmkit.train.data import BadRow, Sample, count_rendered_images, label_tokens
from vlmkit.vipllava.processor import LlavaProcessor


def prompt_inputs(
    processor: LlavaProcessor, prompt: str, images: Sequence[Any], *, allow_remote: bool
) -> dict[str, torch.Tensor]:
    """A prompt without `<image>` markers gets one per image, on lines of their own before the text."""
    marker = processor.image_token
    if images and marker not in prompt:
        prompt = f"{marker}\n" * len(images) + prompt
    return processor(text=[prompt], images=list(images) or None, allow_remote=allow_remote)


def training_sample(
    processor: LlavaProcessor, text: str, mask: np.ndarray, images: dict[str, torch.Tensor], row: int
) -> Sample:
    """Each `<image>` becomes tokens_for(H, W) image tokens, then the text is tokenized with special tokens,
    as LlavaProcessor does."""
    marker = processor.image_token
    pixel_values = images.get("pixel_values")
    n_images = 0 if pixel_values is None else len(pixel_values)
    count_rendered_images(text, marker, n_images)
    per_image = 0
    if pixel_values is not None:
        per_image = processor.tokens_for(*pixel_values.shape[-2:])
        pieces = text.split(marker)
        text = (marker * per_image).join(pieces)
        mask = np.concatenate(spread(mask, [len(p) for p in pieces], len(marker), len(marker) * per_image))
    encoding = processor.tokenizer.backend.encode(text, add_special_tokens=True)
    ids = encoding.ids
    found = ids.count(processor.image_token_id)
    if found != n_images * per_image:
        raise BadRow(
            "image count", f"the text tokenizes to {found} image tokens, not {n_images} x {per_image}"
        )
    return Sample(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=label_tokens(ids, encoding.offsets, text, mask, processor.image_token_id),
        pixel_values=pixel_values,
        image_attention_mask=None,
        row=row,
    )


def spread(mask: np.ndarray, piece_lengths: list[int], gap: int, new_gap: int) -> list[np.ndarray]:
    """The mask of text pieces separated by `gap` characters, with each gap widened to `new_gap` unlearned
    characters."""
    out, pos = [], 0
    for k, length in enumerate(piece_lengths):
        out.append(mask[pos : pos + length])
        pos += length
        if k < len(piece_lengths) - 1:
            out.append(np.zeros(new_gap, dtype=bool))
            pos += gap
    return out


def collate_images(samples: list[Sample], T: int) -> dict[str, torch.Tensor]:
    """pixel_values (N_total, 3, H, W): every sample's images in order; nothing without images."""
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None and len(s.pixel_values)]
    return {"pixel_values": torch.cat(pixels)} if pixels else {}

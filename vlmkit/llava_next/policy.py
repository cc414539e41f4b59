"""What the generic layers need from LLaVA-NeXT beyond its config, model and processor, referenced from its
registry entry (vlmkit.models): how a prompt and its pictures become processor inputs (as LLaVA's), how a
rendered training conversation becomes a sample, how the samples' pictures batch, and how the newline
vector starts in a model trained from scratch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmkit.llava_next.processor import LlavaNextProcessor, expand_markers
from vlmkit.train.data import BadRow, Sample, count_rendered_images, label_tokens
from vlmkit.vipllava.policy import prompt_inputs

__all__ = ["collate_images", "init_parameter", "prompt_inputs", "training_sample"]


def training_sample(
    processor: LlavaNextProcessor, text: str, mask: np.ndarray, images: dict[str, torch.Tensor], row: int
) -> Sample:
    """Each `<image>` becomes its picture's count of image tokens (from its size in `image_sizes`), then the
    text is tokenized with special tokens, as LlavaNextProcessor does. The sizes go with the sample as its
    `image_inputs`."""
    marker = processor.image_token
    pixel_values, sizes = images.get("pixel_values"), images.get("image_sizes")
    n_images = 0 if pixel_values is None else len(pixel_values)
    count_rendered_images(text, marker, n_images)
    counts: list[int] = []
    if pixel_values is not None:
        counts = [processor.tokens_for(size, *pixel_values.shape[-2:]) for size in sizes.tolist()]
        pieces = text.split(marker)
        (text,) = expand_markers([text], marker, counts)
        mask = widen_gaps(mask, [len(p) for p in pieces], len(marker), [len(marker) * n for n in counts])
    encoding = processor.tokenizer.backend.encode(text, add_special_tokens=True)
    ids = encoding.ids
    found = ids.count(processor.image_token_id)
    if found != sum(counts):
        raise BadRow(
            "image count", f"the text tokenizes to {found} image tokens, not {sum(counts)} ({counts})"
        )
    return Sample(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=label_tokens(ids, encoding.offsets, text, mask, processor.image_token_id),
        pixel_values=pixel_values,
        image_attention_mask=None,
        row=row,
        image_inputs={} if sizes is None else {"image_sizes": sizes},
    )


def widen_gaps(mask: np.ndarray, piece_lengths: list[int], gap: int, new_gaps: list[int]) -> np.ndarray:
    """The mask of text pieces separated by `gap` characters, with gap k widened to new_gaps[k] unlearned
    characters."""
    out, pos = [], 0
    for k, length in enumerate(piece_lengths):
        out.append(mask[pos : pos + length])
        pos += length
        if k < len(new_gaps):
            out.append(np.zeros(new_gaps[k], dtype=bool))
            pos += gap
    return np.concatenate(out)


def collate_images(samples: list[Sample], T: int) -> dict[str, torch.Tensor]:
    """pixel_values (N_total, V_max, 3, h, w), every sample's pictures in order with their views zero-padded
    to the batch's most, and image_sizes (N_total, 2) from the samples' image_inputs; nothing without
    images."""
    with_pictures = [s for s in samples if s.pixel_values is not None and len(s.pixel_values)]
    if not with_pictures:
        return {}
    for s in with_pictures:
        n, sizes = len(s.pixel_values), s.image_inputs.get("image_sizes")
        if sizes is None or tuple(sizes.shape) != (n, 2):
            raise ValueError(
                f"row {s.row}: the sample's image_inputs need image_sizes ({n}, 2) for its {n} pictures; "
                f"got {None if sizes is None else tuple(sizes.shape)}"
            )
    most = max(s.pixel_values.shape[1] for s in with_pictures)
    pixels = [
        nn.functional.pad(s.pixel_values, (0, 0, 0, 0, 0, 0, 0, most - s.pixel_values.shape[1]))
        for s in with_pictures
    ]
    return {
        "pixel_values": torch.cat(pixels),
        "image_sizes": torch.cat([s.image_inputs["image_sizes"] for s in with_pictures]),
    }


def init_parameter(name: str, p: nn.Parameter, config: Any, g: torch.Generator) -> bool:
    """The newline vector starts as the reference starts it: normal, std 1/sqrt(text width)."""
    if name != "image_newline":
        return False
    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(config.text_config.hidden_size))
    return True

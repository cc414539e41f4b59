"""What the generic layers need from IDEFICS beyond its config, model and processor, referenced from its
registry entry (vlmkit.models): how a prompt and its pictures become processor inputs, how a rendered
training conversation becomes a sample, how the samples' pictures batch, and how its own parameters (the
cross-attention gates, the perceiver latents) start in a model trained from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmkit.idefics.config import IdeficsConfig
from vlmkit.idefics.processor import IMAGE_TOKEN, IdeficsProcessor, interleave_images, is_url
from vlmkit.train.data import BadRow, Sample, count_rendered_images, label_tokens


def prompt_inputs(
    processor: IdeficsProcessor, prompt: str, images: Sequence[Any], *, allow_remote: bool
) -> dict[str, torch.Tensor]:
    """A prompt without `<image>` markers follows its images; with markers, the images go where they are."""
    images = list(images)
    sample = [*images, prompt] if images and IMAGE_TOKEN not in prompt else interleave_images(prompt, images)
    return processor(text=[sample], allow_remote=allow_remote)


def training_sample(
    processor: IdeficsProcessor, text: str, mask: np.ndarray, images: dict[str, torch.Tensor], row: int
) -> Sample:
    """The rendered text is split at its `<image>` markers into an interleaved sample, which build_prompt
    turns into the IDEFICS prompt (BOS, image and fake tokens, pieces stripped of end spaces)."""
    pixel_values = images.get("pixel_values")
    n_images = 0 if pixel_values is None else len(pixel_values)
    count_rendered_images(text, IMAGE_TOKEN, n_images)
    prompt, prompt_mask = training_prompt(processor, text, mask)
    encoding = processor.tokenizer.backend.encode(prompt, add_special_tokens=False)
    ids = torch.tensor(encoding.ids, dtype=torch.long)
    found = int((ids == processor.image_token_id).sum())
    if found != n_images:
        raise BadRow("image count", f"the prompt tokenizes to {found} image tokens for {n_images} images")
    if n_images:
        image_attention_mask = processor.image_attention_mask(ids[None], n_images)[0]  # (T, N)
    else:
        image_attention_mask = torch.zeros(len(ids), 0, dtype=torch.long)
    return Sample(
        input_ids=ids,
        labels=label_tokens(encoding.ids, encoding.offsets, prompt, prompt_mask, processor.image_token_id),
        pixel_values=pixel_values,
        image_attention_mask=image_attention_mask.long(),
        row=row,
    )


class _Image:
    """An image slot for IdeficsProcessor.build_prompt (a path string there would be read as text)."""


def training_prompt(processor: IdeficsProcessor, text: str, mask: np.ndarray) -> tuple[str, np.ndarray]:
    """build_prompt's string for the rendered text, and the learned-character mask carried over to it.
    Where each text piece lands is read off build_prompt itself: the prompt of the first j items ends
    where item j ends."""
    sample: list[Any] = []
    starts: dict[int, int] = {}  # sample index of a text piece -> its start in `text`
    pos = 0
    pieces = text.split(IMAGE_TOKEN)
    for k, piece in enumerate(pieces):
        if piece:  # as IdeficsProcessor.apply_chat_template: empty pieces are left out
            if is_url(piece.strip(" ")):
                raise BadRow(
                    "image count",
                    f"the text {piece.strip()!r} looks like a URL, which IDEFICS reads as an image",
                )
            starts[len(sample)] = pos
            sample.append(piece)
        pos += len(piece)
        if k < len(pieces) - 1:
            sample.append(_Image())
            pos += len(IMAGE_TOKEN)

    def build(items: list[Any]) -> str:
        return processor.build_prompt(items, add_end_of_utterance_token=False, add_eos_token=False)[0]

    prompt = build(sample)
    prompt_mask = np.zeros(len(prompt), dtype=bool)
    for j, start in starts.items():
        piece = sample[j]
        kept = piece.strip(" ")
        end = len(build(sample[: j + 1]))
        begin = end - len(kept)
        if prompt[begin:end] != kept:
            raise AssertionError(f"build_prompt did not write {kept!r} where expected")
        lead = len(piece) - len(piece.lstrip(" "))
        prompt_mask[begin:end] = mask[start + lead : start + lead + len(kept)]
    return prompt, prompt_mask


def collate_images(samples: list[Sample], T: int) -> dict[str, torch.Tensor]:
    """pixel_values (B, N_max, 3, H, W) and image_attention_mask (B, T, N_max), zero-padded; nothing when no
    sample has an image."""
    counts = [0 if s.pixel_values is None else len(s.pixel_values) for s in samples]
    N = max(counts)
    if N == 0:
        return {}
    first = next(s.pixel_values for s in samples if s.pixel_values is not None and len(s.pixel_values))
    pixel_values = first.new_zeros(len(samples), N, *first.shape[1:])  # (B, N, 3, H, W)
    image_attention_mask = torch.zeros(len(samples), T, N, dtype=torch.long)  # (B, T, N)
    for b, (s, n) in enumerate(zip(samples, counts, strict=True)):
        if s.image_attention_mask.shape != (len(s.input_ids), n):
            raise ValueError(
                f"row {s.row}: image_attention_mask {tuple(s.image_attention_mask.shape)} does not match "
                f"{len(s.input_ids)} tokens x {n} images"
            )
        if n:
            pixel_values[b, :n] = s.pixel_values
            image_attention_mask[b, : len(s.input_ids), :n] = s.image_attention_mask
    return {"pixel_values": pixel_values, "image_attention_mask": image_attention_mask}


def init_parameter(name: str, p: nn.Parameter, config: IdeficsConfig, g: torch.Generator) -> bool:
    """The gates start as `alpha_initializer` says (zeros: the cross-attention is off until trained), the
    perceiver latents as normal(0, 1); every other parameter is left to the generic init (False)."""
    if name.endswith(("alpha_cross_attn", "alpha_dense")):
        if config.alpha_initializer == "ones":
            p.fill_(1.0)
        elif config.alpha_initializer in ("normal", "gaussian", "random"):
            p.copy_(torch.randn(p.shape, generator=g) * config.alphas_initializer_range)
        else:
            p.zero_()
        return True
    if name.endswith("latents"):
        p.copy_(torch.randn(p.shape, generator=g))
        return True
    return False

"""The model-runner interface: what `generate` and the server engine know of a model family, and nothing more.

A family's model implements `Runner` (most of it comes from `RunnerMixin`):
- `plan(inputs)`: one request's processor outputs -> a `PromptPlan`: its token ids and its pictures as
  `ImageItem`s (pixels, metadata, a content hash, and the prompt tokens whose keys/values depend on each);
- `encode(items)`: each picture's features from its item (its pixels and its metadata, so pictures of
  different shapes, such as LLaVA-NeXT's different counts of tiles, encode in one call), which is what the
  engine's feature cache stores;
- `prompt_images(plan, start, features)`: what the prefill of the plan's tokens from `start` on needs of
  the pictures, in the family's own form; `batch_images` puts several prompts' together for one prefill
  of their ids padded on the right;
- `prefill(ids, images=..., ...)` and `decode(tokens, ...)`: the decoder over a KV cache view, slots passed
  per call (`CacheSlots`), with a family-owned per-row state: `prefill` returns it, `decode` reads it.
  IDEFICS keeps its cross-attention keys/values, image mask and gates there; LLaVA has none;
- `row_store(max_batch)`: the engine's padded store of that state over its rows (join, move, view).

`DecoderSession` is the `generate` side: a batch of prompts run once, then one token per row per step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from vlmkit.modules import CacheSlots


@dataclass
class ImageItem:
    """One picture of a request."""

    pixels: torch.Tensor  # preprocessed, in the family's shape: (C, H, W), or (views, C, H, W) for tiles
    key: str  # SHA-256 of the pixels (and metadata): the feature cache's key
    positions: list[int]  # the prompt tokens whose keys/values depend on this picture
    meta: dict[str, Any] = field(default_factory=dict)  # what else `encode` needs of it (LLaVA-NeXT: size)


@dataclass
class PromptPlan:
    """One request's prompt as its family reads it."""

    ids: torch.Tensor  # (1, L)
    items: list[ImageItem]
    decode_items: list[int]  # the pictures every generated token depends on (IDEFICS: the last token's)
    extra: dict[str, Any] = field(default_factory=dict)  # family inputs its prefill needs again


def final_positions(ids: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """Each row's last real position (B,) of prompt ids (B, T): `last`, or T - 1 in every row when None."""
    if last is not None:
        return last
    return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)


def content_key(pixels: torch.Tensor, meta: dict[str, Any] | None = None) -> str:
    """SHA-256 of preprocessed pixels (and their metadata): equal pictures share features."""
    h = hashlib.sha256(memoryview(pixels.detach().cpu().contiguous().numpy()).cast("B"))
    if meta:
        h.update(repr(sorted(meta.items())).encode())
    return h.hexdigest()


class RowState(Protocol):
    """A family's per-row decoding state for a batch of rows."""

    def select(self, index: torch.Tensor) -> RowState:
        """Rows `index` (repeats allowed): beams, several return sequences."""


class RowStore(Protocol):
    """A family's per-row state over the engine's `max_batch` rows."""

    def join(self, first: int, n: int, state: RowState | None) -> None:
        """Rows first..first+n-1 take `state` (one row's), or none."""

    def move(self, old: int, new: int) -> None:
        """Row `old` moves to row `new` (compaction)."""

    def view(self, n: int) -> RowState | None:
        """The state of rows 0..n-1 for one decode step."""


class NoRowStore:
    """The store of a family that keeps no per-row state."""

    def join(self, first: int, n: int, state: RowState | None) -> None:
        if state is not None:
            raise ValueError("this family keeps no per-row state")

    def move(self, old: int, new: int) -> None:
        return None

    def view(self, n: int) -> RowState | None:
        return None


class Runner(Protocol):
    """What `generate` and the engine call on a model."""

    @property
    def decoder(self) -> nn.Module:
        """The LLaMA decoder (layers with `self_attn`, `setup_cache`, `clear_cache`)."""

    def plan(self, inputs: dict[str, torch.Tensor]) -> PromptPlan:
        """One request's processor outputs (batch of 1) -> its ids and pictures; raises ValueError on inputs
        that do not fit together (image tokens against pictures, masks against ids)."""

    def encode(self, items: list[ImageItem]) -> list[torch.Tensor]:
        """Pictures (their items' pixels and metadata; shapes may differ between them) -> one feature tensor
        per item, in order, each independent of the other items."""

    def prompt_images(self, plan: PromptPlan, start: int, features: list[torch.Tensor | None]) -> Any:
        """What `prefill` of the plan's tokens from `start` on needs of its pictures, in the family's own
        form; `features` has one entry per picture, None where no token from `start` on depends on it."""

    def batch_images(self, images: list[Any], lengths: list[int]) -> Any:
        """Several prompts' `prompt_images` (each for `lengths[b]` tokens) as one `prefill` of their ids
        stacked in that order and padded on the right to the longest."""

    def prefill(
        self,
        ids: torch.Tensor,
        *,
        images: Any,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        at: CacheSlots,
        kv_caches: dict[nn.Module, Any] | None = None,
        last: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RowState | None]:
        """Prompt tokens (B, T) with `images` into the cache at `at` -> the last position's logits (B, V)
        and the rows' state for the decode steps (None: the family keeps none). last (B,): each row's last
        real position, for ids padded on the right (None: T - 1 in every row)."""

    def decode(
        self,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        at: CacheSlots,
        kv_caches: dict[nn.Module, Any] | None = None,
        state: RowState | None = None,
    ) -> torch.Tensor:
        """One token per row (n, 1) through the cache at `at` -> next-token logits (n, V)."""

    def row_store(self, max_batch: int) -> RowStore:
        """An empty store of the family's row state for `max_batch` rows."""

    def filler_token(self, plan: PromptPlan) -> int:
        """A token id that may pad the plan's prompt in a joint prefill without changing what it needs."""


class RunnerMixin:
    """The parts of `Runner` every family shares: a family gives `decoder`, `head`, `plan`, `encode`,
    `prompt_images` and `prefill`, and overrides `row_store` when it keeps per-row state."""

    def decode(
        self,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        at: CacheSlots,
        kv_caches: dict[nn.Module, Any] | None = None,
        state: RowState | None = None,
    ) -> torch.Tensor:
        """tokens (n, 1) through the cached decoder -> next-token logits (n, V)."""
        decoder = self.decoder
        hidden = decoder(
            decoder.embed_tokens(tokens),
            attention_mask=attention_mask,
            position_ids=position_ids,
            at=at,
            kv_caches=kv_caches,
            state=state,
        )
        return self.head(hidden[:, -1])

    def row_store(self, max_batch: int) -> RowStore:
        return NoRowStore()

    def filler_token(self, plan: PromptPlan) -> int:
        """A token id that pads the prompt's row in a prefill joined with longer prompts (its outputs are
        never read, and its keys and values are overwritten): the prompt's last token."""
        return int(plan.ids[0, -1])


class InlineImagesRunner(RunnerMixin):
    """The runner of a family whose pictures' features take the place of its `<image>` tokens' embeddings
    (the LLaVA families): the model holds `language_model` (a LLaMA-style causal LM) and
    `embed_inputs(ids, features)`, which writes the features at the `<image>` positions, and gives `plan`
    and `encode`; the rest is here. No per-row state."""

    @property
    def decoder(self) -> Any:
        return self.language_model.model

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model(hidden)

    def filler_token(self, plan: PromptPlan) -> int:
        """The prompt's last token that is not `<image>` (padding of `<image>` tokens would ask for features
        that no picture gives)."""
        image = self.config.image_token_index
        return next((t for t in reversed(plan.ids[0].tolist()) if t != image), int(image == 0))

    def prompt_images(
        self, plan: PromptPlan, start: int, features: list[torch.Tensor | None]
    ) -> torch.Tensor | None:
        """The features of the `<image>` tokens from `start` on, in order (1, n, C)."""
        n = sum(t >= start for item in plan.items for t in item.positions)
        if not n:
            return None
        have = [f for f in features if f is not None]
        return (have[0] if len(have) == 1 else torch.cat(have))[-n:][None]

    def batch_images(self, images: list[torch.Tensor | None], lengths: list[int]) -> torch.Tensor | None:
        """The prompts' features (1, n_b, C) one after another: the order of their `<image>` tokens in the
        stacked ids (padding holds none)."""
        have = [f for f in images if f is not None]
        return torch.cat(have, dim=1) if have else None

    def prefill(
        self,
        ids: torch.Tensor,
        *,
        images: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        at: CacheSlots,
        kv_caches: dict[nn.Module, Any] | None = None,
        last: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Prompt tokens (B, T) with their image features into the cache -> last logits (B, V); no row state."""
        hidden = self.decoder(
            self.embed_inputs(ids, images),
            attention_mask=attention_mask,
            position_ids=position_ids,
            at=at,
            kv_caches=kv_caches,
            last=final_positions(ids, last),
        )
        return self.head(hidden[:, -1]), None


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions of the prompt as the reference's generate makes them: count of real tokens so far,
    padding at 0."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


class DecoderSession:
    """A batch of prompts run once into a preallocated cache, then one token per row per step: an attention
    mask that grows one slot per step, rotary positions that continue from the prompt's, and row selection
    over the cache and the family's row state. `images` is called once, at prefill, for the family's image
    inputs (so validation happens before, and the vision tower runs once)."""

    def __init__(
        self,
        model: Runner,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        images: Callable[[], Any],
    ) -> None:
        B, T = input_ids.shape
        self.model, self.images = model, images
        self.input_ids = input_ids
        self.t = T
        self.mask = torch.zeros(B, T + max_new_tokens, dtype=torch.long, device=input_ids.device)
        self.mask[:, :T] = 1 if attention_mask is None else attention_mask
        self.positions = generation_positions(self.mask[:, :T])  # (B, T)
        self.next_pos = self.positions[:, -1:] + 1  # (B, 1)
        self.state: RowState | None = None

    def prefill(self) -> torch.Tensor:
        """Run the prompt (and its images) into the cache; return the last position's logits (B, V)."""
        images, self.images = self.images(), None
        B, T = self.input_ids.shape
        self.model.decoder.setup_cache(B, self.mask.shape[1])
        logits, self.state = self.model.prefill(
            self.input_ids,
            images=images,
            attention_mask=self.mask[:, :T],
            position_ids=self.positions,
            at=CacheSlots(torch.arange(T, device=self.input_ids.device), key_len=T),
        )
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); return the next logits (B, V)."""
        t = self.t
        self.mask[:, t] = 1
        logits = self.model.decode(
            tokens[:, None],
            attention_mask=self.mask[:, : t + 1],
            position_ids=self.next_pos,
            at=CacheSlots(torch.tensor([t], device=tokens.device), key_len=t + 1),
            state=self.state,
        )
        self.t += 1
        self.next_pos = self.next_pos + 1
        return logits

    def select(self, index: torch.Tensor) -> None:
        """Keep (and repeat) rows `index`."""
        self.mask = self.mask.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        for layer in self.model.decoder.layers:
            layer.self_attn.kv_cache.select_rows(index)
        if self.state is not None:
            self.state = self.state.select(index)

    def expand(self, n: int) -> None:
        """Repeat every row n times in place (beams, several return sequences)."""
        rows = torch.arange(self.mask.shape[0], device=self.mask.device)
        self.select(rows.repeat_interleave(n))

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search)."""
        self.select(index)

    def close(self) -> None:
        """Free the cache."""
        self.model.decoder.clear_cache()

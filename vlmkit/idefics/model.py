"""IDEFICS: a CLIP-style vision encoder, an optional perceiver resampler, and gated cross-attention blocks
placed before every `cross_layer_interval`-th layer of the shared LLaMA decoder.

The image side is split out so that generation can run it once: `encode_images` gives the image states,
`cross_attention_kv` the keys/values every block attends to, and `forward` accepts either.
Attribute names follow the checkpoint (`model.embed_tokens.additional_embedding`, `model.gated_cross_attn_layers.{i}
.alpha_cross_attn`, `model.perceiver_resampler.*`, `lm_head.additional_fc`, ...).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.clip import CLIPVisionTransformer
from vlmkit.generation import GenerationConfig, GenerationMixin
from vlmkit.idefics.config import IdeficsConfig
from vlmkit.idefics.cross_attention import CrossContext, CrossRows, FusionLayer, GatedCrossAttentionBlock
from vlmkit.idefics.perceiver import PerceiverResampler
from vlmkit.llama import LlamaModel, causal_lm_loss, check_text_inputs, keep_positions
from vlmkit.modules import CacheSlots, CausalLMOutput
from vlmkit.runner import (
    DecoderSession,
    ImageItem,
    PromptPlan,
    RunnerMixin,
    content_key,
    final_positions,
)
from vlmkit.weights import SavePretrainedMixin

# Published checkpoints and transformers 5 saves use the same names as our modules.
KEY_MAP: list[tuple[str, str]] = []
KEY_IGNORE = (r"\.position_ids$", r"rotary_emb\.inv_freq$")

FREEZE_TYPES: dict[str, type[nn.Module]] = {
    "LayerNorm": nn.LayerNorm,
    "Linear": nn.Linear,
    "Embedding": nn.Embedding,
}


class DecoupledEmbedding(nn.Module):
    """The base token table (`weight`) plus `additional_embedding` rows for ids >= num_embeddings, so the new
    tokens can train while the base table stays frozen."""

    embedding_fn = staticmethod(F.embedding)  # split over processes, it looks up its part (tensor_parallel)

    def __init__(self, num_embeddings: int, num_additional: int, dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.weight = nn.Parameter(torch.zeros(num_embeddings, dim))
        if num_additional:
            self.additional_embedding = nn.Embedding(num_additional, dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "additional_embedding"):
            return self.embedding_fn(input_ids, self.weight)
        extra = input_ids >= self.num_embeddings
        base = self.embedding_fn(input_ids.masked_fill(extra, 0), self.weight)
        added = self.additional_embedding((input_ids - self.num_embeddings).clamp(min=0))
        return torch.where(extra[..., None], added, base)


class DecoupledLinear(nn.Module):
    """LM head over the base vocabulary (`weight`) with `additional_fc` columns appended for the new tokens."""

    linear_fn = staticmethod(F.linear)  # the CPU fast path relays it (vlmkit.fastpath)

    def __init__(self, dim: int, vocab_size: int, num_additional: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, dim))
        if num_additional:
            self.additional_fc = nn.Linear(dim, num_additional, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear_fn(x, self.weight)
        if hasattr(self, "additional_fc"):
            logits = torch.cat([logits, self.additional_fc(x)], dim=-1)
        return logits


class IdeficsBase(LlamaModel):
    """Everything under the checkpoint prefix `model.`: the LLaMA decoder (its embeddings decoupled) with the
    vision encoder, the resampler and the gated cross-attention blocks composed into its loop."""

    def __init__(self, config: IdeficsConfig) -> None:
        super().__init__(config.text_config)
        self.idefics_config = config
        self.embed_tokens = DecoupledEmbedding(
            config.vocab_size, config.additional_vocab_size, config.hidden_size
        )
        self.vision_model = CLIPVisionTransformer(config.vision_config)
        if config.use_resampler:
            self.perceiver_resampler = PerceiverResampler(
                config.vision_config.hidden_size, config.perceiver_config
            )
        self.gated_cross_attn_layers = nn.ModuleList(
            GatedCrossAttentionBlock(config, j) for j in range(config.num_cross_layers)
        )
        # the reference's (and the checkpoint's) order: seeded random init walks parameters in this order
        for name in ("layers", "gated_cross_attn_layers", "norm", "rotary_emb"):
            self._modules[name] = self._modules.pop(name)

    def decoder_layers(self) -> list[Any]:
        """Every `cross_layer_interval`-th layer runs after its gated cross-attention block."""
        interval = self.idefics_config.cross_layer_interval
        return [
            FusionLayer(self.gated_cross_attn_layers[i // interval], layer) if i % interval == 0 else layer
            for i, layer in enumerate(self.layers)
        ]


class IdeficsModel(RunnerMixin, GenerationMixin, SavePretrainedMixin, nn.Module):
    """IDEFICS for generation: `model` (IdeficsBase) and the decoupled `lm_head`."""

    generation_inputs = (
        "pixel_values",
        "image_encoder_embeddings",
        "perceiver_embeddings",
        "image_attention_mask",
        "interpolate_pos_encoding",
        "image_states",
    )

    def __init__(self, config: IdeficsConfig) -> None:
        super().__init__()
        self.config = config
        self.model = IdeficsBase(config)
        self.lm_head = DecoupledLinear(config.hidden_size, config.vocab_size, config.additional_vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            if config.additional_vocab_size:
                self.lm_head.additional_fc.weight = self.model.embed_tokens.additional_embedding.weight
        apply_freeze(self, config)

    # -- images ---------------------------------------------------------------------------------

    def encode_images(
        self,
        *,
        pixel_values: torch.Tensor | None = None,
        image_encoder_embeddings: torch.Tensor | None = None,
        perceiver_embeddings: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """Image states (B, N, S, C_vis) the cross-attention attends to, from exactly one of: pixel_values
        (B, N, C, H, W), vision-encoder outputs (B, N, S, C_vis) or resampler outputs (B, N, L, C_vis).

        Images that no token attends to (zero-padded images, their `image_attention_mask` column all 0) are
        not encoded; their states are zeros, which the mask hides.
        """
        given = [t is not None for t in (pixel_values, image_encoder_embeddings, perceiver_embeddings)]
        if sum(given) != 1:
            raise ValueError(
                "pass exactly one of pixel_values, image_encoder_embeddings or perceiver_embeddings"
            )
        dtype = self.model.embed_tokens.weight.dtype
        if perceiver_embeddings is not None:
            if not self.config.use_resampler:
                raise ValueError(
                    "perceiver_embeddings were given but this model has no resampler (use_resampler=False)"
                )
            check_image_tensor("perceiver_embeddings", perceiver_embeddings, 4)
            return perceiver_embeddings.to(dtype)
        if pixel_values is not None:
            check_image_tensor("pixel_values", pixel_values, 5)
            B, N = pixel_values.shape[:2]
            flat = pixel_values.reshape(B * N, *pixel_values.shape[2:])  # (B*N, C, H, W)
            used = self._used_images(image_attention_mask, B, N)
            states = self.model.vision_model(
                flat[used], layers=(-1,), interpolate_pos_encoding=interpolate_pos_encoding
            )[0]
            states = scatter_rows(states, used)
        else:
            check_image_tensor("image_encoder_embeddings", image_encoder_embeddings, 4)
            B, N = image_encoder_embeddings.shape[:2]
            states = image_encoder_embeddings.reshape(B * N, *image_encoder_embeddings.shape[2:]).to(dtype)
            used = self._used_images(image_attention_mask, B, N)
        if self.config.use_resampler:
            states = scatter_rows(self.model.perceiver_resampler(states[used]), used)
        return states.reshape(B, N, *states.shape[1:])

    @staticmethod
    def _used_images(image_attention_mask: torch.Tensor | None, B: int, N: int) -> torch.Tensor:
        if image_attention_mask is None or tuple(image_attention_mask.shape[::2]) != (B, N):
            return torch.ones(B * N, dtype=torch.bool)
        return image_attention_mask.bool().any(dim=1).reshape(B * N).cpu()

    def cross_attention_kv(self, image_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values (B, H, N*S, D) of every gated block over image states (B, N, S, C_vis)."""
        B, N, S, C = image_states.shape
        flat = image_states.reshape(B, N * S, C)
        return [block.cross_attn.image_kv(flat) for block in self.model.gated_cross_attn_layers]

    def cross_context(
        self,
        image_states: torch.Tensor | None,
        image_attention_mask: torch.Tensor | None,
        kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> CrossContext | None:
        """The mask and gate for image_attention_mask (B, T, N): token t sees image n's S states where the
        mask is 1; a row of zeros (text before any image) is gated off entirely."""
        if image_states is None:
            return None
        S = image_states.shape[2]
        seen = image_attention_mask.bool()  # (B, T, N)
        gate = seen.any(dim=-1)  # (B, T)
        mask = seen.repeat_interleave(S, dim=-1)  # (B, T, N*S)
        mask = (mask | ~gate[..., None])[:, None]  # gated rows attend anywhere (never NaN); output is dropped
        return CrossContext(kv=kv or self.cross_attention_kv(image_states), mask=mask, gate=gate)

    # -- text + images --------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_encoder_embeddings: torch.Tensor | None = None,
        perceiver_embeddings: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        image_states: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids (B, T); images as pixel_values (B, N, C, H, W) or precomputed embeddings (see
        `encode_images`, whose result may also be passed as `image_states`); image_attention_mask (B, T, N)
        marks the images each token attends to. Without images the call is text-only.

        Position ids default as in the reference: from the attention mask when given (padding at 1), else 0..T-1.
        """
        check_text_inputs(input_ids, attention_mask, labels)
        images = dict(
            pixel_values=pixel_values,
            image_encoder_embeddings=image_encoder_embeddings,
            perceiver_embeddings=perceiver_embeddings,
        )
        self.check_inputs(
            input_ids, image_attention_mask=image_attention_mask, image_states=image_states, **images
        )
        if image_states is None and any(t is not None for t in images.values()):
            image_states = self.encode_images(
                **images,
                image_attention_mask=image_attention_mask,
                interpolate_pos_encoding=interpolate_pos_encoding,
            )
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        embeds = self.model.embed_tokens(input_ids)
        cross = self.cross_context(image_states, image_attention_mask)
        hidden = self.model(embeds, attention_mask=attention_mask, position_ids=position_ids, state=cross)
        logits = self.lm_head(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

    def check_inputs(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        image_encoder_embeddings: torch.Tensor | None = None,
        perceiver_embeddings: torch.Tensor | None = None,
        image_states: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
    ) -> None:
        """Every input error, raised before any work: ids outside the vocabulary, several image inputs, image
        tensors of the wrong rank, an image mask that does not fit the ids or the images."""
        B, T = input_ids.shape
        total = self.config.total_vocab_size
        outside = (input_ids < 0) | (input_ids >= total)
        if bool(outside.any()):
            raise ValueError(
                f"input_ids hold ids outside the vocabulary [0, {total}): {sorted(set(input_ids[outside].tolist()))[:10]}"
            )
        given = {
            name: t
            for name, t in (
                ("pixel_values", pixel_values),
                ("image_encoder_embeddings", image_encoder_embeddings),
                ("perceiver_embeddings", perceiver_embeddings),
                ("image_states", image_states),
            )
            if t is not None
        }
        if len(given) > 1:
            raise ValueError(
                "pass only one of pixel_values, image_encoder_embeddings, perceiver_embeddings or image_states"
            )
        if given:
            name, tensor = next(iter(given.items()))
            check_image_tensor(name, tensor, 5 if name == "pixel_values" else 4)
            check_image_mask(image_attention_mask, tensor, B, T)
            if name == "perceiver_embeddings" and not self.config.use_resampler:
                raise ValueError(
                    "perceiver_embeddings were given but this model has no resampler (use_resampler=False)"
                )
        elif image_attention_mask is not None and bool(image_attention_mask.any()):
            raise ValueError("image_attention_mask marks images but no images were given")

    def start_session(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        config: GenerationConfig,
        image_attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **images: torch.Tensor | None,
    ) -> DecoderSession:
        """Validate the inputs now (before any work) and return a session that runs the prompt once. The
        image states and their keys/values are computed once, at prefill."""
        check_text_inputs(input_ids, attention_mask, None)
        self.check_inputs(input_ids, image_attention_mask=image_attention_mask, **images)
        given = {k: v for k, v in images.items() if v is not None}

        def image_inputs() -> tuple[torch.Tensor, torch.Tensor] | None:
            states = given.pop("image_states", None)
            if states is None and given:
                states = self.encode_images(
                    **given,
                    image_attention_mask=image_attention_mask,
                    interpolate_pos_encoding=interpolate_pos_encoding,
                )
            return None if states is None else (states, image_attention_mask)

        return DecoderSession(self, input_ids, attention_mask, config.max_new_tokens, image_inputs)

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        self.model.setup_cache(batch_size, max_seq_len)

    def clear_cache(self) -> None:
        self.model.clear_cache()

    # -- the runner (vlmkit.runner) -------------------------------------------------------------

    @property
    def decoder(self) -> IdeficsBase:
        return self.model

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def plan(self, inputs: dict[str, torch.Tensor]) -> PromptPlan:
        """One prompt (1, L) and its pictures: picture n affects the tokens that attend to it (its column of
        the image mask); generated tokens attend to what the last prompt token attends to."""
        ids, px, iam = inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_attention_mask")
        self.check_inputs(ids, pixel_values=px, image_attention_mask=iam)
        pixels = [] if px is None else list(px[0])
        items = [
            ImageItem(pixels=p, key=content_key(p), positions=iam[0, :, n].nonzero()[:, 0].tolist())
            for n, p in enumerate(pixels)
        ]
        decode_items = iam[0, -1].nonzero()[:, 0].tolist() if items else []
        return PromptPlan(
            ids=ids, items=items, decode_items=decode_items, extra={"image_attention_mask": iam}
        )

    def encode(self, items: list[ImageItem]) -> list[torch.Tensor]:
        """Pictures (C, H, W) each -> image states (S, C_vis) each, each picture on its own."""
        pixels = torch.stack([item.pixels for item in items])  # (K, C, H, W)
        ones = torch.ones(pixels.shape[0], 1, 1, dtype=torch.long, device=pixels.device)
        return list(self.encode_images(pixel_values=pixels[:, None], image_attention_mask=ones)[:, 0])

    def prompt_images(
        self, plan: PromptPlan, start: int, features: list[torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Image states (1, N, S, C) and the image mask of the tokens from `start` on; a picture that none of
        them attends to is zeros (masked out), and None when they attend to none."""
        have = [f for f in features if f is not None]
        if not have:
            return None
        zeros = torch.zeros_like(have[0])
        states = torch.stack([zeros if f is None else f for f in features])[None]
        return states, plan.extra["image_attention_mask"][:, start:]

    def batch_images(
        self, images: list[tuple[torch.Tensor, torch.Tensor] | None], lengths: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prompts' image states stacked (B, N_max, S, C), zeros past each row's own pictures, and their
        masks (B, T_max, N_max), zeros at padding: a padded picture is never seen, a text-only row's tokens
        are gated off (as without pictures)."""
        have = [x for x in images if x is not None]
        if not have:
            return None
        like = have[0][0]
        width = max(states.shape[1] for states, _ in have)
        states = like.new_zeros(len(images), width, *like.shape[2:])
        mask = have[0][1].new_zeros(len(images), max(lengths), width)
        for b, x in enumerate(images):
            if x is not None:
                states[b, : x[0].shape[1]] = x[0][0]
                mask[b, : x[1].shape[1], : x[1].shape[2]] = x[1][0]
        return states, mask

    def prefill(
        self,
        ids: torch.Tensor,
        *,
        images: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        at: CacheSlots,
        kv_caches: dict[nn.Module, Any] | None = None,
        last: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, CrossContext | None]:
        """Prompt tokens (B, T) into the cache -> last logits (B, V) and the rows' cross context for the
        decode steps: the images the last prompt token (`last` (B,) for ids padded on the right) attends
        to, keys/values reused."""
        states, iam = images if images is not None else (None, None)
        cross = self.cross_context(states, iam)
        final = final_positions(ids, last)
        hidden = self.model(
            self.model.embed_tokens(ids),
            attention_mask=attention_mask,
            position_ids=position_ids,
            at=at,
            kv_caches=kv_caches,
            state=cross,
            last=final,
        )
        step = None
        if cross is not None:
            step = self.cross_context(states, keep_positions(iam, final), kv=cross.kv)
        return self.lm_head(hidden[:, -1]), step

    def row_store(self, max_batch: int) -> CrossRows:
        return CrossRows(max_batch)


def scatter_rows(values: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Put `values` (n_used, ...) at the rows where `used` (n,) is True; zeros elsewhere."""
    if bool(used.all()):
        return values
    out = values.new_zeros(used.shape[0], *values.shape[1:])
    out[used.to(values.device)] = values
    return out


def check_image_tensor(name: str, t: torch.Tensor, dims: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        layout = (
            "(batch, num_images, channels, height, width)" if dims == 5 else "(batch, num_images, seq, dim)"
        )
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape {layout}; got {shape}")


def check_image_mask(image_attention_mask: torch.Tensor | None, images: torch.Tensor, B: int, T: int) -> None:
    if image_attention_mask is None:
        raise ValueError(
            "image_attention_mask (batch, seq_len, num_images) is required with images: it says which images "
            "each token attends to. Build inputs with the IDEFICS processor."
        )
    if image_attention_mask.dim() != 3:
        raise ValueError(
            f"image_attention_mask must have shape (batch, seq_len, num_images); "
            f"got {tuple(image_attention_mask.shape)}"
        )
    mb, mt, mn = image_attention_mask.shape
    if images.shape[0] != B:
        raise ValueError(
            f"images are given for batch size {images.shape[0]} but input_ids have batch size {B}"
        )
    if mb != B:
        raise ValueError(f"image_attention_mask has batch size {mb} but input_ids have batch size {B}")
    if mt != T:
        raise ValueError(f"image_attention_mask covers {mt} tokens but input_ids have {T} tokens")
    if mn != images.shape[1]:
        raise ValueError(
            f"image_attention_mask refers to {mn} images per sample but {images.shape[1]} "
            f"images per sample were given"
        )


def freeze_modules(module: nn.Module, exceptions: list[str]) -> None:
    """Freeze every parameter under `module` except those of modules of the named types."""
    keep = tuple(FREEZE_TYPES[name] for name in exceptions)
    for m in module.modules():
        m.requires_grad_(bool(keep) and isinstance(m, keep))


def apply_freeze(model: IdeficsModel, config: IdeficsConfig) -> None:
    """requires_grad as the reference sets it: the base embedding rows follow freeze_text_layers, the base
    LM head rows freeze_lm_head; the extra rows, the resampler and the cross-attention blocks always train."""
    base = model.model
    if config.freeze_text_layers:
        base.embed_tokens.weight.requires_grad_(False)
        for part in (base.layers, base.norm):
            freeze_modules(part, config.freeze_text_module_exceptions)
    if config.freeze_lm_head and not config.tie_word_embeddings:  # a tied head follows the embedding
        model.lm_head.weight.requires_grad_(False)
    if config.freeze_vision_layers:
        freeze_modules(base.vision_model, config.freeze_vision_module_exceptions)

"""The LLaMA text decoder that both model families use.

Module attribute names follow the Hugging Face checkpoints (`model.layers.{i}.self_attn.q_proj`, ...),
so a checkpoint's `language_model.*` tensors load by identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from vlmkit.configs import known_fields, require_positive, require_positive_numbers
from vlmkit.modules import (
    ROPE_TYPES,
    CacheSlots,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary,
    attention,
    causal_mask,
    signed_sin,
)

TEXT_MODEL_TYPES = ("llama",)  # what `LlamaConfig.from_hf` reads unless a family asks for more
# Decoders that are LLaMA's blocks under another name, with the reference's defaults for the fields their
# published config.json leaves out. Mistral adds sliding-window attention and has no biases.
DECODER_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": dict(
        intermediate_size=14336,
        num_key_value_heads=8,
        max_position_embeddings=4096 * 32,
        sliding_window=4096,
    ),
}
SLIDING_WINDOW_TYPES = ("mistral",)  # the decoders that read `sliding_window`


@dataclass
class LlamaConfig:
    """Text decoder configuration. Defaults equal transformers' `LlamaConfig` defaults, because the
    published checkpoints leave out every field equal to them (`from_hf` fills in a Mistral config's own)."""

    model_type: str = "llama"  # "llama" or "mistral" (the same blocks, with a sliding window)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    sliding_window: int | None = None  # Mistral: a token attends to at most this many, itself included
    extra: dict = field(default_factory=dict, repr=False)  # other keys, written back on save

    def __post_init__(self) -> None:
        if self.model_type not in DECODER_DEFAULTS:
            raise ValueError(
                f"text model type {self.model_type!r} is not supported; supported: {list(DECODER_DEFAULTS)}"
            )
        if self.sliding_window is not None:
            if self.model_type not in SLIDING_WINDOW_TYPES:
                raise ValueError(
                    f"a {self.model_type} decoder has no sliding window (got {self.sliding_window})"
                )
            require_positive(self, "sliding_window")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        require_positive(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
        require_positive_numbers(self, "rms_norm_eps", "rope_theta")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", "default")
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"unsupported rope type {rope_type!r}; supported: {list(ROPE_TYPES)}")

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, model_types: tuple[str, ...] = TEXT_MODEL_TYPES) -> LlamaConfig:
        """Read a `llama` config.json dict, old (`rope_theta`, `rope_scaling`) or new (`rope_parameters`);
        `model_types` are the decoders the caller's family takes (("llama", "mistral") for LLaVA-NeXT), and a
        Mistral config's missing fields take Mistral's defaults."""
        d = dict(d)
        model_type = d.get("model_type", "llama")
        if model_type not in model_types:
            raise ValueError(
                f"text model type {model_type!r} is not supported; supported: {list(model_types)}"
            )
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        rope = dict(rope)
        if "type" in rope and "rope_type" not in rope:  # the oldest form: {"type": "linear", "factor": 2}
            rope["rope_type"] = rope.pop("type")
        theta = rope.pop("rope_theta", d.pop("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", "default")
        kwargs = {**DECODER_DEFAULTS.get(model_type, {}), **known_fields(cls, d)}
        kwargs.pop("extra", None)
        kwargs["model_type"] = model_type
        if model_type not in SLIDING_WINDOW_TYPES:  # the reference's LLaMA ignores the field
            kwargs.pop("sliding_window", None)
        if model_type == "mistral":  # Mistral's projections have no biases, whatever the file says
            kwargs.pop("attention_bias", None)
            kwargs.pop("mlp_bias", None)
        kwargs["rope_theta"] = float(theta)
        kwargs["rope_scaling"] = None if rope_type == "default" else rope
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers 5 reads (and writes)."""
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        d = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "mistral":
            del d["attention_bias"], d["mlp_bias"]
            d["sliding_window"] = self.sliding_window
        return d


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)
        self.kv_cache: KVCache | None = None

    def project_qkv(self, x: torch.Tensor) -> list[torch.Tensor]:
        """q(x), k(x), v(x); the CPU fast path fuses them into one product (vlmkit.fastpath)."""
        return [self.q_proj(x), self.k_proj(x), self.v_proj(x)]

    def forward(self, x: torch.Tensor, ctx: DecoderContext) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = apply_rotary(q.view(B, T, self.n_heads, self.head_dim), ctx.cos, ctx.sin).transpose(1, 2)
        k = apply_rotary(k.view(B, T, self.n_kv_heads, self.head_dim), ctx.cos, ctx.sin).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        cache = self.kv_cache if ctx.caches is None else ctx.caches[self]
        if cache is not None:
            k, v = cache.update(k, v, ctx.at)  # (B, Hkv, S, D)
        if ctx.keep is None:
            y = attention(q, k, v, mask=ctx.mask, is_causal=True)
        else:  # only these positions go on: every position's keys and values are written, their queries attend
            q, T = keep_positions(q.transpose(1, 2), ctx.keep).transpose(1, 2), 1
            y = attention(q, k, v, mask=kept_mask(ctx.mask, ctx.keep, k.shape[2]))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(
            config.hidden_size, config.intermediate_size, act=config.hidden_act, bias=config.mlp_bias
        )

    def forward(self, x: torch.Tensor, ctx: DecoderContext) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), ctx)
        x = (x if ctx.keep is None else keep_positions(x, ctx.keep)) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (`language_model.model` in a checkpoint)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        key_len: int | None = None,
        kv_caches: dict[nn.Module, Any] | None = None,
        at: CacheSlots | None = None,
        state: Any = None,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (B, T, C) -> final hidden states (B, T, C), or (B, 1, C) at each row's position
        `last` (B,) when given (a prefill that needs only the last logits: the final layer then runs its
        output projection and MLP on those positions alone, after writing every position's keys and values).

        Without a KV cache, the T tokens are the whole sequence. With one (`setup_cache`), `input_pos` (T,)
        gives their slots in the cache, `attention_mask` (B, S') covers every key written so far and
        `key_len` (default: the whole cache) how many slots attention reads; `at` gives all of that at once
        (and a row-wise cache's per-row slots). `position_ids` (B, T) default to the token's slot, as in the
        reference. `kv_caches` ({attention module: cache}) replaces the caches that `setup_cache` put on the
        layers for this call: a server's own caches, untouched by a `generate` running beside it.
        `state` is what a family's composed layers read (IDEFICS: the cross-attention context).
        """
        if at is None and input_pos is not None:
            at = CacheSlots(input_pos, key_len)
        ctx = decoder_context(
            self.layers,
            self.rotary_emb,
            inputs_embeds,
            attention_mask,
            position_ids,
            at,
            kv_caches,
            sliding_window=self.config.sliding_window,
        )
        ctx.state = state
        x = inputs_embeds
        layers = self.decoder_layers()
        for i, layer in enumerate(layers):
            if last is not None and i == len(layers) - 1 and isinstance(layer, LlamaDecoderLayer):
                ctx.keep = last.to(x.device)
            x = run_layer(layer, x, ctx)
        if last is not None and ctx.keep is None:  # a final layer of another kind ran on every position
            x = keep_positions(x, last.to(x.device))
        return self.norm(x)

    def decoder_layers(self) -> list[Any]:
        """The layers the loop runs, in order; each is called as layer(x, ctx). A family that composes more
        blocks into the decoder (IDEFICS: gated cross-attention before some layers) returns them here."""
        return list(self.layers)

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Preallocate a KV cache of `max_seq_len` slots in every layer."""
        weight = self.embed_tokens.weight
        setup_kv_cache(
            self.layers, batch_size, max_seq_len, dtype=dtype or weight.dtype, device=device or weight.device
        )

    def clear_cache(self) -> None:
        setup_kv_cache(self.layers, 0, 0)


def setup_kv_cache(
    layers: nn.ModuleList,
    batch_size: int,
    max_seq_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> None:
    """Give every decoder layer a preallocated KV cache, or remove the caches when max_seq_len is 0."""
    for layer in layers:
        attn = layer.self_attn
        attn.kv_cache = (
            KVCache(batch_size, max_seq_len, attn.n_kv_heads, attn.head_dim, dtype=dtype, device=device)
            if max_seq_len
            else None
        )


@dataclass
class DecoderContext:
    """What every decoder layer of one call shares: rotary tables, the self-attention mask, cache slots."""

    cos: torch.Tensor  # (B, T, D)
    sin: torch.Tensor  # (B, T, D), with its first half negated (`signed_sin`)
    mask: torch.Tensor | None  # (B or 1, 1, T, S) bool; None: plain causal attention
    at: CacheSlots  # where the T tokens go in the cache
    caches: dict[nn.Module, Any] | None = None  # per attention module, in place of its kv_cache
    state: Any = None  # read by a family's composed layers
    keep: torch.Tensor | None = None  # (B,) the one position per row a final layer computes past attention


def keep_positions(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) at position keep[b] of each row b -> (B, 1, ...)."""
    return x[torch.arange(x.shape[0], device=x.device), keep][:, None]


def kept_mask(mask: torch.Tensor | None, keep: torch.Tensor, key_len: int) -> torch.Tensor:
    """The keys that query keep[b] of each row b sees (B, 1, 1, S): its row of `mask` (1 or B, 1, T, S), or
    with no mask (causal over the call's own T tokens) every key up to it."""
    B = keep.shape[0]
    if mask is None:
        return (torch.arange(key_len, device=keep.device) <= keep[:, None])[:, None, None, :]
    return mask.expand(B, -1, -1, -1)[torch.arange(B, device=keep.device), :, keep][:, :, None, :]


def decoder_context(
    layers: nn.ModuleList,
    rotary: RotaryEmbedding,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    at: CacheSlots | None,
    caches: dict[nn.Module, Any] | None = None,
    *,
    sliding_window: int | None = None,
) -> DecoderContext:
    """Cache slots, rotary tables and the mask for one decoder call.

    Without a KV cache the T tokens are the whole sequence, and the mask is None when nothing is padded
    (SDPA's causal fast path). With a cache, `at` is required and the mask spans `at.key_len` slots.
    `sliding_window` hides keys that many slots or more behind each query, counted in cache slots as the
    reference counts them (each row's own slot in a server's decode step, `at.slots`).
    """
    B, T, _ = inputs_embeds.shape
    cache = None
    if len(layers):
        attn = layers[0].self_attn
        cache = attn.kv_cache if caches is None else caches[attn]
    if at is None:
        if cache is not None:
            raise ValueError("input_pos is required when a KV cache is set up")
        at = CacheSlots(torch.arange(T, device=inputs_embeds.device))
    if position_ids is None:
        position_ids = at.input_pos[None].expand(B, T)
    window = sliding_window
    if cache is not None:
        at = replace(at, key_len=at.key_len or cache.max_seq_len)
        # rows of a server's step sit at their own slots: the window ends at each row's, not at the last
        query = at.slots[:, None] if window is not None and at.slots is not None else at.input_pos
        if at.starts is not None:  # prompts after cached blocks of different lengths: each row's own slots
            query = at.starts[:, None] + at.input_pos[None, :]
        mask = causal_mask(attention_mask, query, at.key_len, window=window)
    elif attention_mask is not None and not bool(attention_mask.all()):
        mask = causal_mask(attention_mask, at.input_pos, T, window=window)
    elif window is not None and T > window:
        mask = causal_mask(None, at.input_pos, T, window=window)
    else:
        mask = None
    cos, sin = rotary(position_ids, inputs_embeds.dtype)
    return DecoderContext(cos=cos, sin=signed_sin(sin), mask=mask, at=at, caches=caches)


class LlamaForCausalLM(nn.Module):
    """The decoder plus its LM head (`language_model` in a LLaVA-family checkpoint)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def check_text_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None
) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor of shape (batch, seq_len); got {shape}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty (seq_len 0)")
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and tuple(t.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{name} shape {tuple(t.shape)} does not match input_ids shape {tuple(input_ids.shape)}"
            )


def run_layer(layer: nn.Module, x: torch.Tensor, ctx: DecoderContext) -> torch.Tensor:
    """A decoder layer, recomputed in the backward pass instead of storing its activations when the
    layer is marked `gradient_checkpointing` and gradients are being recorded."""
    if getattr(layer, "gradient_checkpointing", False) and torch.is_grad_enabled() and layer.training:
        return torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
    return layer(x, ctx)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy in fp32: logits (B, T, V) at t predict labels at t+1; -100 is ignored.
    reduction "sum" lets a trainer divide by the token count of a whole (multi-process) batch."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match input shape {tuple(logits.shape[:2])}"
        )
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction=reduction)

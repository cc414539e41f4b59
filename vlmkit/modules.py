"""Shared primitives: norms, rotary embeddings, MLPs, attention and a preallocated KV cache.

Every model family builds on these; nothing here knows about a particular checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# Activation names as they appear in Hugging Face configs.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled by a learned weight in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # PyTorch's kernel: the same products in fp32 (equal bit for bit), in one call instead of six
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class SwiGLU(nn.Module):
    """The LLaMA MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, *, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.act = activation(act)

    def project_gate_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """gate(x), up(x); the CPU fast path fuses them into one product (vlmkit.fastpath)."""
        return [self.gate_proj(x), self.up_proj(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project_gate_up(x)
        return self.down_proj(self.act(gate) * up)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim // 2,) in fp32 and the cos/sin scale for a rope configuration."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: {list(ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) for given positions. Holds no state, so it builds fine on the meta device."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        rope_inv_freq(head_dim, theta, scaling)  # validate the configuration at build time
        self._cache: tuple[torch.device, torch.Tensor, float] | None = None

    def inv_freq(self, device: torch.device) -> tuple[torch.Tensor, float]:
        if self._cache is None or self._cache[0] != device:
            inv, scale = rope_inv_freq(self.head_dim, self.theta, self.scaling)
            self._cache = (device, inv.to(device), scale)
        return self._cache[1], self._cache[2]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, head_dim) in `dtype`; the angles are computed in fp32."""
        inv_freq, scale = self.inv_freq(position_ids.device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
            cos, sin = emb.cos() * scale, emb.sin() * scale
        return cos.to(dtype), sin.to(dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sine table (..., D) with its first half negated: `apply_rotary`'s form of it."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, T, H, D) (heads after positions) with cos and `signed_sin(sin)`, (B, T, D)
    each: equal bit for bit to the reference's x * cos + rotate_half(x) * sin, where rotate_half maps the
    halves (x1, x2) to (-x2, x1) (rolling x by half its width and negating the sine instead swaps the same
    signs), in four operations instead of seven."""
    return x * cos[:, :, None] + x.roll(x.shape[-1] // 2, -1) * sin_signed[:, :, None]


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


@dataclass
class CacheSlots:
    """Where one forward writes its keys/values and how much of the cache attention reads, passed per call.

    input_pos (T,): the slots of the T tokens, the same for every row; key_len: the slots attention reads
    (None: all). A cache that serves rows of different lengths (the server's) also reads `row` (B prompts
    written into the B rows from that one on), `rows` (B,) (a batch of prompts, each written into its own
    row, in any order), `starts` (B,) with either (prompt b's tokens go at slots starts[b] + input_pos, after
    the cached blocks already in its row) or `slots` (n,) (each row's own slot for a one-token step)."""

    input_pos: torch.Tensor
    key_len: int | None = None
    row: int | None = None
    slots: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    starts: torch.Tensor | None = None


class KVCache(nn.Module):
    """Preallocated key/value storage for one attention layer, written in place at `input_pos`."""

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, at: CacheSlots) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at slots at.input_pos (T,); return the first `at.key_len` slots (all
        slots when None)."""
        self.k.index_copy_(2, at.input_pos, k)
        self.v.index_copy_(2, at.input_pos, v)
        if at.key_len is None:
            return self.k, self.v
        return self.k[:, :, : at.key_len], self.v[:, :, : at.key_len]

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep (and repeat) batch rows `index`: beam reordering, or expansion to several sequences."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads. q (B, H, T, D), k/v (B, Hkv, S, D).

    One query per row (a decode step) on the CPU, without gradients, takes two plain matrix products: the
    fused CPU kernel is tuned for blocks of queries and spends about twice as long on a single one.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if T == 1 and q.device.type == "cpu" and not torch.is_grad_enabled():
        qg = q.view(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D): the query heads that share each key/value head
        scores = torch.matmul(qg, k.transpose(-1, -2)) * (
            scale if scale is not None else D**-0.5
        )  # (B, Hkv, G, S)
        if mask is not None:
            scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, -1), float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # a row with no visible key gives zeros
        return torch.matmul(probs, v).view(B, H, 1, D)
    gqa = H != Hkv
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale, enable_gqa=gqa
    )


def causal_mask(
    attention_mask: torch.Tensor | None,
    query_pos: torch.Tensor,
    key_len: int,
    *,
    window: int | None = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, T, S): key j visible to query t if j <= query_pos[t] and key j is not padding.

    query_pos (T,) holds the queries' slots, the same in every row, or (B, T) each row's own (a server's
    decode step, rows at different lengths). attention_mask (B, S') is 1 for real tokens over all keys seen
    so far (S' <= S; keys past S' are not visible). window: sliding-window attention, where a query also
    sees no key `window` or more slots before its own. A padding query that sees no key at all gets a zero
    attention output from SDPA (torch >= 2.5), as in the reference.
    """
    keys = torch.arange(key_len, device=query_pos.device)
    queries = query_pos[..., None]  # (T, 1) or (B, T, 1)
    visible = keys <= queries
    if window is not None:
        visible = visible & (keys > queries - window)
    mask = visible[None, None] if query_pos.dim() == 1 else visible[:, None]  # (1 or B, 1, T, S)
    if attention_mask is not None:
        pad = torch.zeros(attention_mask.shape[0], key_len, dtype=torch.bool, device=query_pos.device)
        n = min(attention_mask.shape[1], key_len)
        pad[:, :n] = attention_mask[:, :n].bool()
        mask = mask & pad[:, None, None, :]
    return mask


@dataclass
class CausalLMOutput:
    """What a model forward returns: logits (B, T, V) and, given labels, the mean next-token loss."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None

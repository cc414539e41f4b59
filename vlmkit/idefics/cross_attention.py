"""IDEFICS's gated cross-attention: text queries over image keys/values, the tanh-gated block placed before
some decoder layers, the fusion of the two for the shared decoder loop, and the per-row cross context that
generation and the server keep while decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmkit.idefics.config import IdeficsConfig
from vlmkit.llama import DecoderContext, run_layer
from vlmkit.modules import RMSNorm, SwiGLU, attention


class CrossAttention(nn.Module):
    """Text queries over image keys/values; optional RMSNorm of q and k over the head dimension."""

    def __init__(self, config: IdeficsConfig) -> None:
        super().__init__()
        dim, kv_dim = config.hidden_size, config.vision_config.hidden_size
        self.n_heads = config.num_attention_heads
        self.head_dim = dim // self.n_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(kv_dim, dim, bias=False)
        self.v_proj = nn.Linear(kv_dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        if config.qk_layer_norms:
            self.q_layer_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_layer_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def image_kv(self, image_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_states (B, S, C_vis) -> keys, values (B, H, S, D); computed once per request."""
        B, S, _ = image_states.shape
        k = self.k_proj(image_states).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(image_states).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "k_layer_norm"):
            k = self.k_layer_norm(k)
        return k, v

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if hasattr(self, "q_layer_norm"):
            q = self.q_layer_norm(q)
        y = attention(q, kv[0], kv[1], mask=mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(alpha_cross_attn) * cross_attn(norm(x)), then x + tanh(alpha_dense) * mlp(norm(x)).

    Tokens that come before every image (gate 0) receive no cross-attention output at all; the gated MLP
    applies to every token, as in the reference.
    """

    def __init__(self, config: IdeficsConfig, index: int = 0) -> None:
        super().__init__()
        dim = config.hidden_size
        self.input_layernorm = RMSNorm(dim, config.rms_norm_eps)
        self.cross_attn = CrossAttention(config)
        self.post_attention_layernorm = RMSNorm(dim, config.rms_norm_eps)
        self.mlp = SwiGLU(dim, config.intermediate_size, act=config.hidden_act)
        shape = (1, 1, dim) if config.alpha_type == "vector" else (1,)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(shape))
        self.alpha_dense = nn.Parameter(torch.zeros(shape))
        self.index = index  # which keys/values of the cross context are this block's

    def forward(
        self,
        x: torch.Tensor,
        *,
        kv: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        gate: torch.Tensor | None,
    ) -> torch.Tensor:
        if kv is not None:
            y = self.cross_attn(self.input_layernorm(x), kv, mask)
            y = y.masked_fill(~gate[..., None], 0.0)
            x = x + torch.tanh(self.alpha_cross_attn) * y
        return x + torch.tanh(self.alpha_dense) * self.mlp(self.post_attention_layernorm(x))


@dataclass
class CrossContext:
    """What the gated blocks attend to: per-block keys/values, the mask (B, 1, T, N*S) and gate (B, T).
    It is IDEFICS's per-row state while decoding (vlmkit.runner.RowState)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    gate: torch.Tensor

    def select(self, index: torch.Tensor) -> CrossContext:
        return CrossContext(
            kv=[(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv],
            mask=self.mask.index_select(0, index),
            gate=self.gate.index_select(0, index),
        )


class FusionLayer:
    """A decoder layer with the gated cross-attention block that runs before it, called as one layer by the
    shared decoder loop (the block reads the cross context from `ctx.state`; None: text only). A plain
    callable, not a module: both parts stay registered under their checkpoint names."""

    def __init__(self, block: GatedCrossAttentionBlock, layer: nn.Module) -> None:
        self.block, self.layer = block, layer

    def __call__(self, x: torch.Tensor, ctx: DecoderContext) -> torch.Tensor:
        cross = ctx.state
        if cross is None:
            x = self.block(x, kv=None, mask=None, gate=None)
        else:
            x = self.block(x, kv=cross.kv[self.block.index], mask=cross.mask, gate=cross.gate)
        return run_layer(self.layer, x, ctx)


class CrossRows:
    """The engine's per-row cross contexts over `max_batch` rows, padded to the widest row's image keys:
    a text-only row attends anywhere and its gate drops the output (vlmkit.runner.RowStore)."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.cross: CrossContext | None = None

    def join(self, first: int, n: int, state: CrossContext | None) -> None:
        if state is None and self.cross is None:
            return
        if state is not None:
            width = state.kv[0][0].shape[2]
            if self.cross is None or self.cross.mask.shape[-1] < width:
                self._grow(state.kv, width)
        c = self.cross
        for r in range(first, first + n):
            c.mask[r] = True
            c.gate[r] = False
            if state is None:
                continue
            for (k_all, v_all), (k, v) in zip(c.kv, state.kv, strict=True):
                k_all[r, :, : k.shape[2]] = k[0]
                v_all[r, :, : v.shape[2]] = v[0]
            c.mask[r] = False
            c.mask[r, ..., : state.mask.shape[-1]] = state.mask[0]
            c.gate[r] = state.gate[0]

    def _grow(self, kv: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> None:
        old, B = self.cross, self.max_batch
        new_kv = []
        for i, (k, v) in enumerate(kv):
            K = k.new_zeros(B, k.shape[1], width, k.shape[3])
            V = v.new_zeros(B, v.shape[1], width, v.shape[3])
            if old is not None:
                w = old.kv[i][0].shape[2]
                K[:, :, :w], V[:, :, :w] = old.kv[i][0], old.kv[i][1]
            new_kv.append((K, V))
        mask = torch.ones(B, 1, 1, width, dtype=torch.bool, device=kv[0][0].device)
        gate = torch.zeros(B, 1, dtype=torch.bool, device=kv[0][0].device)
        if old is not None:
            w = old.mask.shape[-1]
            mask[..., :w] = old.mask
            mask[..., w:] = ~old.gate[:, None, None, :]  # rows with images never see the new padding
            gate[:] = old.gate
        self.cross = CrossContext(kv=new_kv, mask=mask, gate=gate)

    def move(self, old: int, new: int) -> None:
        c = self.cross
        if c is None:
            return
        for k, v in c.kv:
            k[new], v[new] = k[old], v[old]
        c.mask[new], c.gate[new] = c.mask[old], c.gate[old]

    def view(self, n: int) -> CrossContext | None:
        c = self.cross
        if c is None:
            return None
        return CrossContext(kv=[(k[:n], v[:n]) for k, v in c.kv], mask=c.mask[:n], gate=c.gate[:n])

"""The perceiver resampler: a fixed set of learned latents that attend to [image states; latents] and
summarise each image in `resampler_n_latents` vectors.

Attribute names follow the checkpoint (`perceiver_resampler.blocks.{i}.0.q_proj`, `...blocks.{i}.1.fc`).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.idefics.config import PerceiverConfig
from vlmkit.modules import attention


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, head_dim: int, *, qk_layer_norms: bool) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.context_layer_norm = nn.LayerNorm(dim)
        self.latents_layer_norm = nn.LayerNorm(dim)
        if qk_layer_norms:
            self.q_layer_norm = nn.LayerNorm(head_dim)
            self.k_layer_norm = nn.LayerNorm(head_dim)
        self.qk_layer_norms = qk_layer_norms
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.output_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """context (B, S, C), latents (B, L, C) -> update for the latents (B, L, C)."""
        context = self.context_layer_norm(context)
        latents = self.latents_layer_norm(latents)
        B, L, _ = latents.shape
        both = torch.cat([context, latents], dim=1)  # (B, S + L, C)
        q = self.q_proj(latents).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(both).view(B, -1, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S + L, D)
        v = self.v_proj(both).view(B, -1, self.n_heads, self.head_dim).transpose(1, 2)
        if self.qk_layer_norms:
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        y = attention(q, k, v, mask=None)  # (B, H, L, D)
        return self.output_proj(y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


class PerceiverMLP(nn.Module):
    """LayerNorm -> Linear -> ReLU -> Linear, no biases."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden_dim, bias=False)
        self.act = nn.ReLU()
        self.c_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.fc(self.ln(x))))


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, config: PerceiverConfig) -> None:
        super().__init__()
        c = config
        self.latents = nn.Parameter(torch.zeros(c.resampler_n_latents, dim))
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(
                        dim,
                        c.resampler_n_heads,
                        c.resampler_head_dim,
                        qk_layer_norms=c.qk_layer_norms_perceiver,
                    ),
                    PerceiverMLP(dim, 4 * dim),
                ]
            )
            for _ in range(c.resampler_depth)
        )
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """Image states (N, S, C) -> resampled latents (N, n_latents, C)."""
        x = self.latents.expand(context.shape[0], -1, -1)
        if context.shape[0] == 0:  # no image in use (a text-only prompt's zero-padded image)
            return x.to(context.dtype)
        for attn, mlp in self.blocks:
            x = x + attn(context, x)
            x = x + mlp(x)
        return self.layer_norm(x)

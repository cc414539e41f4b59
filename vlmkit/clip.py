"""The CLIP vision transformer both families use, with hidden-state taps at any layer.

Attribute names follow the checkpoints (`vision_model.embeddings.patch_embedding`, `pre_layrnorm` -- sic --,
`encoder.layers.{i}.self_attn.q_proj`, `post_layernorm`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.configs import known_fields, require_positive, require_positive_numbers
from vlmkit.modules import activation, attention


@dataclass
class CLIPVisionConfig:
    """Defaults equal transformers' `CLIPVisionConfig` defaults (published configs leave them out)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        require_positive_numbers(self, "layer_norm_eps")
        require_positive(
            self,
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "image_size",
            "patch_size",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        activation(self.hidden_act)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict[str, Any], defaults: dict[str, Any] | None = None) -> CLIPVisionConfig:
        """Read a `clip_vision_model` dict (or a full `clip` dict with a nested `vision_config`)."""
        if "vision_config" in d and d.get("model_type") == "clip":
            d = d["vision_config"]
        model_type = d.get("model_type", "clip_vision_model")
        if model_type not in ("clip_vision_model", "clip"):
            raise ValueError(
                f"vision model type {model_type!r} is not supported; supported: ['clip_vision_model']"
            )
        for key in ("image_size", "patch_size"):
            if isinstance(d.get(key), (list, tuple)):
                if len(set(d[key])) != 1:
                    raise ValueError(f"non-square vision {key} {d[key]} is not supported")
                d = {**d, key: d[key][0]}
        return cls(**{**(defaults or {}), **known_fields(cls, d)})

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "clip_vision_model", **{k: getattr(self, k) for k in self.__dataclass_fields__}}


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=False,
        )
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, *, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # (B, C, h, w)
        h, w = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls = self.class_embedding.expand(B, 1, -1).to(patches.dtype)
        x = torch.cat([cls, patches], dim=1)  # (B, 1 + h*w, C)
        if interpolate_pos_encoding:
            return x + self.interpolated_positions(H, W, h * w)[None]
        return x + self.position_embedding.weight[None]

    def interpolated_positions(self, height: int, width: int, num_patches: int) -> torch.Tensor:
        """Position embeddings (1 + h*w, C) for an image of another size: the square grid of learned patch
        positions resized bicubically (in fp32 for half-precision weights), the class position kept."""
        table = self.position_embedding.weight  # (1 + n*n, C)
        grid = int(math.sqrt(table.shape[0] - 1))
        if num_patches == table.shape[0] - 1 and height == width:
            return table
        p = self.config.patch_size
        # the reference scales by (patches + 0.1) / grid so that flooring gives the intended size
        h, w = height // p + 0.1, width // p + 0.1
        dim = table.shape[-1]
        pos = table[1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)  # (1, C, n, n)
        pos = F.interpolate(
            pos.float(), scale_factor=(h / grid, w / grid), mode="bicubic", align_corners=False
        )
        if tuple(pos.shape[-2:]) != (int(h), int(w)):
            raise ValueError(
                f"cannot interpolate {grid}x{grid} position embeddings to a {int(h)}x{int(w)} patch grid "
                f"(got {tuple(pos.shape[-2:])})"
            )
        pos = pos.to(table.dtype).permute(0, 2, 3, 1).reshape(-1, dim)  # (h*w, C)
        return torch.cat([table[:1], pos], dim=0)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.head_dim = d // self.n_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )  # (B, H, T, D)
        y = attention(q, k, v, mask=None)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def resolve_layer(self, index: int) -> int:
        """Map a hidden-state index to 0..L: 0 is the embedding output (after the pre-layernorm), i is the
        output of layer i, negative indices count from the end (-1 is the last layer's output)."""
        n = len(self.encoder.layers) + 1
        if not -n <= index < n:
            raise ValueError(
                f"vision feature layer {index} is out of range for a tower of "
                f"{n - 1} layers (valid: {-n}..{n - 1})"
            )
        return index % n

    def forward(
        self,
        pixel_values: torch.Tensor,
        *,
        layers: Sequence[int] = (-1,),
        interpolate_pos_encoding: bool = False,
    ) -> list[torch.Tensor]:
        """pixel_values (B, C, H, W) -> the hidden states (B, 1 + patches, C) at `layers`, in that order.

        Layers after the deepest requested one are not run. With `interpolate_pos_encoding`, images of
        another size than the config's are accepted (positions resized bicubically).
        """
        check_pixels(pixel_values, self.config, interpolate_pos_encoding)
        wanted = [self.resolve_layer(i) for i in layers]
        x = self.pre_layrnorm(
            self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        )
        keep = set(wanted)
        states = {0: x} if 0 in keep else {}
        for i, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            x = layer(x)
            if i in keep:
                states[i] = x
        return [states[i] for i in wanted]

    def pooled(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """The class token of the last layer after the post-layernorm (CLIP's pooled output)."""
        return self.post_layernorm(last_hidden_state[:, 0])


class CLIPVisionModel(nn.Module):
    """Wrapper matching the checkpoint prefix `vision_tower.vision_model.*`."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)

    def forward(
        self,
        pixel_values: torch.Tensor,
        *,
        layers: Sequence[int] = (-1,),
        interpolate_pos_encoding: bool = False,
    ) -> list[torch.Tensor]:
        return self.vision_model(
            pixel_values, layers=layers, interpolate_pos_encoding=interpolate_pos_encoding
        )


def check_pixels(
    pixel_values: torch.Tensor, config: CLIPVisionConfig, interpolate_pos_encoding: bool
) -> None:
    c = config
    expected = (c.num_channels, c.image_size, c.image_size)
    if pixel_values.dim() != 4 or pixel_values.shape[1] != c.num_channels:
        raise ValueError(
            f"pixel_values must have shape (batch, {', '.join(map(str, expected))}); got {tuple(pixel_values.shape)}"
        )
    H, W = pixel_values.shape[-2:]
    if interpolate_pos_encoding:
        if H < c.patch_size or W < c.patch_size:
            raise ValueError(f"images of {H}x{W} pixels are smaller than one {c.patch_size}-pixel patch")
    elif (H, W) != (c.image_size, c.image_size):
        raise ValueError(
            f"pixel_values must have shape (batch, {', '.join(map(str, expected))}); got {tuple(pixel_values.shape)}. "
            f"Preprocess images with the model's processor, or pass interpolate_pos_encoding=True where the "
            f"model supports it."
        )

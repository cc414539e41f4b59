"""IDEFICS (Flamingo-style): vision encoder, perceiver resampler, gated cross-attention, decoupled vocabulary."""

from vlmkit.idefics.config import IdeficsConfig, PerceiverConfig
from vlmkit.idefics.model import (
    KEY_IGNORE,
    KEY_MAP,
    DecoupledEmbedding,
    DecoupledLinear,
    GatedCrossAttentionBlock,
    IdeficsModel,
)
from vlmkit.idefics.perceiver import PerceiverResampler

__all__ = [
    "KEY_IGNORE",
    "KEY_MAP",
    "DecoupledEmbedding",
    "DecoupledLinear",
    "GatedCrossAttentionBlock",
    "IdeficsConfig",
    "IdeficsModel",
    "PerceiverConfig",
    "PerceiverResampler",
]

"""ViP-LLaVA and LLaVA-1.5."""

from vlmkit.vipllava.config import VipLlavaConfig
from vlmkit.vipllava.model import KEY_IGNORE, KEY_MAP, MultiLayerProjector, VipLlavaModel

__all__ = ["KEY_IGNORE", "KEY_MAP", "MultiLayerProjector", "VipLlavaConfig", "VipLlavaModel"]

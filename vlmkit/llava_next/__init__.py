"""LLaVA-NeXT (LLaVA-1.6): anyres tiling of each picture, with a Vicuna (LLaMA) or Mistral decoder."""

from vlmkit.llava_next.config import LlavaNextConfig
from vlmkit.llava_next.model import KEY_IGNORE, KEY_MAP, LlavaNextModel

__all__ = ["KEY_IGNORE", "KEY_MAP", "LlavaNextConfig", "LlavaNextModel"]

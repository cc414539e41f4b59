"""Configuration of LLaVA-NeXT (`model_type: llava_next`): a CLIP tower, anyres tiling and a Vicuna (LLaMA) or
Mistral decoder.

Both published layouts read: llava-hf/llava-v1.6-vicuna-7b-hf (a `llama` text config holding only the fields
that differ from LLaMA's defaults) and llava-hf/llava-v1.6-mistral-7b-hf (a `mistral` text config, whose
missing fields take Mistral's defaults, `sliding_window: null`), as well as what transformers 5 writes
(`rope_parameters`, every field spelled out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmkit.clip import CLIPVisionConfig
from vlmkit.configs import checked_feature_layers, section
from vlmkit.llama import LlamaConfig
from vlmkit.llava_next.anyres import DEFAULT_PINPOINTS, parse_pinpoints
from vlmkit.vipllava.config import DEFAULT_VISION

TEXT_MODEL_TYPES = ("llama", "mistral")


@dataclass
class LlavaNextConfig:
    model_type: str = "llava_next"
    text_config: LlamaConfig = field(default_factory=LlamaConfig)
    vision_config: CLIPVisionConfig = field(default_factory=lambda: CLIPVisionConfig(**DEFAULT_VISION))
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    multimodal_projector_bias: bool = True
    image_grid_pinpoints: list[list[int]] = field(
        default_factory=lambda: [list(p) for p in DEFAULT_PINPOINTS]
    )
    image_seq_length: int = 576
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type != "llava_next":
            raise ValueError(f"model_type {self.model_type!r} is not 'llava_next'")
        if self.vision_feature_select_strategy != "default":
            # "full" keeps the class token, whose features do not tile into the grid (the reference fails
            # on it too, in the reshape of the tiles' features)
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' for LLaVA-NeXT (the class token does not "
                f"tile into the picture's grid), got {self.vision_feature_select_strategy!r}"
            )
        self.vision_feature_layer = checked_feature_layers(
            self.vision_feature_layer, self.vision_config.num_hidden_layers
        )
        pinpoints = parse_pinpoints(self.image_grid_pinpoints, tile=self.vision_config.image_size)
        self.image_grid_pinpoints = [list(p) for p in pinpoints]
        self.text_config.tie_word_embeddings = self.tie_word_embeddings

    @property
    def feature_layers(self) -> list[int]:
        layers = self.vision_feature_layer
        return [layers] if isinstance(layers, int) else list(layers)

    @property
    def tile_size(self) -> int:
        """The side of one tile in pixels: the vision tower's input."""
        return self.vision_config.image_size

    @property
    def patches_per_side(self) -> int:
        """Feature cells along one side of a tile."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlavaNextConfig:
        """Read config.json as transformers 5 writes it or as the published hub checkpoints hold it."""
        if d.get("model_type", "llava_next") != "llava_next":
            raise ValueError(f"model_type {d.get('model_type')!r} is not 'llava_next'")
        text = section(d, "text_config") or {}
        if "vocab_size" not in text and "vocab_size" in d:  # the first configs kept it at the top level too
            text["vocab_size"] = d["vocab_size"]
        vision = section(d, "vision_config")
        kwargs: dict[str, Any] = dict(
            text_config=LlamaConfig.from_hf(text, model_types=TEXT_MODEL_TYPES),
            vision_config=(
                CLIPVisionConfig.from_hf(vision) if vision is not None else CLIPVisionConfig(**DEFAULT_VISION)
            ),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
        for name in (
            "image_token_index",
            "projector_hidden_act",
            "vision_feature_layer",
            "vision_feature_select_strategy",
            "multimodal_projector_bias",
            "image_grid_pinpoints",
            "image_seq_length",
            "pad_token_id",
        ):
            if d.get(name) is not None:
                kwargs[name] = d[name]
        if "image_token_id" in d and "image_token_index" not in d:
            kwargs["image_token_index"] = d["image_token_id"]
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """config.json in the form transformers 5 writes."""
        return {
            "architectures": ["LlavaNextForConditionalGeneration"],
            "model_type": self.model_type,
            "text_config": self.text_config.to_hf(),
            "vision_config": self.vision_config.to_hf(),
            "image_token_index": self.image_token_index,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "image_grid_pinpoints": self.image_grid_pinpoints,
            "image_seq_length": self.image_seq_length,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
        }

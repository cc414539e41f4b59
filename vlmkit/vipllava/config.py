"""Configuration of ViP-LLaVA (`model_type: vipllava`) and LLaVA-1.5 (`model_type: llava`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmkit.clip import CLIPVisionConfig
from vlmkit.configs import checked_feature_layers, section
from vlmkit.llama import LlamaConfig

MODEL_TYPES = ("vipllava", "llava")

# What the reference assumes when a config has no `vision_config` at all: CLIP ViT-L/14 at 336 px.
DEFAULT_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    patch_size=14,
    image_size=336,
    num_hidden_layers=24,
    num_attention_heads=16,
    projection_dim=768,
)
DEFAULT_FEATURE_LAYERS = {"vipllava": [-2, -5, -8, -11, 6], "llava": -2}
ARCHITECTURES = {"vipllava": "VipLlavaForConditionalGeneration", "llava": "LlavaForConditionalGeneration"}


@dataclass
class VipLlavaConfig:
    model_type: str = "vipllava"
    text_config: LlamaConfig = field(default_factory=LlamaConfig)
    vision_config: CLIPVisionConfig = field(default_factory=lambda: CLIPVisionConfig(**DEFAULT_VISION))
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    projector_layernorm_eps: float = 1e-5  # ViP-LLaVA only: LayerNorm before the projector
    vision_feature_layer: int | list[int] = field(default_factory=lambda: [-2, -5, -8, -11, 6])
    vision_feature_select_strategy: str = "default"  # LLaVA only; ViP-LLaVA always drops the class token
    multimodal_projector_bias: bool = True
    image_seq_length: int = 576
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not a LLaVA-family type {list(MODEL_TYPES)}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', "
                f"got {self.vision_feature_select_strategy!r}"
            )
        self.vision_feature_layer = checked_feature_layers(
            self.vision_feature_layer, self.vision_config.num_hidden_layers
        )
        self.text_config.tie_word_embeddings = self.tie_word_embeddings

    @property
    def feature_layers(self) -> list[int]:
        layers = self.vision_feature_layer
        return [layers] if isinstance(layers, int) else list(layers)

    @property
    def has_projector_norm(self) -> bool:
        return self.model_type == "vipllava"

    @property
    def drop_class_token(self) -> bool:
        return self.model_type == "vipllava" or self.vision_feature_select_strategy == "default"

    @property
    def image_tokens_per_image(self) -> int:
        return self.vision_config.num_patches + (0 if self.drop_class_token else 1)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VipLlavaConfig:
        """Read config.json as transformers 5 writes it or as the published hub checkpoints hold it."""
        model_type = d.get("model_type", "vipllava")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a LLaVA-family type {list(MODEL_TYPES)}")
        text = section(d, "text_config") or {}
        if "vocab_size" not in text and "vocab_size" in d:  # the oldest configs kept it at the top level
            text["vocab_size"] = d["vocab_size"]
        vision = section(d, "vision_config")
        vision_config = (
            CLIPVisionConfig.from_hf(vision) if vision is not None else CLIPVisionConfig(**DEFAULT_VISION)
        )
        layers = d.get(
            "vision_feature_layer", d.get("vision_feature_layers", DEFAULT_FEATURE_LAYERS[model_type])
        )
        text_config = LlamaConfig.from_hf(text)
        tie = bool(d.get("tie_word_embeddings", False))
        if model_type == "llava":  # the reference forwards the text config's flag for llava
            tie = tie or text_config.tie_word_embeddings
        kwargs = dict(
            model_type=model_type,
            text_config=text_config,
            vision_config=vision_config,
            vision_feature_layer=layers,
            tie_word_embeddings=tie,
        )
        for name in (
            "image_token_index",
            "projector_hidden_act",
            "projector_layernorm_eps",
            "vision_feature_select_strategy",
            "multimodal_projector_bias",
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
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "text_config": self.text_config.to_hf(),
            "vision_config": self.vision_config.to_hf(),
            "image_token_index": self.image_token_index,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_layer": self.vision_feature_layer,
            "image_seq_length": self.image_seq_length,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "vipllava":
            d["projector_layernorm_eps"] = self.projector_layernorm_eps
        else:
            d["vision_feature_select_strategy"] = self.vision_feature_select_strategy
            d["multimodal_projector_bias"] = self.multimodal_projector_bias
        return d

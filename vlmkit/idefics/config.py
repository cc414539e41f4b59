"""IDEFICS configuration (`model_type: idefics`), read from every published form of config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmkit.clip import CLIPVisionConfig
from vlmkit.configs import known_fields, require_positive, section
from vlmkit.llama import LlamaConfig

# transformers' IdeficsVisionConfig defaults (it names the width `embed_dim`).
VISION_DEFAULTS = dict(
    hidden_size=768,
    image_size=224,
    intermediate_size=5120,
    patch_size=14,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_channels=3,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
VISION_KEYS = ("embed_dim", *VISION_DEFAULTS)
FREEZE_EXCEPTION_TYPES = ("LayerNorm", "Linear", "Embedding")


@dataclass
class PerceiverConfig:
    resampler_n_latents: int = 64
    resampler_depth: int = 6
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    qk_layer_norms_perceiver: bool = False

    def __post_init__(self) -> None:
        require_positive(
            self, "resampler_n_latents", "resampler_depth", "resampler_n_heads", "resampler_head_dim"
        )


@dataclass
class IdeficsConfig:
    """Defaults equal transformers' `IdeficsConfig` defaults; published configs leave many fields out."""

    vocab_size: int = 32000
    additional_vocab_size: int = 0
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    alpha_initializer: str = "zeros"
    alphas_initializer_range: float = 0.0
    alpha_type: str = "float"
    cross_layer_interval: int = 1
    qk_layer_norms: bool = False
    use_resampler: bool = False
    freeze_text_layers: bool = True
    freeze_text_module_exceptions: list[str] = field(default_factory=list)
    freeze_lm_head: bool = False
    freeze_vision_layers: bool = True
    freeze_vision_module_exceptions: list[str] = field(default_factory=list)
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    vision_config: CLIPVisionConfig = field(default_factory=lambda: CLIPVisionConfig(**VISION_DEFAULTS))
    perceiver_config: PerceiverConfig = field(default_factory=PerceiverConfig)

    def __post_init__(self) -> None:
        require_positive(
            self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"
        )
        if self.additional_vocab_size < 0:
            raise ValueError(f"additional_vocab_size must be >= 0, got {self.additional_vocab_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads ({self.num_attention_heads})"
            )
        if self.alpha_type not in ("float", "vector"):
            raise ValueError(f"alpha_type must be 'float' or 'vector', got {self.alpha_type!r}")
        if not isinstance(self.cross_layer_interval, int) or self.cross_layer_interval <= 0:
            raise ValueError(
                f"cross_layer_interval must be a positive integer, got {self.cross_layer_interval!r}"
            )
        if self.num_hidden_layers % self.cross_layer_interval:
            raise ValueError(
                f"num_hidden_layers ({self.num_hidden_layers}) must be a multiple of cross_layer_interval "
                f"({self.cross_layer_interval}): the reference builds one cross-attention block per interval"
            )
        for name in ("freeze_text_module_exceptions", "freeze_vision_module_exceptions"):
            bad = [m for m in getattr(self, name) if m not in FREEZE_EXCEPTION_TYPES]
            if bad:
                raise ValueError(
                    f"{name} holds unknown module types {bad}; allowed: {list(FREEZE_EXCEPTION_TYPES)}"
                )
        self.text_config  # validates the rope settings  # noqa: B018

    @property
    def total_vocab_size(self) -> int:
        return self.vocab_size + self.additional_vocab_size

    @property
    def num_cross_layers(self) -> int:
        return self.num_hidden_layers // self.cross_layer_interval

    @property
    def text_config(self) -> LlamaConfig:
        """The LLaMA decoder inside IDEFICS (plain multi-head attention, no biases)."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
        )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> IdeficsConfig:
        """Nested `vision_config` / `perceiver_config` or flat `vision_*` / `resampler_*` keys (the nested
        form wins where both are present); `rope_parameters` or `rope_theta` / `rope_scaling`."""
        if d.get("model_type", "idefics") != "idefics":
            raise ValueError(f"model_type {d.get('model_type')!r} is not 'idefics'")
        kwargs = known_fields(cls, d)
        text = LlamaConfig.from_hf(
            {k: d[k] for k in ("rope_parameters", "rope_theta", "rope_scaling") if k in d}
        )
        kwargs["rope_theta"], kwargs["rope_scaling"] = text.rope_theta, text.rope_scaling

        flat_vision = {k.removeprefix("vision_"): v for k, v in d.items() if k.startswith("vision_")}
        vision = {
            k: v
            for k, v in {**flat_vision, **(section(d, "vision_config") or {})}.items()
            if k in VISION_KEYS
        }
        if "embed_dim" in vision:
            vision["hidden_size"] = vision.pop("embed_dim")
        kwargs["vision_config"] = CLIPVisionConfig.from_hf(
            {"model_type": "clip_vision_model", **vision}, VISION_DEFAULTS
        )

        flat_perceiver = {
            k: v for k, v in d.items() if k.startswith("resampler_") or k == "qk_layer_norms_perceiver"
        }
        perceiver = {**flat_perceiver, **(section(d, "perceiver_config") or {})}
        kwargs["perceiver_config"] = PerceiverConfig(**known_fields(PerceiverConfig, perceiver))
        for name in ("freeze_text_module_exceptions", "freeze_vision_module_exceptions"):
            if name in kwargs:
                kwargs[name] = list(kwargs[name] or [])
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """config.json in the form transformers 5 writes."""
        v = self.vision_config
        skip = ("vision_config", "perceiver_config", "rope_theta", "rope_scaling")
        d: dict[str, Any] = {"architectures": ["IdeficsForVisionText2Text"], "model_type": "idefics"}
        d.update({k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip})
        d["rope_parameters"] = {
            "rope_type": "default",
            **(self.rope_scaling or {}),
            "rope_theta": self.rope_theta,
        }
        d["vision_config"] = {
            "model_type": "idefics_vision",
            "embed_dim": v.hidden_size,
            **{k: getattr(v, k) for k in VISION_DEFAULTS if k != "hidden_size"},
        }
        d["perceiver_config"] = {"model_type": "idefics_perciever", **vars(self.perceiver_config)}
        return d

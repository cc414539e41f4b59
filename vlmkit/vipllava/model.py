"""ViP-LLaVA and LLaVA-1.5: a CLIP tower whose hidden states are projected into a LLaMA decoder at the
`<image>` token positions.

ViP-LLaVA concatenates several tower layers and normalises them before the projector; LLaVA-1.5 is the
single-layer case without the norm. Attribute names equal the published checkpoint's
(`vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.*`).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.clip import CLIPVisionModel
from vlmkit.generation import GenerationConfig, GenerationMixin
from vlmkit.llama import LlamaForCausalLM, causal_lm_loss, check_text_inputs
from vlmkit.modules import CausalLMOutput, activation
from vlmkit.runner import DecoderSession, ImageItem, InlineImagesRunner, PromptPlan, content_key
from vlmkit.vipllava.config import VipLlavaConfig
from vlmkit.weights import SavePretrainedMixin

# Checkpoint key prefix -> our module prefix; the first match wins. Our names are the published layout.
KEY_MAP = [
    # transformers 5 in-memory names (what its state_dict() holds)
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    # published hub checkpoints (identity) and transformers 5 save_pretrained (no `vision_model.`)
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
]
# Buffers that older writers persisted and that we derive instead.
KEY_IGNORE = (r"\.position_ids$", r"rotary_emb\.inv_freq$")


class MultiLayerProjector(nn.Module):
    """[LayerNorm ->] Linear -> act -> Linear, from concatenated vision features to the text width."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        act: str = "gelu",
        bias: bool = True,
        layernorm_eps: float | None = None,
    ) -> None:
        super().__init__()
        if layernorm_eps is not None:
            self.projector_layernorm = nn.LayerNorm(in_dim, eps=layernorm_eps)
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "projector_layernorm"):
            x = self.projector_layernorm(x)
        return self.linear_2(self.act(self.linear_1(x)))


class VipLlavaModel(InlineImagesRunner, GenerationMixin, SavePretrainedMixin, nn.Module):
    """ViP-LLaVA (`model_type: vipllava`) or LLaVA-1.5 (`model_type: llava`), chosen by the config."""

    generation_inputs = ("pixel_values", "image_features")

    def __init__(self, config: VipLlavaConfig) -> None:
        super().__init__()
        self.config = config
        vision, text = config.vision_config, config.text_config
        self.vision_tower = CLIPVisionModel(vision)
        self.multi_modal_projector = MultiLayerProjector(
            vision.hidden_size * len(config.feature_layers),
            text.hidden_size,
            act=config.projector_hidden_act,
            bias=config.multimodal_projector_bias,
            layernorm_eps=config.projector_layernorm_eps if config.has_projector_norm else None,
        )
        self.language_model = LlamaForCausalLM(text)

    # -- images ---------------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C, H, W) -> projected image features (N, P, C_text), P tokens per image."""
        states = self.vision_tower(pixel_values, layers=self.config.feature_layers)  # each (N, 1 + P, C_vis)
        if self.config.drop_class_token:
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(torch.cat(states, dim=-1))

    # -- text + images --------------------------------------------------------------------------

    def embed_inputs(
        self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings (B, T, C) with image features written, in order, at the `<image>` positions."""
        vocab = self.config.text_config.vocab_size
        image_id = self.config.image_token_index
        is_image = input_ids == image_id
        bad = (input_ids < 0) | ((input_ids >= vocab) & ~is_image)
        if bool(bad.any()):
            raise ValueError(
                f"input_ids hold ids outside the vocabulary [0, {vocab}): "
                f"{sorted(set(input_ids[bad].tolist()))[:10]}"
            )
        n_tokens = int(is_image.sum())
        n_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            per = self.config.image_tokens_per_image
            images = 0 if image_features is None else image_features.shape[0]
            raise ValueError(
                f"Image features and image tokens do not match: input_ids hold {n_tokens} <image> tokens "
                f"(id {image_id}) but the {images} image(s) give {n_features} features ({per} per image). "
                f"Each image needs exactly {per} <image> tokens; build inputs with the model's processor."
            )
        safe_ids = input_ids.masked_fill(is_image, 0) if image_id >= vocab else input_ids
        embeds = self.language_model.model.embed_tokens(safe_ids)
        if n_tokens:
            embeds = embeds.masked_scatter(
                is_image[..., None], image_features.to(embeds.device, embeds.dtype)
            )
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids (B, T) with `<image>` tokens; pixel_values (N, C, H, W), one image per run of tokens.

        `image_features` (N, P, C_text) may replace pixel_values (computed once by `get_image_features`).
        Position ids default to 0..T-1 as in the reference's forward; pass them for left-padded batches
        that must match an unpadded run exactly.
        """
        check_text_inputs(input_ids, attention_mask, labels)
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass either pixel_values or image_features, not both")
        if pixel_values is not None:
            if pixel_values.dim() != 4:
                raise ValueError(
                    f"pixel_values must have shape (num_images, channels, height, width); "
                    f"got {tuple(pixel_values.shape)}"
                )
            image_features = self.get_image_features(pixel_values)
        embeds = self.embed_inputs(input_ids, image_features)
        hidden = self.language_model.model(embeds, attention_mask=attention_mask, position_ids=position_ids)
        logits = self.language_model(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

    def check_image_tokens(self, input_ids: torch.Tensor, n_images: int) -> None:
        """Raise unless input_ids hold exactly one run of `<image>` tokens per image."""
        self.check_image_count(int((input_ids == self.config.image_token_index).sum()), n_images)

    def check_image_count(self, n_tokens: int, n_images: int) -> None:
        """Raise unless `n_tokens` `<image>` tokens are one run per image."""
        per = self.config.image_tokens_per_image
        if n_tokens != n_images * per:
            raise ValueError(
                f"Image features and image tokens do not match: input_ids hold {n_tokens} <image> tokens but "
                f"{n_images} image(s) need {n_images * per} ({per} per image); build inputs with the model's "
                "processor"
            )

    def start_session(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        config: GenerationConfig,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> DecoderSession:
        """Validate the inputs now (before any work) and return a session that runs the prompt once."""
        check_text_inputs(input_ids, attention_mask, None)
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass either pixel_values or image_features, not both")
        if pixel_values is not None and pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must have shape (num_images, channels, height, width); got {tuple(pixel_values.shape)}"
            )
        n_images = (
            pixel_values.shape[0]
            if pixel_values is not None
            else (image_features.shape[0] if image_features is not None else 0)
        )
        self.check_image_tokens(input_ids, n_images)

        def images() -> torch.Tensor | None:  # the vision tower runs once, at prefill
            return self.get_image_features(pixel_values) if pixel_values is not None else image_features

        return DecoderSession(self, input_ids, attention_mask, config.max_new_tokens, images)

    # -- the runner (vlmkit.runner) -------------------------------------------------------------

    def plan(self, inputs: dict[str, torch.Tensor]) -> PromptPlan:
        """One prompt (1, L) and its pictures: picture j fills the j-th run of `<image>` tokens."""
        ids, pixels = inputs["input_ids"], inputs.get("pixel_values")
        n = 0 if pixels is None else pixels.shape[0]
        # one prompt's positions in plain Python: per request, cheaper than a few small tensor operations
        image = self.config.image_token_index
        where = [t for t, token in enumerate(ids[0].tolist()) if token == image]
        self.check_image_count(len(where), n)
        per = self.config.image_tokens_per_image
        items = [
            ImageItem(pixels=pixels[j], key=content_key(pixels[j]), positions=where[j * per : (j + 1) * per])
            for j in range(n)
        ]
        return PromptPlan(ids=ids, items=items, decode_items=[])

    def encode(self, items: list[ImageItem]) -> list[torch.Tensor]:
        """Pictures (C, H, W) each -> projected features (P, C_text) each, the tower run once over all."""
        return list(self.get_image_features(torch.stack([item.pixels for item in items])))

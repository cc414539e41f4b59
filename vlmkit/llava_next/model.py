"""LLaVA-NeXT: every picture is seen as a base view and a grid of tiles by a CLIP tower; the tiles' features
are laid back out as the picture's grid, the cells on the padding dropped, a learned newline appended to
every row, and the whole written into a LLaMA or Mistral decoder at the picture's `<image>` tokens.

The number of tokens of a picture depends on its size (`anyres.py`), which travels with the pixels as
`image_sizes` (N, 2). Attribute names equal the published checkpoint's (`vision_tower.vision_model.*`,
`multi_modal_projector.*`, `image_newline`, `language_model.model.*`, `language_model.lm_head.*`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlmkit.clip import CLIPVisionModel
from vlmkit.generation import GenerationConfig, GenerationMixin
from vlmkit.llama import LlamaForCausalLM, causal_lm_loss, check_text_inputs
from vlmkit.llava_next.anyres import grid_shape, grid_tokens, tile_count, unpadded_box
from vlmkit.llava_next.config import LlavaNextConfig
from vlmkit.modules import CausalLMOutput
from vlmkit.runner import DecoderSession, ImageItem, InlineImagesRunner, PromptPlan, content_key
from vlmkit.vipllava.model import KEY_IGNORE as LLAVA_KEY_IGNORE
from vlmkit.vipllava.model import KEY_MAP as LLAVA_KEY_MAP
from vlmkit.vipllava.model import MultiLayerProjector
from vlmkit.weights import SavePretrainedMixin

# Checkpoint key prefix -> our module prefix, the first match winning: LLaVA's table (published, transformers
# 5 saved and in-memory names), plus the newline vector, which transformers 5 keeps under `model.`.
KEY_MAP = [("model.image_newline", "image_newline"), *LLAVA_KEY_MAP]
KEY_IGNORE = LLAVA_KEY_IGNORE


class LlavaNextModel(InlineImagesRunner, GenerationMixin, SavePretrainedMixin, nn.Module):
    """LLaVA-NeXT (`model_type: llava_next`) with a Vicuna (LLaMA) or Mistral decoder, as the config says."""

    generation_inputs = ("pixel_values", "image_sizes")

    def __init__(self, config: LlavaNextConfig) -> None:
        super().__init__()
        self.config = config
        vision, text = config.vision_config, config.text_config
        self.vision_tower = CLIPVisionModel(vision)
        self.multi_modal_projector = MultiLayerProjector(
            vision.hidden_size * len(config.feature_layers),
            text.hidden_size,
            act=config.projector_hidden_act,
            bias=config.multimodal_projector_bias,
        )
        self.image_newline = nn.Parameter(torch.empty(text.hidden_size))
        self.language_model = LlamaForCausalLM(text)

    # -- the geometry of one picture -------------------------------------------------------------

    def tiles_for(self, size: Sequence[int]) -> int:
        """Views (base and tiles) of a picture of `size` (height, width)."""
        c = self.config
        return tile_count(size, c.image_grid_pinpoints, c.tile_size)

    def tokens_for(self, size: Sequence[int]) -> int:
        """`<image>` tokens of a picture of `size` (height, width): the base view's cells, then the kept cells
        of the grid with a newline after every row."""
        c = self.config
        rows, cols = grid_shape(size, c.image_grid_pinpoints, c.tile_size)
        side = c.patches_per_side
        return side * side + grid_tokens(size, rows * side, cols * side)

    # -- images ---------------------------------------------------------------------------------

    def tile_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """Views (n, C, H, W) -> projected features (n, P, C_text), P cells per view (class token dropped)."""
        states = self.vision_tower(tiles, layers=self.config.feature_layers)  # each (n, 1 + P, C_vis)
        return self.multi_modal_projector(torch.cat([s[:, 1:] for s in states], dim=-1))

    def pack(self, features: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """One picture's view features (its views, P, C) -> its token features (tokens_for(size), C): the
        base view's cells, then the grid's kept cells row by row, each row closed by the newline vector."""
        c = self.config
        rows, cols = grid_shape(size, c.image_grid_pinpoints, c.tile_size)
        side = c.patches_per_side
        dim = features.shape[-1]
        grid = features[1 : 1 + rows * cols].reshape(rows, cols, side, side, dim)
        # (rows * side, cols * side, C): the cells laid out as the picture's canvas
        grid = grid.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)
        top, bottom, left, right = unpadded_box(size, rows * side, cols * side)
        grid = grid[top:bottom, left:right]
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, dim)
        grid = torch.cat([grid, newline], dim=1).reshape(-1, dim)  # (kept rows * (kept cols + 1), C)
        return torch.cat([features[0], grid])

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (N, V, C, H, W) (views zero-padded per picture) or (sum of views, C, H, W), and
        image_sizes (N, 2) -> each picture's token features (tokens_for(size), C_text)."""
        return self.packed_features(*self.split_views(pixel_values, image_sizes))

    def packed_features(self, views: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Each picture's token features, the vision tower run once over every view of every picture."""
        if not views:
            return []
        features = self.tile_features(torch.cat(views)).split([len(v) for v in views])
        return [self.pack(f, size) for f, size in zip(features, sizes, strict=True)]

    def split_views(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Each picture's own views (views_i, C, H, W) and its (height, width), checked against each other."""
        if image_sizes is None:
            raise ValueError(
                "LLaVA-NeXT pixel_values need image_sizes (num_images, 2): each picture's height, width"
            )
        if (
            not isinstance(image_sizes, torch.Tensor)
            or image_sizes.dim() != 2
            or image_sizes.shape[-1] != 2
            or image_sizes.is_floating_point()
        ):
            shape = tuple(image_sizes.shape) if isinstance(image_sizes, torch.Tensor) else type(image_sizes)
            raise ValueError(f"image_sizes must be an integer tensor (num_images, 2); got {shape}")
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        if any(h < 1 or w < 1 for h, w in sizes):
            raise ValueError(f"image_sizes must be positive (height, width) pairs; got {sizes}")
        needed = [self.tiles_for(size) for size in sizes]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(
                    f"pixel_values hold {pixel_values.shape[0]} pictures but image_sizes {len(sizes)}; give one "
                    f"size per picture"
                )
            short = [(i, n) for i, n in enumerate(needed) if n > pixel_values.shape[1]]
            if short:
                i, n = short[0]
                raise ValueError(
                    f"picture {i} of size {sizes[i]} takes {n} views but pixel_values hold "
                    f"{pixel_values.shape[1]} per picture; build inputs with the model's processor"
                )
            return [p[:n] for p, n in zip(pixel_values, needed, strict=True)], sizes
        if pixel_values.dim() == 4:
            if pixel_values.shape[0] != sum(needed):
                raise ValueError(
                    f"pixel_values hold {pixel_values.shape[0]} views but the {len(sizes)} pictures of "
                    f"image_sizes take {sum(needed)} ({needed})"
                )
            return list(pixel_values.split(needed)), sizes
        raise ValueError(
            f"pixel_values must have shape (num_images, views, channels, height, width) or "
            f"(views, channels, height, width); got {tuple(pixel_values.shape)}"
        )

    # -- text + images --------------------------------------------------------------------------

    def embed_inputs(
        self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings (B, T, C) with image features (n, C) (or (1, n, C)) written, in order, at the
        `<image>` positions."""
        vocab = self.config.text_config.vocab_size
        image_id = self.config.image_token_index
        is_image = input_ids == image_id
        bad = (input_ids < 0) | ((input_ids >= vocab) & ~is_image)
        if bool(bad.any()):
            raise ValueError(
                f"input_ids hold ids outside the vocabulary [0, {vocab}): "
                f"{sorted(set(input_ids[bad].tolist()))[:10]}"
            )
        if image_features is not None:
            image_features = image_features.reshape(-1, image_features.shape[-1])
        n_tokens = int(is_image.sum())
        n_features = 0 if image_features is None else image_features.shape[0]
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image tokens do not match: input_ids hold {n_tokens} <image> tokens "
                f"(id {image_id}) but the pictures give {n_features} features; build inputs with the "
                f"model's processor"
            )
        safe_ids = input_ids.masked_fill(is_image, 0) if image_id >= vocab else input_ids
        embeds = self.language_model.model.embed_tokens(safe_ids)
        if n_tokens:
            embeds = embeds.masked_scatter(
                is_image[..., None], image_features.to(embeds.device, embeds.dtype)
            )
        return embeds

    def check_image_tokens(self, input_ids: torch.Tensor, sizes: Sequence[Sequence[int]]) -> None:
        """Raise unless input_ids hold exactly the `<image>` tokens the pictures of `sizes` take."""
        n_tokens = int((input_ids == self.config.image_token_index).sum())
        per = [self.tokens_for(size) for size in sizes]
        if n_tokens != sum(per):
            raise ValueError(
                f"Image features and image tokens do not match: input_ids hold {n_tokens} <image> tokens but "
                f"the {len(per)} picture(s) take {sum(per)} ({per}, from their sizes); build inputs with the "
                "model's processor"
            )

    def check_pictures(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """The pictures' views and sizes, checked against each other and against the `<image>` tokens."""
        if pixel_values is None:
            if image_sizes is not None and len(image_sizes):
                raise ValueError(f"image_sizes given for {len(image_sizes)} pictures but no pixel_values")
            self.check_image_tokens(input_ids, [])
            return [], []
        views, sizes = self.split_views(pixel_values, image_sizes)
        self.check_image_tokens(input_ids, sizes)
        return views, sizes

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids (B, T) with each picture's run of `<image>` tokens; pixel_values (N, V, C, H, W) and
        image_sizes (N, 2), the pictures in the order of their runs.

        Position ids default to 0..T-1 as in the reference's forward; pass them for left-padded batches
        that must match an unpadded run exactly.
        """
        check_text_inputs(input_ids, attention_mask, labels)
        views, sizes = self.check_pictures(input_ids, pixel_values, image_sizes)
        features = self.picture_features(views, sizes)
        embeds = self.embed_inputs(input_ids, features)
        hidden = self.language_model.model(embeds, attention_mask=attention_mask, position_ids=position_ids)
        logits = self.language_model(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)

    def picture_features(
        self, views: list[torch.Tensor], sizes: list[tuple[int, int]]
    ) -> torch.Tensor | None:
        """All pictures' token features in order (n, C); None without pictures."""
        return torch.cat(self.packed_features(views, sizes)) if views else None

    def start_session(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        config: GenerationConfig,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> DecoderSession:
        """Validate the inputs now (before any work) and return a session that runs the prompt once."""
        check_text_inputs(input_ids, attention_mask, None)
        views, sizes = self.check_pictures(input_ids, pixel_values, image_sizes)

        def images() -> torch.Tensor | None:  # the vision tower runs once, at prefill
            return self.picture_features(views, sizes)

        return DecoderSession(self, input_ids, attention_mask, config.max_new_tokens, images)

    # -- the runner (vlmkit.runner) -------------------------------------------------------------

    def plan(self, inputs: dict[str, torch.Tensor]) -> PromptPlan:
        """One prompt (1, L) and its pictures: picture j fills the j-th run of tokens_for(size_j) `<image>`
        tokens. Each item holds the picture's own views (as many as its size takes, without the processor's
        padding) and its size, as `meta["image_size"]`."""
        ids = inputs["input_ids"]
        views, sizes = self.check_pictures(ids, inputs.get("pixel_values"), inputs.get("image_sizes"))
        where = (ids[0] == self.config.image_token_index).nonzero()[:, 0].tolist()
        items, start = [], 0
        for picture, size in zip(views, sizes, strict=True):
            n = self.tokens_for(size)
            meta = {"image_size": size}
            key = content_key(picture, meta)
            items.append(ImageItem(pixels=picture, key=key, positions=where[start : start + n], meta=meta))
            start += n
        return PromptPlan(ids=ids, items=items, decode_items=[])

    def encode(self, items: list[ImageItem]) -> list[torch.Tensor]:
        """Pictures (views_i, C, H, W), each with its size -> each picture's token features
        (tokens_for(size_i), C_text), the vision tower run once over every view of every picture."""
        return self.packed_features(
            [item.pixels for item in items], [item.meta["image_size"] for item in items]
        )

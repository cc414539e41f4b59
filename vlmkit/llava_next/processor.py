"""LLaVA-NeXT processor: every picture is tiled (`AnyResImageProcessor`), each `<image>` in the text becomes as
many tokens as that picture's size gives, and the text is tokenized with the checkpoint's tokenizer."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from vlmkit.images import DEFAULT_MAX_PIXELS, ImageInput
from vlmkit.llava_next.anyres import AnyResImageProcessor, best_resolution, grid_tokens
from vlmkit.processing import check_return_tensors, read_processor_files
from vlmkit.tokenizer import Tokenizer
from vlmkit.vipllava.processor import LLAVA_TEMPLATE, LlavaProcessor, prompts_and_images

# llava-v1.6-mistral's prompt format ([INST] ... [/INST]), for Mistral checkpoints without a chat template;
# Vicuna checkpoints without one take LLaVA-1.5's USER: / ASSISTANT: format.
MISTRAL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    " [/INST]"
    "{% elif message['role'] == 'assistant' %} "
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}\n"
    "{% endif %}"
    "{% endfor %}"
)


class LlavaNextProcessor:
    """`proc(text=..., images=...)` -> input_ids, attention_mask, pixel_values (N, V, 3, h, w) and image_sizes
    (N, 2), as transformers' LlavaNextProcessor builds them."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: AnyResImageProcessor,
        *,
        patch_size: int,
        image_token: str = "<image>",
        num_additional_image_tokens: int = 0,
        vision_feature_select_strategy: str = "default",
        chat_template: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.chat_template = chat_template
        self.max_pixels = max_pixels

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> LlavaNextProcessor:
        files = read_processor_files(folder)
        kw, model = files.kwargs, files.model_config
        patch_size = kw.get("patch_size")
        strategy = kw.get("vision_feature_select_strategy")
        extra = kw.get("num_additional_image_tokens")
        if patch_size is None:  # a folder without processor arguments: the model config's tower says
            from vlmkit.llava_next.config import LlavaNextConfig

            if not model:
                raise FileNotFoundError(
                    f"{folder}: processor_config.json gives no patch_size and there is no config.json to take "
                    f"the vision tower's from"
                )
            config = LlavaNextConfig.from_hf(model)
            patch_size, strategy, extra = (
                config.vision_config.patch_size,
                config.vision_feature_select_strategy,
                1,
            )
        template = files.chat_template
        if template is None:
            mistral = (model.get("text_config") or {}).get("model_type") == "mistral"
            template = MISTRAL_TEMPLATE if mistral else LLAVA_TEMPLATE
        return cls(
            files.tokenizer,
            AnyResImageProcessor.from_dict(files.image_processor),
            patch_size=patch_size,
            image_token=kw.get("image_token", "<image>"),
            num_additional_image_tokens=extra or 0,
            vision_feature_select_strategy=strategy or "default",
            chat_template=template,
        )

    def tokens_for(self, size: Sequence[int], view_height: int, view_width: int) -> int:
        """`<image>` tokens of a picture of `size` (height, width) whose views came out view_height x
        view_width: the base view's patches (and class token, unless dropped), then the grid's patches on
        the picture (not the padding), a newline after each row."""
        best_h, best_w = best_resolution(size, self.image_processor.image_grid_pinpoints)
        rows, cols = view_height // self.patch_size, view_width // self.patch_size
        grid = grid_tokens(size, rows * (best_h // view_height), cols * (best_w // view_width))
        n = grid + rows * cols + self.num_additional_image_tokens
        return n - 1 if self.vision_feature_select_strategy == "default" else n

    def image_inputs(
        self, images: Sequence[ImageInput], *, allow_remote: bool = False
    ) -> dict[str, torch.Tensor]:
        """The image entries of the inputs for these pictures: pixel_values (N, V, 3, h, w), each picture's
        views zero-padded to the most, and image_sizes (N, 2), each picture's (height, width).

        >>> out = processor.image_inputs([Image.new("RGB", (800, 600))])
        >>> out["pixel_values"].shape, out["image_sizes"].tolist()
        (torch.Size([1, 5, 3, 336, 336]), [[600, 800]])
        """
        pixels, sizes = self.image_processor.tiles(
            list(images), allow_remote=allow_remote, max_pixels=self.max_pixels
        )
        return {"pixel_values": pixels, "image_sizes": sizes}

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]] | None = None,
        *,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str = "pt",
        allow_remote: bool = False,
    ) -> dict[str, torch.Tensor]:
        check_return_tensors(return_tensors)
        texts, flat = prompts_and_images(text, images, self.image_token)
        out: dict[str, torch.Tensor] = {}
        counts: list[int] = []
        if flat:
            out = self.image_inputs(flat, allow_remote=allow_remote)
            view = out["pixel_values"].shape[-2:]
            counts = [self.tokens_for(size, *view) for size in out["image_sizes"].tolist()]
            texts = expand_markers(texts, self.image_token, counts)
        enc = self.tokenizer(
            texts,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
        )
        found = int((enc["input_ids"] == self.image_token_id).sum()) if flat else 0
        if found != sum(counts):
            raise ValueError(
                f"after tokenization the inputs hold {found} {self.image_token} tokens, not {sum(counts)} "
                f"({counts} for the {len(flat)} images): truncation cut into an image; raise max_length"
            )
        return {**enc, **out}

    # chat rendering and decoding are LLaVA's: they read only the tokenizer, the template and __call__
    apply_chat_template = LlavaProcessor.apply_chat_template
    decode = LlavaProcessor.decode
    batch_decode = LlavaProcessor.batch_decode


def expand_markers(texts: list[str], marker: str, counts: Sequence[int]) -> list[str]:
    """Each marker, in order over all texts, repeated as often as its picture's count says."""
    left = iter(counts)
    out = []
    for text in texts:
        first, *rest = text.split(marker)
        out.append(first + "".join(marker * next(left) + piece for piece in rest))
    return out

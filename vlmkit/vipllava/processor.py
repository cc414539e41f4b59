"""ViP-LLaVA / LLaVA-1.5 processor: each `<image>` in the text becomes one token per image feature, images
go through CLIP preprocessing, and the text is tokenized with the checkpoint's tokenizer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from vlmkit.image_processor import ImageProcessor
from vlmkit.images import DEFAULT_MAX_PIXELS, ImageInput
from vlmkit.processing import check_return_tensors, read_processor_files, split_messages
from vlmkit.tokenizer import Tokenizer

# The prompt format of the ViP-LLaVA release, used when a checkpoint carries no chat template.
VIP_LLAVA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | selectattr('type', 'equalto', "
    "'text') | map(attribute='text') | join('') %}{% set messages = messages[1:] %}{% else %}{% set system = "
    '"A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, '
    "detailed, and polite answers to the human's questions.\" %}{% endif %}"
    "{{ system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}###Human: {% else %}###Assistant: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}###Assistant:{% endif %}"
)

# LLaVA-1.5's conversation format (USER: / ASSISTANT:), for llava checkpoints without a template.
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class LlavaProcessor:
    """`proc(text=..., images=...)` -> input_ids, attention_mask and pixel_values, as the reference builds them."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        *,
        image_token: str = "<image>",
        tokens_per_image: int | None = None,
        patch_size: int | None = None,
        num_additional_image_tokens: int = 0,
        vision_feature_select_strategy: str = "default",
        chat_template: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if tokens_per_image is None and patch_size is None:
            raise ValueError("LlavaProcessor needs patch_size (processor_config.json) or tokens_per_image")
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self._tokens_per_image = tokens_per_image
        self.chat_template = chat_template
        self.max_pixels = max_pixels

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> LlavaProcessor:
        files = read_processor_files(folder)
        kw = files.kwargs
        model = files.model_config
        tokens = None
        if kw.get("patch_size") is None:  # an old folder without processor arguments: use the model config
            from vlmkit.vipllava.config import VipLlavaConfig

            if not model:
                raise FileNotFoundError(
                    f"{folder}: processor_config.json gives no patch_size and there is no config.json to derive "
                    f"the number of tokens per image from"
                )
            tokens = VipLlavaConfig.from_hf(model).image_tokens_per_image
        template = files.chat_template
        if template is None:
            template = (
                VIP_LLAVA_TEMPLATE if model.get("model_type", "vipllava") == "vipllava" else LLAVA_TEMPLATE
            )
        return cls(
            files.tokenizer,
            ImageProcessor.from_dict(files.image_processor),
            image_token=kw.get("image_token", "<image>"),
            tokens_per_image=tokens,
            patch_size=kw.get("patch_size"),
            num_additional_image_tokens=kw.get("num_additional_image_tokens", 0),
            vision_feature_select_strategy=kw.get("vision_feature_select_strategy") or "default",
            chat_template=template,
        )

    def tokens_for(self, height: int, width: int) -> int:
        """How many `<image>` tokens one preprocessed image of this size becomes."""
        if self._tokens_per_image is not None:
            return self._tokens_per_image
        n = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return n - 1 if self.vision_feature_select_strategy == "default" else n

    def image_inputs(
        self, images: Sequence[ImageInput], *, allow_remote: bool = False
    ) -> dict[str, torch.Tensor]:
        """The image entries of the inputs for these pictures: pixel_values (N, 3, H, W).

        >>> processor.image_inputs([Image.new("RGB", (64, 48))])["pixel_values"].shape
        torch.Size([1, 3, 336, 336])
        """
        pixels = self.image_processor.preprocess(
            list(images), allow_remote=allow_remote, max_pixels=self.max_pixels
        )
        return {"pixel_values": pixels}

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
        if flat:
            out = self.image_inputs(flat, allow_remote=allow_remote)
            n = self.tokens_for(*out["pixel_values"].shape[-2:])
            texts = [t.replace(self.image_token, self.image_token * n) for t in texts]
        enc = self.tokenizer(
            texts,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
        )
        if flat:
            found = sum(row.count(self.image_token_id) for row in enc["input_ids"].tolist())
            if found != len(flat) * n:
                raise ValueError(
                    f"after tokenization the inputs hold {found} {self.image_token} tokens, not {len(flat) * n} "
                    f"({len(flat)} images x {n}): truncation cut into an image; raise max_length"
                )
        return {**enc, **out}

    # -- chat and decoding ----------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | dict[str, torch.Tensor]:
        """Render OpenAI-style messages with the checkpoint's template; with tokenize=True, also run the
        processor on the prompt and the images the messages carry."""
        parts, images = split_messages(messages, need_images=tokenize)
        prompt = self.tokenizer.render_chat(
            parts,
            chat_template=chat_template or self.chat_template,
            add_generation_prompt=add_generation_prompt,
        )
        if not tokenize:
            return prompt
        return self(text=prompt, images=images or None, **kwargs)

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Any, *, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)


def prompts_and_images(text: Any, images: Any, marker: str) -> tuple[list[str], list[Any]]:
    """A processor's `text` as a list of prompts and its `images` flattened, checked against each other:
    one `marker` in the prompts per image."""
    if text is None:
        raise ValueError("text is required: a prompt with one <image> per image")
    texts = [text] if isinstance(text, str) else list(text)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("text must be a string or a list of strings")
    flat = flatten_images(images)
    n_markers = sum(t.count(marker) for t in texts)
    if n_markers != len(flat):
        raise ValueError(
            f"the prompts hold {n_markers} {marker} markers but {len(flat)} images were given; "
            f"put one {marker} in the text where each image goes"
        )
    return texts, flat


def flatten_images(images: Any) -> list[Any]:
    """None, one image, a list, or a list of lists (one per prompt) -> a flat list in order."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    flat: list[Any] = []
    for item in images:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat

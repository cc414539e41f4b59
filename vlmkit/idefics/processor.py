"""IDEFICS processor: interleaved text and images -> input_ids, attention_mask, pixel_values (B, N, 3, H, W)
padded with zero images, and image_attention_mask (B, T, N): each token attends to the latest image at or
before it, as the reference builds them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch

from vlmkit.image_processor import ImageProcessor
from vlmkit.images import DEFAULT_MAX_PIXELS, ImageInput
from vlmkit.processing import check_return_tensors, read_processor_files, split_messages
from vlmkit.tokenizer import Tokenizer

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"

# IDEFICS-instruct's conversation format, used when a checkpoint carries no chat template. Images are
# written as <image> markers, which the processor turns back into image slots.
IDEFICS_INSTRUCT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class Text(str):
    """A piece of a sample that is text whatever it looks like: a chat's rendered text, where a message
    that holds only a URL or a file name is still words, not a picture to fetch."""


@dataclass(frozen=True)
class Picture:
    """A piece of a sample that is a picture whatever it is: a chat's image part given as a path, a URL or
    a data: URI."""

    source: Any


def interleave_images(prompt: str, images: Sequence[Any]) -> list[Any]:
    """A prompt with one <image> marker per image -> the processor's sample: text pieces (`Text`) and
    images (`Picture`) in order (empty pieces left out), so neither is taken for the other."""
    pieces = prompt.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(images):
        raise ValueError(
            f"the prompt holds {len(pieces) - 1} {IMAGE_TOKEN} markers but {len(images)} images were given"
        )
    sample: list[Any] = []
    for i, piece in enumerate(pieces):
        if piece:
            sample.append(Text(piece))
        if i < len(images):
            sample.append(Picture(images[i]))
    return sample


def is_url(text: str) -> bool:
    if " " in text:
        return False
    parsed = urlparse(text)
    return bool(parsed.scheme and parsed.netloc)


class IdeficsProcessor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        *,
        chat_template: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        for token in (FAKE_TOKEN, IMAGE_TOKEN):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"the tokenizer has no {token} token; this is not an IDEFICS tokenizer")
        if tokenizer.bos_token is None:
            raise ValueError("the IDEFICS processor needs a bos_token in the tokenizer config")
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.has_end_of_utterance = END_OF_UTTERANCE in tokenizer.additional_special_tokens
        self.chat_template = chat_template
        self.max_pixels = max_pixels

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> IdeficsProcessor:
        files = read_processor_files(folder)
        return cls(
            files.tokenizer,
            ImageProcessor.from_dict(files.image_processor),
            chat_template=files.chat_template or IDEFICS_INSTRUCT_TEMPLATE,
        )

    # -- prompts --------------------------------------------------------------------------------

    def build_prompt(
        self, sample: Sequence[Any], *, add_end_of_utterance_token: bool, add_eos_token: bool
    ) -> tuple[str, list[Any]]:
        """One sample (strings and images, interleaved) -> the prompt string and its images in order.
        A string that is a URL is an image, as in the reference; `Text` and `Picture` pieces are what they say."""
        text = self.tokenizer.bos_token
        images: list[Any] = []
        last_was_image = False
        for i, item in enumerate(sample):
            last_was_text = i > 0 and not last_was_image
            if isinstance(item, Text) or (isinstance(item, str) and not is_url(item.strip(" "))):
                if add_end_of_utterance_token and last_was_text:
                    text += END_OF_UTTERANCE
                text += item.strip(" ")
                last_was_image = False
            else:
                text += IMAGE_TOKEN + FAKE_TOKEN if last_was_image else FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN
                if isinstance(item, Picture):
                    item = item.source
                images.append(item.strip(" ") if isinstance(item, str) else item)
                last_was_image = True
        if add_eos_token:
            text += self.tokenizer.eos_token
        return text, images

    def image_inputs(
        self, images: Sequence[ImageInput], *, allow_remote: bool = False
    ) -> dict[str, torch.Tensor]:
        """The image entries of one sample's pictures: pixel_values (N, 3, H, W) (`__call__` pads them into
        (B, N_max, 3, H, W) over a batch).

        >>> processor.image_inputs([Image.new("RGB", (64, 48))])["pixel_values"].shape
        torch.Size([1, 3, 224, 224])
        """
        pixels = self.image_processor.preprocess(
            list(images), allow_remote=allow_remote, max_pixels=self.max_pixels
        )
        return {"pixel_values": pixels}

    def __call__(
        self,
        text: Any = None,
        images: Any = None,
        *,
        padding: bool | str = "longest",
        truncation: bool = False,
        max_length: int | None = None,
        add_end_of_utterance_token: bool | None = None,
        add_eos_token: bool = False,
        return_tensors: str = "pt",
        allow_remote: bool = False,
    ) -> dict[str, torch.Tensor]:
        """text: a list of samples, each a list of strings and images (or one such sample); or, as in
        transformers 5, `text=[prompt, ...]` with `images=[[image, ...], ...]` (each prompt followed by its
        images)."""
        check_return_tensors(return_tensors)
        samples = self._samples(text, images)
        if add_end_of_utterance_token is None:
            add_end_of_utterance_token = self.has_end_of_utterance
        prompts, sample_images = [], []
        for sample in samples:
            prompt, imgs = self.build_prompt(
                sample, add_end_of_utterance_token=add_end_of_utterance_token, add_eos_token=add_eos_token
            )
            prompts.append(prompt)
            sample_images.append(imgs)
        enc = self.tokenizer(
            prompts, add_special_tokens=False, padding=padding, truncation=truncation, max_length=max_length
        )
        input_ids = enc["input_ids"]
        B, T = input_ids.shape
        N = max(1, max(len(x) for x in sample_images))
        C, H, W = 3, self.image_processor.image_size, self.image_processor.image_size
        pixel_values = torch.zeros(B, N, C, H, W)
        for b, imgs in enumerate(sample_images):
            # truncation may have cut image tokens: keep as many images as tokens remain
            kept = imgs[: int((input_ids[b] == self.image_token_id).sum())]
            if kept:
                pixels = self.image_inputs(kept, allow_remote=allow_remote)["pixel_values"]
                pixel_values[b, : len(kept)] = pixels
        if any(sample_images):
            image_attention_mask = self.image_attention_mask(input_ids, N)
        else:
            image_attention_mask = torch.zeros(B, T, 1, dtype=torch.bool)
        return {**enc, "pixel_values": pixel_values, "image_attention_mask": image_attention_mask}

    def _samples(self, text: Any, images: Any) -> list[list[Any]]:
        if text is None:
            raise ValueError("text is required: a list of samples, each a list of strings and images")
        if images is not None:  # transformers 5 form: each prompt is followed by its images
            texts = [text] if isinstance(text, str) else list(text)
            per = list(images) if isinstance(images, (list, tuple)) else [images]
            if len(texts) != len(per):
                raise ValueError(
                    f"{len(texts)} prompts but {len(per)} image entries: with images=, give one entry (an image or "
                    f"a list of images) per prompt"
                )
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("with images=, text must be strings")
            return [
                [t, *(i if isinstance(i, (list, tuple)) else [i])] for t, i in zip(texts, per, strict=True)
            ]
        if isinstance(text, str):
            return [[text]]
        if not isinstance(text, (list, tuple)) or not text:
            raise ValueError("text must be a non-empty list of samples")
        if not any(isinstance(x, (list, tuple)) for x in text):
            return [list(text)]  # one sample
        return [list(s) if isinstance(s, (list, tuple)) else [s] for s in text]

    def image_attention_mask(self, input_ids: torch.Tensor, num_images: int) -> torch.Tensor:
        """(B, T, N) long: token t of row b attends to image n when the latest `<image>` token at or before t
        is the row's n-th. After an EOS token, tokens attend to nothing until the next image."""
        eos = self.tokenizer.eos_token_id
        B, T = input_ids.shape
        rows = []  # built as lists, then one tensor: per token, element writes into a tensor cost far more
        for b in range(B):
            count, after_eos, row = -1, False, []
            for token in input_ids[b].tolist():
                if token == self.image_token_id:
                    count += 1
                    after_eos = False
                row.append(-1 if after_eos or count >= num_images else count)
                if token == eos:
                    after_eos = True
            rows.append(row)
        index = torch.tensor(rows, dtype=torch.long).view(B, T)
        mask = torch.nn.functional.one_hot(index.clamp(min=0), num_classes=num_images)
        mask[index < 0] = 0
        return mask

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
        """Render OpenAI-style messages; with tokenize=True, run the processor on the prompt with the images
        placed at the template's <image> markers."""
        parts, images = split_messages(messages, need_images=tokenize)
        prompt = self.tokenizer.render_chat(
            parts,
            chat_template=chat_template or self.chat_template,
            add_generation_prompt=add_generation_prompt,
        )
        if not tokenize:
            return prompt
        sample = interleave_images(prompt, images)
        return self(text=[sample], **kwargs)

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Any, *, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)

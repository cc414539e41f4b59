"""What the processors share: reading a checkpoint's processor files in either layout, turning OpenAI-style
chat messages into template input plus the images they carry, and the one output format they give."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.tokenizer import Tokenizer
from vlmkit.weights import read_config_file


@dataclass
class ProcessorFiles:
    tokenizer: Tokenizer
    image_processor: dict[str, Any]
    kwargs: dict[str, Any] = field(default_factory=dict)  # processor arguments (patch_size, image_token, ...)
    chat_template: str | None = None
    model_config: dict[str, Any] = field(default_factory=dict)


def read_processor_files(folder: str | os.PathLike) -> ProcessorFiles:
    """transformers 5 layout: processor_config.json (image processor nested), chat_template.jinja; published
    layout: preprocessor_config.json, chat_template.json, special_tokens_map.json. Tokenizer files in both."""
    folder = Path(folder)
    tokenizer = Tokenizer.from_folder(folder)
    kwargs: dict[str, Any] = {}
    image: dict[str, Any] | None = None
    if (folder / "processor_config.json").is_file():
        kwargs = read_config_file(folder / "processor_config.json")
        image = kwargs.pop("image_processor", None)
    if image is None and (folder / "preprocessor_config.json").is_file():
        image = read_config_file(folder / "preprocessor_config.json")
    if image is None:
        raise FileNotFoundError(
            f"no image processor settings in {folder}: expected preprocessor_config.json or an 'image_processor' "
            f"entry in processor_config.json"
        )
    template = tokenizer.chat_template
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").is_file():
        template = read_config_file(folder / "chat_template.json").get("chat_template", template)
    model_config = read_config_file(folder / "config.json") if (folder / "config.json").is_file() else {}
    return ProcessorFiles(tokenizer, image, kwargs, template, model_config)


def check_return_tensors(return_tensors: Any) -> None:
    """The processors give torch tensors only."""
    if return_tensors != "pt":
        raise ValueError(
            f"this processor returns torch tensors only (return_tensors='pt'), got {return_tensors!r}"
        )


def split_messages(
    messages: list[dict[str, Any]], *, need_images: bool = True
) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI-style or Hugging Face-style messages -> messages whose content is a list of {"type": "text"} and
    {"type": "image"} parts (what chat templates expect), and the images in order of appearance.

    Image parts: {"type": "image_url", "image_url": {"url": ...}} (OpenAI), {"type": "image", "image" | "url" |
    "path": ...} (Hugging Face). A string content is one text part. With need_images=False (rendering only),
    an image part may carry no image.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out, images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'; got {message!r}")
        content = message.get("content")
        if content is None:
            content = []
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ValueError(f"message {i}: content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not url and need_images:
                    raise ValueError(f"message {i}, part {j}: image_url has no url")
                images.append(url)
                parts.append({"type": "image"})
            elif kind == "image":
                source = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
                if source is None and need_images:
                    raise ValueError(f"message {i}, part {j}: an image part needs 'image', 'url' or 'path'")
                images.append(source)
                parts.append({"type": "image"})
            else:
                raise ValueError(
                    f"message {i}, part {j}: unknown content part type {kind!r} "
                    f"(expected 'text', 'image' or 'image_url')"
                )
        out.append({**message, "content": parts})
    return out, images

"""Tiny complete checkpoints (weights + tokenizer + processor files) built with transformers."""

from __future__ import annotations

from pathlib import Path

import torch
from oracle import (
    TEXT,
    VISION,
    build_tokenizer,
    hf_idefics_config,
    hf_idefics_model,
    hf_llava_config,
    hf_llava_model,
    randomize_,
)

LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_llava_checkpoint(
    folder: Path,
    *,
    seed: int = 3,
    text: dict | None = None,
    vision: dict | None = None,
    image_size: int = 30,
    patch_size: int = 6,
    model_type: str = "llava",
    **top,
):
    """A LLaVA-1.5-shaped (or, with model_type="vipllava", ViP-LLaVA-shaped) model whose vocabulary is a
    real (tiny) tokenizer's, with its processor files."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor

    folder = Path(folder)
    build_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = hf_llava_config(
        model_type,
        text={"vocab_size": len(tok), **(text or {})},
        vision={"image_size": image_size, "patch_size": patch_size, **(vision or {})},
        **top,
    )
    cfg.image_token_index = tok.convert_tokens_to_ids("<image>")
    cfg.text_config.eos_token_id = tok.eos_token_id
    hf = hf_llava_model(cfg, seed=seed)
    hf.save_pretrained(folder)
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    proc.save_pretrained(folder)
    return folder, hf, proc


def build_idefics_checkpoint(folder: Path, *, seed: int = 4, **config):
    """An IDEFICS-shaped model (base vocabulary = the tokenizer's, plus extra rows) with its processor files."""
    from transformers import AutoTokenizer, IdeficsImageProcessorPil, IdeficsProcessor

    folder = Path(folder)
    specials = ("<fake_token_around_image>", "<image>", "<end_of_utterance>")
    build_tokenizer(folder, extra_special=specials)
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = hf_idefics_config(
        **{
            "vocab_size": len(tok),
            "additional_vocab_size": 0,
            "use_resampler": True,
            "vision": dict(image_size=28),
            "eos_token_id": tok.eos_token_id,
            **config,
        }
    )
    hf = hf_idefics_model(cfg, seed=seed)
    hf.save_pretrained(folder)
    proc = IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=28), tokenizer=tok)
    proc.save_pretrained(folder)
    return folder, hf, proc


# The published LLaVA-v1.6 grid pinpoints, scaled from 336-pixel tiles to the tiny tower's 30-pixel ones.
LLAVA_NEXT_PINPOINTS = [[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]]


def build_llava_next_checkpoint(
    folder: Path,
    *,
    seed: int = 5,
    text_model_type: str = "llama",
    text: dict | None = None,
    vision: dict | None = None,
    image_size: int = 30,
    patch_size: int = 6,
    pinpoints: list[list[int]] | None = None,
    **top,
):
    """A LLaVA-NeXT-shaped model (Vicuna-style LLaMA decoder, or with text_model_type="mistral" a Mistral one)
    whose vocabulary is a real (tiny) tokenizer's, with its processor files (the PIL image processor)."""
    from transformers import (
        AutoTokenizer,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    folder = Path(folder)
    build_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    pinpoints = pinpoints or LLAVA_NEXT_PINPOINTS
    cfg = LlavaNextConfig(
        text_config={
            **TEXT,
            "model_type": text_model_type,
            "vocab_size": len(tok),
            "eos_token_id": tok.eos_token_id,
            **(text or {}),
        },
        vision_config={**VISION, "image_size": image_size, "patch_size": patch_size, **(vision or {})},
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        **top,
    )
    torch.manual_seed(seed)
    hf = randomize_(LlavaNextForConditionalGeneration(cfg), seed).eval()
    hf.save_pretrained(folder)
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    proc.save_pretrained(folder)
    return folder, hf, proc

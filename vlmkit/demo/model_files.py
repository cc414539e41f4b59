"""The files of a demo model before training: a tokenizer trained on the shapes world's text, and a small
config, processor files and chat template per family."""

from __future__ import annotations

import json
import random
from pathlib import Path

from vlmkit.demo.shapes import COLORS, NUMBERS, PROMPT_COLORS, SHAPES, make_example
from vlmkit.image_processor import ImageProcessor

IMAGE_SIZE, PATCH = 96, 32  # one patch per cell of the shapes world's 3 x 3 grid
# the free-form world (vlmkit.demo.freeform): 10 x 10 patches, so that its smallest shape (8% of a picture's
# longer side) is 12.8 px, most of a patch
FREEFORM_IMAGE_SIZE, FREEFORM_PATCH = 160, 16
VIP_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}###Human: "
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% else %}###Assistant: {% for p in m['content'] %}{{ p['text'] }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}###Assistant:{% endif %}"
)
# The text of a turn comes before its pictures: an IDEFICS token attends only to the latest picture before
# it, so the token between two pictures can relate the first one to the question only if it has read it.
IDEFICS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def corpus() -> list[str]:
    words = [*SHAPES, *[s + "s" for s in SHAPES], *COLORS, *PROMPT_COLORS, *NUMBERS]
    rng = random.Random(0)
    lines = [
        make_example(rng, kind).question + " " + make_example(rng, kind).answer
        for kind in ("box_shape", "arrow_color", "count", "caption", "which_image")
        for _ in range(200)
    ]
    return lines + [" ".join(words)] * 20 + ["###Human: ###Assistant: User: Assistant:"] * 20


def build_tokenizer(folder: Path, family: str, lines: list[str] | None = None) -> dict[str, int]:
    """tokenizer.json and tokenizer_config.json trained on `lines` (default: the grid world's `corpus()`);
    returns the special tokens' ids and the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus() if lines is None else lines, trainer)
    specials = (
        ["<image>"]
        if family == "vipllava"
        else ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
    )
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    tk.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "padding_side": "left",
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    if family == "idefics":
        config["additional_special_tokens"] = specials
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {t: tk.token_to_id(t) for t in ["<s>", "</s>", "<pad>", *specials]} | {
        "vocab": tk.get_vocab_size()
    }


def write_configs(
    folder: Path,
    family: str,
    ids: dict[str, int],
    *,
    image_size: int = IMAGE_SIZE,
    patch: int = PATCH,
    pad: bool = False,
) -> None:
    """config.json, processor_config.json and chat_template.jinja of a small model of the family, reading
    image_size x image_size pictures in patch x patch patches. pad: ViP-LLaVA pads a picture to a square
    (LLaVA-1.5's LlavaImageProcessor) instead of cropping its centre; IDEFICS always squeezes it."""
    if family == "vipllava":
        config, processor, image, template = vipllava_files(ids, image_size, patch, pad)
    else:
        config, processor, image, template = idefics_files(ids, image_size, patch)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "processor_config.json").write_text(
        json.dumps({**processor, "image_processor": image.to_dict()}, indent=2)
    )
    (folder / "chat_template.jinja").write_text(template)


def vipllava_files(
    ids: dict[str, int], image_size: int = IMAGE_SIZE, patch: int = PATCH, pad: bool = False
) -> tuple[dict, dict, ImageProcessor, str]:
    vision = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        hidden_act="gelu",
    )
    text = dict(
        model_type="llama",
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    )
    config = {
        "model_type": "vipllava",
        "vision_config": {"model_type": "clip_vision_model", **vision},
        "text_config": {**text, "vocab_size": ids["vocab"]},
        "image_token_index": ids["<image>"],
        "vision_feature_layers": [-2, -1],
        "pad_token_id": ids["<pad>"],
        "image_seq_length": (image_size // patch) ** 2,
    }
    processor = {
        "processor_class": "LlavaProcessor",
        "patch_size": patch,
        "image_token": "<image>",
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
    }
    image = ImageProcessor.from_dict(
        {
            "image_processor_type": "LlavaImageProcessor" if pad else "CLIPImageProcessor",
            "size": {"shortest_edge": image_size},
            "crop_size": {"height": image_size, "width": image_size},
            **({"do_pad": True} if pad else {}),
        }
    )
    return config, processor, image, VIP_TEMPLATE


def idefics_files(
    ids: dict[str, int], image_size: int = IMAGE_SIZE, patch: int = PATCH
) -> tuple[dict, dict, ImageProcessor, str]:
    base = ids["<fake_token_around_image>"]  # the extra rows hold the IDEFICS-only tokens
    config = {
        "model_type": "idefics",
        "vocab_size": base,
        "additional_vocab_size": ids["vocab"] - base,
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "rms_norm_eps": 1e-5,
        "cross_layer_interval": 1,
        "use_resampler": False,  # cross-attention reads the patch features directly
        "qk_layer_norms": True,
        "alpha_initializer": "normal",
        "alphas_initializer_range": 0.5,
        "freeze_text_layers": False,
        "freeze_vision_layers": False,
        "bos_token_id": ids["<s>"],
        "eos_token_id": ids["</s>"],
        "pad_token_id": ids["<pad>"],
        "max_position_embeddings": 512,
        "vision_config": {
            "embed_dim": 128,
            "image_size": image_size,
            "patch_size": patch,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
        },
        "perceiver_config": {
            "resampler_n_latents": 16,
            "resampler_depth": 2,
            "resampler_n_heads": 4,
            "resampler_head_dim": 32,
        },
    }
    processor = {"processor_class": "IdeficsProcessor"}
    image = ImageProcessor.from_dict(
        {"image_processor_type": "IdeficsImageProcessor", "image_size": image_size}
    )
    return config, processor, image, IDEFICS_TEMPLATE

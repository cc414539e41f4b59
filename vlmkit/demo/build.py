"""Build a demo model from nothing: a tokenizer trained on the shapes world's text, a small config, processor
files, a generated training set, `finetune` from random init, and held-out accuracy per question type.

    python -m vlmkit.demo.build OUT --family vipllava --rows 20000 --steps 3000
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import torch

from vlmkit.demo.shapes import (
    COLORS,
    NUMBERS,
    PROMPT_COLORS,
    QUESTION_TYPES,
    SHAPES,
    make_example,
    write_dataset,
)
from vlmkit.images import ImageProcessor

IMAGE_SIZE, PATCH = 96, 12
VIP_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}###Human: "
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% else %}###Assistant: {% for p in m['content'] %}{{ p['text'] }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}###Assistant:{% endif %}"
)
IDEFICS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
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


def build_tokenizer(folder: Path, family: str) -> dict[str, int]:
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
    tk.train_from_iterator(corpus(), trainer)
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


def write_configs(folder: Path, family: str, ids: dict[str, int]) -> None:
    vision = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
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
    if family == "vipllava":
        config = {
            "model_type": "vipllava",
            "vision_config": {"model_type": "clip_vision_model", **vision},
            "text_config": {**text, "vocab_size": ids["vocab"]},
            "image_token_index": ids["<image>"],
            "vision_feature_layers": [-2, -1],
            "pad_token_id": ids["<pad>"],
            "image_seq_length": (IMAGE_SIZE // PATCH) ** 2,
        }
        processor = {
            "processor_class": "LlavaProcessor",
            "patch_size": PATCH,
            "image_token": "<image>",
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        }
        image = ImageProcessor.from_dict(
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": IMAGE_SIZE},
                "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            }
        )
        template = VIP_TEMPLATE
    else:
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
            "cross_layer_interval": 2,
            "use_resampler": True,
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
                "image_size": IMAGE_SIZE,
                "patch_size": PATCH,
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
            {"image_processor_type": "IdeficsImageProcessor", "image_size": IMAGE_SIZE}
        )
        template = IDEFICS_TEMPLATE
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "processor_config.json").write_text(
        json.dumps({**processor, "image_processor": image.to_dict()}, indent=2)
    )
    (folder / "chat_template.jinja").write_text(template)


def accuracy(model_dir: Path, family: str, n: int = 200, seed: int = 12345) -> dict[str, float]:
    """Greedy answers to n freshly generated questions per type, exact match."""
    from vlmkit.vlm import VLM

    vlm = VLM.load(model_dir)
    rng = random.Random(seed)
    right: Counter = Counter()
    seen: defaultdict = defaultdict(int)
    for kind in QUESTION_TYPES[family]:
        for _ in range(n):
            ex = make_example(rng, kind, IMAGE_SIZE)
            content = [{"type": "image", "image": im} for im in ex.images] + [
                {"type": "text", "text": ex.question}
            ]
            answer = vlm.chat([{"role": "user", "content": content}], max_new_tokens=24)
            right[kind] += answer.strip() == ex.answer
            seen[kind] += 1
    return {k: right[k] / seen[k] for k in seen}


def build(
    out: Path,
    family: str,
    *,
    rows: int,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    eval_rows: int = 200,
) -> dict[str, float]:
    """Train a demo model into out/run/final; returns held-out accuracy per question type (eval_rows each)."""
    from vlmkit.train.finetune import FinetuneConfig, finetune

    out = Path(out)
    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    write_configs(base, family, build_tokenizer(base, family))
    data = write_dataset(out / "data", rows, family=family, seed=seed, size=IMAGE_SIZE)
    torch.manual_seed(seed)
    finetune(
        FinetuneConfig(
            data=str(data),
            output_dir=str(out / "run"),
            init_config=str(base / "config.json"),
            processor=str(base),
            train="full",
            max_steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=min(200, steps // 10),
            min_lr_ratio=0.05,
            weight_decay=0.01,
            max_length=256,
            seed=seed,
            save_every=500,
            resume=True,
        )
    )
    return accuracy(out / "run" / "final", family, n=eval_rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--family", choices=sorted(QUESTION_TYPES), default="vipllava")
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    print(
        json.dumps(
            build(
                args.out,
                args.family,
                rows=args.rows,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
            )
        )
    )


if __name__ == "__main__":
    main()

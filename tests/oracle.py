"""Tiny random-weight reference models built with transformers (the test oracle) and their inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VISION = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=30,
    patch_size=6,
    projection_dim=16,
)
TEXT = dict(
    model_type="llama",
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=128,
    max_position_embeddings=512,
)
IMAGE_TOKEN = 120


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> torch.nn.Module:
    """Overwrite every parameter with noise (norm weights around 1), so no zero or unit init hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm_weight = name.endswith("weight") and p.dim() == 1 and "norm" in name.lower()
            p.copy_((1 + noise if is_norm_weight else noise * 3 if p.dim() == 1 else noise).to(p.dtype))
    return model


def hf_llava_config(
    model_type: str = "vipllava", *, text: dict | None = None, vision: dict | None = None, **top
):
    from transformers import LlavaConfig, VipLlavaConfig

    cls = VipLlavaConfig if model_type == "vipllava" else LlavaConfig
    return cls(
        text_config={**TEXT, **(text or {})},
        vision_config={**VISION, **(vision or {})},
        image_token_index=IMAGE_TOKEN,
        **top,
    )


def hf_llava_model(config, seed: int = 0):
    from transformers import LlavaForConditionalGeneration, VipLlavaForConditionalGeneration

    cls = (
        VipLlavaForConditionalGeneration if config.model_type == "vipllava" else LlavaForConditionalGeneration
    )
    torch.manual_seed(seed)
    return randomize_(cls(config), seed).eval()


def tokens_per_image(config) -> int:
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    keeps_cls = config.model_type == "llava" and config.vision_feature_select_strategy == "full"
    return n + int(keeps_cls)


def llava_inputs(
    config,
    *,
    batch: int = 2,
    seq: int = 12,
    images_per_row: int = 1,
    shorter: tuple[int, ...] = (),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """input_ids with `<image>` runs; row b has `shorter[b]` fewer text tokens and is left-padded to the
    longest row (pad id 0, attention_mask 0); pixel_values for every image, rows in order."""
    g = torch.Generator().manual_seed(seed)
    p = tokens_per_image(config)
    v = config.vision_config
    rows = []
    for b in range(batch):
        parts = [torch.randint(3, 100, (2,), generator=g)]
        for _ in range(images_per_row):
            parts += [torch.full((p,), IMAGE_TOKEN), torch.randint(3, 100, (2,), generator=g)]
        cut = shorter[b] if b < len(shorter) else 0
        parts.append(torch.randint(3, 100, (seq - cut,), generator=g))
        rows.append(torch.cat(parts))
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, length - len(r) :] = r
        mask[b, length - len(r) :] = 1
    pixel_values = torch.randn(batch * images_per_row, 3, v.image_size, v.image_size, generator=g)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values}


def save_published_layout(hf_folder: Path, out: Path) -> Path:
    """Rewrite a transformers-5-saved folder in the hub's layout (`vision_tower.vision_model.*`, plus a
    persisted `position_ids` buffer as 4.3x checkpoints hold) with the published config key names."""
    shutil.copytree(hf_folder, out, dirs_exist_ok=True)
    sd = load_file(str(hf_folder / "model.safetensors"))
    sd = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in sd.items()}
    n = sd["vision_tower.vision_model.embeddings.position_embedding.weight"].shape[0]
    sd["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(n)[None]
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    if cfg["model_type"] == "vipllava":
        cfg["vision_feature_layers"] = cfg.pop("vision_feature_layer")
    text = cfg["text_config"]
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def save_state_dict_layout(hf_model, out: Path, config_folder: Path) -> Path:
    """A folder whose keys are transformers 5's in-memory names (`model.language_model.*`, `lm_head.*`)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_folder / "config.json", out / "config.json")
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# -- IDEFICS ----------------------------------------------------------------------------------

IDEFICS_VISION = dict(
    embed_dim=24,
    image_size=28,
    patch_size=7,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=40,
)
IDEFICS_TEXT = dict(
    vocab_size=100,
    additional_vocab_size=2,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    cross_layer_interval=2,
)
FAKE_TOKEN, IMAGE_TOKEN_IDEFICS = 100, 101  # the two additional-vocabulary ids


def hf_idefics_config(*, vision: dict | None = None, perceiver: dict | None = None, **top):
    from transformers import IdeficsConfig

    kwargs = {**IDEFICS_TEXT, **top}
    return IdeficsConfig(
        vision_config={**IDEFICS_VISION, **(vision or {})},
        perceiver_config={
            "resampler_n_latents": 3,
            "resampler_depth": 2,
            "resampler_n_heads": 2,
            "resampler_head_dim": 8,
            **(perceiver or {}),
        },
        **kwargs,
    )


def hf_idefics_model(config, seed: int = 0):
    from transformers import IdeficsForVisionText2Text

    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config)
    with torch.no_grad():  # alphas away from zero: zero gates hide every cross-attention bug
        randomize_(model, seed)
        g = torch.Generator().manual_seed(seed + 1)
        for block in model.model.gated_cross_attn_layers:
            for alpha in (block.alpha_cross_attn, block.alpha_dense):
                alpha.copy_(torch.rand(alpha.shape, generator=g) * 1.5 + 0.3)
    return model.eval()


def idefics_inputs(config, rows: list[list], *, seed: int = 0, image_size: int | None = None):
    """rows: per sample a list of ints (that many random text tokens) and "img" (an image), e.g.
    [[3, "img", 4, "img", 2], ["img", 5]]. Samples are left-padded to one length; pixel_values are padded
    with zero images to the batch's largest image count. image_attention_mask: each token attends to the
    latest image at or before it, as the reference processor builds it."""
    g = torch.Generator().manual_seed(seed)
    vocab = config.vocab_size
    seqs, masks = [], []
    n_images = [sum(1 for part in r if part == "img") for r in rows]
    N = max(n_images)
    for r in rows:
        ids, img_mask, current = [1], [[0] * N], -1
        for part in r:
            if part == "img":
                current += 1
                ids += [FAKE_TOKEN, IMAGE_TOKEN_IDEFICS, FAKE_TOKEN]
                img_mask += [[int(n == current) for n in range(N)]] * 3
            else:
                ids += torch.randint(3, vocab, (part,), generator=g).tolist()
                img_mask += [[int(n == current) for n in range(N)]] * part
        seqs.append(ids)
        masks.append(img_mask)
    T = max(len(s) for s in seqs)
    B = len(rows)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    image_attention_mask = torch.zeros(B, T, N, dtype=torch.long)
    for b, (ids, m) in enumerate(zip(seqs, masks, strict=True)):
        input_ids[b, T - len(ids) :] = torch.tensor(ids)
        attention_mask[b, T - len(ids) :] = 1
        image_attention_mask[b, T - len(ids) :] = torch.tensor(m, dtype=torch.long).reshape(len(ids), N)
    size = image_size or config.vision_config.image_size
    pixel_values = torch.zeros(B, N, 3, size, size)
    for b, n in enumerate(n_images):
        pixel_values[b, :n] = torch.randn(n, 3, size, size, generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_attention_mask": image_attention_mask,
    }


# -- tokenizers and processor folders ------------------------------------------------------------

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.",
    "What shape is inside the red rectangle? The circle is blue. How many triangles are there? Two.",
    "User: describe the image. Assistant: a cat sitting on a mat, héllo wörld 日本語 ✓ emoji 🙂",
    "Which image has a circle, the first or the second? The first one has a star and a square.",
] * 10


def build_tokenizer(
    folder: Path,
    *,
    style: str = "metaspace",
    extra_special: tuple[str, ...] = ("<image>",),
    additional_special_tokens: tuple[str, ...] = (),
    padding_side: str = "left",
    pad_token: str | None = "<pad>",
    published_layout: bool = False,
    vocab_size: int = 400,
) -> Path:
    """Train a small BPE with the `tokenizers` library and save it the way real checkpoints hold it:
    `metaspace` is LLaMA's SentencePiece-style BPE with byte fallback, `bytelevel` GPT-2 style. BOS comes from
    the post-processor. published_layout also writes special_tokens_map.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    if style == "metaspace":
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tk.decoder = decoders.Sequence(
            [
                decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                decoders.ByteFallback(),
                decoders.Fuse(),
            ]
        )
        alphabet: list[str] = []
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    if style == "metaspace":  # byte-fallback pieces are ordinary vocabulary entries, as in LLaMA
        model = json.loads(tk.to_str())["model"]
        vocab = dict(model["vocab"])
        for i in range(256):
            vocab.setdefault(f"<0x{i:02X}>", len(vocab))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tk.model = models.BPE(
            vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True
        )
    specials = [*extra_special, *additional_special_tokens] + ([pad_token] if pad_token else [])
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(specials)])
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    tk.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if pad_token:
        special["pad_token"] = pad_token
    if additional_special_tokens:
        special["additional_special_tokens"] = list(additional_special_tokens)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "padding_side": padding_side,
        "model_max_length": 4096,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if published_layout:
        (folder / "special_tokens_map.json").write_text(json.dumps(special))
    else:
        config.update(special)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder

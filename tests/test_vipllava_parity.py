"""ViP-LLaVA / LLaVA-1.5 logits and loss against transformers on tiny random configs."""

from __future__ import annotations

import random

import pytest
import torch
from oracle import (
    hf_llava_config,
    hf_llava_model,
    llava_inputs,
    save_published_layout,
    save_state_dict_layout,
)

import vlmkit

TOL = 1e-4

CONFIGS = {
    "vipllava-mha-mixed-layers": ("vipllava", dict(vision_feature_layers=[-2, -5, 0, 3]), {}),
    "vipllava-gqa-theta": (
        "vipllava",
        dict(vision_feature_layers=[-1, 2]),
        dict(num_key_value_heads=2, rope_theta=500000.0),
    ),
    "vipllava-single-layer": ("vipllava", dict(vision_feature_layers=-2), dict(num_key_value_heads=1)),
    "llava-default": ("llava", dict(vision_feature_layer=-2), dict(num_key_value_heads=2)),
    "llava-full-nobias": (
        "llava",
        dict(vision_feature_layer=1, vision_feature_select_strategy="full", multimodal_projector_bias=False),
        {},
    ),
    "llava-multi-layer": ("llava", dict(vision_feature_layer=[-3, -1]), {}),
    "llava-linear-rope": ("llava", dict(), dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "vipllava-llama3-rope": (
        "vipllava",
        dict(vision_feature_layers=[-2, 1]),
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        ),
    ),
}


def build(name: str, tmp_path_factory, seed: int = 0):
    model_type, top, text = CONFIGS[name]
    text = dict(text)
    rope = text.pop("rope_scaling", None)
    theta = text.pop("rope_theta", 10000.0)
    text["rope_parameters"] = {"rope_type": "default", **(rope or {}), "rope_theta": theta}
    cfg = hf_llava_config(model_type, text=text, **top)
    hf = hf_llava_model(cfg, seed=seed)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    return cfg, hf, folder


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path_factory):
    cfg, hf, folder = build(name, tmp_path_factory)
    model = vlmkit.load_model(folder)
    inputs = llava_inputs(cfg, batch=2, shorter=(0, 4))  # row 1 is left-padded by 4
    with torch.no_grad():
        ref = hf(**inputs).logits
        out = model(**inputs).logits
    assert out.shape == ref.shape
    assert max_diff(out, ref, inputs["attention_mask"]) < TOL


@pytest.mark.parametrize("name", ["vipllava-gqa-theta", "llava-default"])
def test_text_only_and_two_images_per_row(name, tmp_path_factory):
    cfg, hf, folder = build(name, tmp_path_factory)
    model = vlmkit.load_model(folder)
    text = llava_inputs(cfg, images_per_row=0)
    text.pop("pixel_values")
    two = llava_inputs(cfg, images_per_row=2, seed=3)
    with torch.no_grad():
        for inputs in (text, two):
            assert max_diff(model(**inputs).logits, hf(**inputs).logits) < TOL


@pytest.mark.parametrize("name", ["vipllava-mha-mixed-layers", "llava-full-nobias"])
def test_loss_matches_transformers(name, tmp_path_factory):
    cfg, hf, folder = build(name, tmp_path_factory)
    model = vlmkit.load_model(folder)
    inputs = llava_inputs(cfg, shorter=(0, 2))
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = hf(**inputs, labels=labels).loss
        out = model(**inputs, labels=labels).loss
    assert out is not None and abs(out.item() - ref.item()) < 1e-5


def test_image_features_are_the_reference_projection(tmp_path_factory):
    cfg, hf, folder = build("vipllava-mha-mixed-layers", tmp_path_factory)
    model = vlmkit.load_model(folder)
    pixels = llava_inputs(cfg)["pixel_values"]
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=pixels).pooler_output
        out = model.get_image_features(pixels)
    assert max_diff(out, ref) < TOL


def test_a_perturbed_weight_is_detected(tmp_path_factory):
    """The comparison is sensitive: one vision bias nudged by 1e-2 moves the logits past the tolerance."""
    cfg, hf, folder = build("vipllava-mha-mixed-layers", tmp_path_factory)
    model = vlmkit.load_model(folder)
    inputs = llava_inputs(cfg)
    with torch.no_grad():
        model.vision_tower.vision_model.encoder.layers[0].mlp.fc1.bias.add_(1e-2)
        assert max_diff(model(**inputs).logits, hf(**inputs).logits) > TOL


def random_config(rng: random.Random) -> tuple[str, dict, dict, dict]:
    """A config drawn at random: sizes, head layout, feature layers, strategy, activations."""
    model_type = rng.choice(["vipllava", "llava"])
    heads = rng.choice([2, 4])
    text = dict(
        num_attention_heads=heads,
        num_key_value_heads=rng.choice([h for h in (1, 2, 4) if heads % h == 0]),
        hidden_size=heads * rng.choice([8, 16]),
        intermediate_size=rng.choice([40, 64]),
        num_hidden_layers=rng.choice([1, 2]),
        rms_norm_eps=rng.choice([1e-5, 1e-6]),
        rope_parameters={"rope_type": "default", "rope_theta": rng.choice([10000.0, 1e6])},
    )
    n_vis = rng.choice([2, 3, 5])
    vision = dict(
        num_hidden_layers=n_vis,
        hidden_size=rng.choice([16, 24]),
        num_attention_heads=rng.choice([2, 4]),
        image_size=rng.choice([24, 36]),
        patch_size=rng.choice([6, 12]),
        hidden_act=rng.choice(["quick_gelu", "gelu"]),
    )
    layers = rng.sample(range(-n_vis - 1, n_vis + 1), k=rng.choice([1, 2, 3]))
    if model_type == "vipllava":
        top = dict(vision_feature_layers=layers, projector_hidden_act=rng.choice(["gelu", "silu"]))
    else:
        top = dict(
            vision_feature_layer=layers[0] if len(layers) == 1 else layers,
            vision_feature_select_strategy=rng.choice(["default", "full"]),
        )
    return model_type, top, text, vision


@pytest.mark.parametrize("seed", range(4))
def test_random_configs(seed, tmp_path):
    """Configs nobody wrote by hand, both key layouts."""
    model_type, top, text, vision = random_config(random.Random(seed))
    cfg = hf_llava_config(model_type, text=text, vision=vision, **top)
    hf = hf_llava_model(cfg, seed=seed)
    hf.save_pretrained(tmp_path / "hf")
    published = save_published_layout(tmp_path / "hf", tmp_path / "published")
    inputs = llava_inputs(cfg, shorter=(0, 3), seed=seed)
    with torch.no_grad():
        ref = hf(**inputs).logits
        for folder in (tmp_path / "hf", published):
            out = vlmkit.load_model(folder)(**inputs).logits
            assert max_diff(out, ref, inputs["attention_mask"]) < TOL, (folder, model_type, top, text, vision)


def test_all_key_layouts_load_the_same_weights(tmp_path_factory, tmp_path):
    cfg, hf, folder = build("llava-default", tmp_path_factory)
    published = save_published_layout(folder, tmp_path / "published")
    in_memory = save_state_dict_layout(hf, tmp_path / "state_dict", folder)
    models = [vlmkit.load_model(f) for f in (folder, published, in_memory)]
    ref = models[0].state_dict()
    for m in models[1:]:
        sd = m.state_dict()
        assert sd.keys() == ref.keys()
        assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_tied_word_embeddings(tmp_path):
    cfg = hf_llava_config("llava", tie_word_embeddings=True)
    hf = hf_llava_model(cfg)
    hf.tie_weights()
    hf.save_pretrained(tmp_path)
    model = vlmkit.load_model(tmp_path)
    lm = model.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    inputs = llava_inputs(cfg)
    with torch.no_grad():
        assert max_diff(model(**inputs).logits, hf(**inputs).logits) < TOL


def test_bfloat16_load(tmp_path_factory):
    cfg, hf, folder = build("vipllava-gqa-theta", tmp_path_factory)
    model = vlmkit.load_model(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    inputs = llava_inputs(cfg)
    with torch.no_grad():
        out = model(**inputs).logits
        ref = hf(**inputs).logits
    assert out.dtype == torch.bfloat16
    assert max_diff(out, ref) < 0.15  # bf16 rounding on values of magnitude ~2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_load(tmp_path_factory):
    cfg, hf, folder = build("llava-default", tmp_path_factory)
    model = vlmkit.load_model(folder, device="cuda")
    inputs = llava_inputs(cfg)
    with torch.no_grad():
        out = model(**{k: v.cuda() for k, v in inputs.items()}).logits.cpu()
        assert max_diff(out, hf(**inputs).logits) < 1e-3

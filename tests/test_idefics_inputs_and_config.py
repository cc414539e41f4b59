"""IDEFICS: every input error names the sizes; config.json in every published form."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import hf_idefics_config, hf_idefics_model, idefics_inputs

import vlmkit
from vlmkit.idefics import IdeficsConfig

ROWS = [[3, "img", 4, "img", 2], ["img", 5]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = hf_idefics_config(use_resampler=True)
    folder = tmp_path_factory.mktemp("idefics")
    hf_idefics_model(cfg).save_pretrained(folder)
    return cfg, vlmkit.load_model(folder), idefics_inputs(cfg, ROWS)


def call(model, inputs, **change):
    return model(**{**inputs, **change})


def test_mask_image_count_vs_pixel_count(setup):
    _, model, inputs = setup
    with pytest.raises(ValueError, match="refers to 2 images per sample but 1 images per sample were given"):
        call(model, inputs, pixel_values=inputs["pixel_values"][:, :1])


def test_mask_length_vs_input_length(setup):
    _, model, inputs = setup
    T = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=f"covers {T - 1} tokens but input_ids have {T} tokens"):
        call(model, inputs, image_attention_mask=inputs["image_attention_mask"][:, 1:])


def test_batch_sizes(setup):
    _, model, inputs = setup
    with pytest.raises(ValueError, match="images are given for batch size 1 but input_ids have batch size 2"):
        call(model, inputs, pixel_values=inputs["pixel_values"][:1])
    with pytest.raises(ValueError, match="image_attention_mask has batch size 1"):
        call(model, inputs, image_attention_mask=inputs["image_attention_mask"][:1])


def test_missing_or_misshapen_mask(setup):
    _, model, inputs = setup
    with pytest.raises(ValueError, match="image_attention_mask .* is required with images"):
        call(model, inputs, image_attention_mask=None)
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len, num_images\)"):
        call(model, inputs, image_attention_mask=inputs["image_attention_mask"][..., 0])
    with pytest.raises(ValueError, match="marks images but no images were given"):
        call(model, inputs, pixel_values=None)


def test_pixel_shapes(setup):
    _, model, inputs = setup
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, num_images, channels"):
        call(model, inputs, pixel_values=inputs["pixel_values"][:, 0])
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        call(model, inputs, pixel_values=torch.zeros(2, 2, 3, 35, 35))
    with pytest.raises(ValueError, match="smaller than one 7-pixel patch"):
        call(model, inputs, pixel_values=torch.zeros(2, 2, 3, 5, 5), interpolate_pos_encoding=True)


def test_several_image_inputs_at_once(setup):
    cfg, model, inputs = setup
    emb = torch.zeros(2, 2, 17, cfg.vision_config.embed_dim)
    with pytest.raises(ValueError, match="only one of"):
        call(model, inputs, image_encoder_embeddings=emb)
    with pytest.raises(ValueError, match="exactly one of"):
        model.encode_images()


def test_perceiver_embeddings_need_a_resampler(tmp_path):
    cfg = hf_idefics_config(use_resampler=False)
    hf_idefics_model(cfg).save_pretrained(tmp_path)
    model = vlmkit.load_model(tmp_path)
    inputs = idefics_inputs(cfg, ROWS)
    inputs.pop("pixel_values")
    with pytest.raises(ValueError, match="no resampler"):
        model(**inputs, perceiver_embeddings=torch.zeros(2, 2, 3, cfg.vision_config.embed_dim))


def test_ids_outside_base_plus_extra_vocabulary(setup):
    _, model, inputs = setup
    ids = inputs["input_ids"].clone()
    ids[0, -1] = 102  # vocab 100 + 2 extra rows
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 102\): \[102\]"):
        call(model, inputs, input_ids=ids)


# -- config ------------------------------------------------------------------------------------

# HuggingFaceM4/idefics-9b as published (transformers 4.28 era): flat resampler keys, no perceiver_config,
# a nested vision_config that names the width embed_dim, no rope fields.
IDEFICS_9B = {
    "additional_vocab_size": 2,
    "alpha_initializer": "zeros",
    "alpha_type": "float",
    "alphas_initializer_range": 0.0,
    "architectures": ["IdeficsForVisionText2Text"],
    "bos_token_id": 1,
    "cross_layer_activation_function": "swiglu",
    "cross_layer_interval": 4,
    "dropout": 0.0,
    "eos_token_id": 2,
    "ffn_dim": 11008,
    "freeze_lm_head": False,
    "freeze_text_layers": False,
    "freeze_text_module_exceptions": [],
    "freeze_vision_layers": False,
    "freeze_vision_module_exceptions": [],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 2048,
    "max_sequence_length": 2048,
    "model_type": "idefics",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "pad_token_id": 0,
    "qk_layer_norms": False,
    "qk_layer_norms_perceiver": False,
    "resampler_depth": 6,
    "resampler_head_dim": 96,
    "resampler_n_heads": 16,
    "resampler_n_latents": 64,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.28.0.dev0",
    "use_cache": True,
    "use_resampler": True,
    "vision_config": {
        "_name_or_path": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        "embed_dim": 1280,
        "image_size": 224,
        "intermediate_size": 5120,
        "patch_size": 14,
        "num_attention_heads": 16,
        "num_hidden_layers": 32,
        "vision_model_name": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    },
    "vocab_size": 32000,
    "word_embed_proj_dim": 4096,
}

# An older form with every vision and resampler field flat at the top level.
FLAT = {k: v for k, v in IDEFICS_9B.items() if k != "vision_config"}
FLAT.update(
    vision_embed_dim=1280,
    vision_image_size=224,
    vision_intermediate_size=5120,
    vision_patch_size=14,
    vision_num_attention_heads=16,
    vision_num_hidden_layers=32,
    resampler_n_latents=32,
)


def hf_parse(d):
    from transformers import IdeficsConfig as HFIdeficsConfig

    return HFIdeficsConfig(**{k: v for k, v in copy.deepcopy(d).items() if k != "model_type"})


def test_published_9b_reads_like_transformers():
    ours, ref = IdeficsConfig.from_hf(IDEFICS_9B), hf_parse(IDEFICS_9B)
    for name in (
        "vocab_size",
        "additional_vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "cross_layer_interval",
        "use_resampler",
        "qk_layer_norms",
        "alpha_type",
        "freeze_text_layers",
        "freeze_vision_layers",
        "freeze_lm_head",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    v, rv = ours.vision_config, ref.vision_config
    assert (
        v.hidden_size,
        v.image_size,
        v.intermediate_size,
        v.patch_size,
        v.num_hidden_layers,
        v.num_attention_heads,
        v.hidden_act,
        v.layer_norm_eps,
    ) == (
        rv.embed_dim,
        rv.image_size,
        rv.intermediate_size,
        rv.patch_size,
        rv.num_hidden_layers,
        rv.num_attention_heads,
        rv.hidden_act,
        rv.layer_norm_eps,
    )
    p, rp = ours.perceiver_config, ref.perceiver_config
    assert (p.resampler_n_latents, p.resampler_depth, p.resampler_n_heads, p.resampler_head_dim) == (
        rp.resampler_n_latents,
        rp.resampler_depth,
        rp.resampler_n_heads,
        rp.resampler_head_dim,
    )
    assert ours.num_cross_layers == 8 and ours.total_vocab_size == 32002


def test_flat_keys():
    c = IdeficsConfig.from_hf(FLAT)
    assert c.vision_config.hidden_size == 1280 and c.vision_config.num_hidden_layers == 32
    assert c.perceiver_config.resampler_n_latents == 32  # flat resampler keys are read
    nested = {**FLAT, "perceiver_config": {"resampler_n_latents": 16}, "vision_config": {"embed_dim": 64}}
    c = IdeficsConfig.from_hf(nested)
    assert c.perceiver_config.resampler_n_latents == 16 and c.vision_config.hidden_size == 64


def test_omitted_fields_are_reference_defaults():
    ours, ref = IdeficsConfig.from_hf({"model_type": "idefics"}), hf_parse({})
    assert (
        ours.hidden_size,
        ours.vision_config.hidden_size,
        ours.vision_config.hidden_act,
        ours.perceiver_config.resampler_head_dim,
        ours.freeze_text_layers,
    ) == (
        ref.hidden_size,
        ref.vision_config.embed_dim,
        ref.vision_config.hidden_act,
        ref.perceiver_config.resampler_head_dim,
        ref.freeze_text_layers,
    )


def test_to_hf_round_trip_and_transformers_reads_it():
    c = IdeficsConfig.from_hf(IDEFICS_9B)
    assert IdeficsConfig.from_hf(c.to_hf()) == c
    ref = hf_parse(c.to_hf())
    assert ref.vision_config.embed_dim == 1280 and ref.perceiver_config.resampler_n_latents == 64


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cross_layer_interval": 5}, "multiple of cross_layer_interval"),
        ({"alpha_type": "matrix"}, "alpha_type"),
        ({"freeze_vision_module_exceptions": ["Conv2d"]}, "unknown module types \\['Conv2d'\\]"),
        ({"hidden_size": 4097}, "not a multiple of num_attention_heads"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "unsupported rope type 'dynamic'"),
        ({"model_type": "llava"}, "is not 'idefics'"),
    ],
)
def test_bad_configs(change, message):
    with pytest.raises(ValueError, match=message):
        IdeficsConfig.from_hf({**IDEFICS_9B, **change})

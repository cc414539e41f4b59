"""config.json in every published form reads to the same values transformers reads."""

from __future__ import annotations

import copy

import pytest

from vlmkit.clip import CLIPVisionConfig
from vlmkit.llama import LlamaConfig
from vlmkit.vipllava import VipLlavaConfig

# The published llava-hf/vip-llava-7b-hf config (transformers 4.36 era): the text config leaves out every
# field equal to the llama default, the old plural `vision_feature_layers`, no rope fields at all.
VIP_LLAVA_7B = {
    "architectures": ["VipLlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "vipllava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "projector_layernorm_eps": 1e-05,
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layers": [-2, -5, -8, -11, 6],
    "vocab_size": 32064,
}

# llava-hf/llava-1.5-7b-hf as published, and an older form with `rope_theta`/`rope_scaling` spelled out.
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}

OLD_ROPE = copy.deepcopy(LLAVA_15_7B)
OLD_ROPE["text_config"].update(
    rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0}, num_key_value_heads=8
)

NO_SUBCONFIGS = {"model_type": "vipllava"}


def hf_parse(d):
    from transformers import AutoConfig

    d = copy.deepcopy(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


@pytest.mark.parametrize(
    "raw",
    [VIP_LLAVA_7B, LLAVA_15_7B, OLD_ROPE, NO_SUBCONFIGS],
    ids=["vip-llava-7b", "llava-1.5-7b", "old-rope", "no-subconfigs"],
)
def test_reads_like_transformers(raw):
    ours = VipLlavaConfig.from_hf(raw)
    ref = hf_parse(raw)
    t, rt = ours.text_config, ref.text_config
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "hidden_act",
    ):
        assert getattr(t, name) == getattr(rt, name), name
    rope = rt.rope_parameters
    assert t.rope_theta == rope["rope_theta"]
    assert (t.rope_scaling or {}).get("rope_type", "default") == rope["rope_type"]
    v, rv = ours.vision_config, ref.vision_config
    for name in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "hidden_act",
        "layer_norm_eps",
    ):
        assert getattr(v, name) == getattr(rv, name), name
    assert ours.feature_layers == (
        list(ref.vision_feature_layer)
        if not isinstance(ref.vision_feature_layer, int)
        else [ref.vision_feature_layer]
    )
    assert ours.image_token_index == ref.image_token_index
    assert ours.tie_word_embeddings == ref.tie_word_embeddings


def test_published_vip_llava_sizes():
    c = VipLlavaConfig.from_hf(VIP_LLAVA_7B)
    assert (c.text_config.hidden_size, c.text_config.num_hidden_layers, c.text_config.vocab_size) == (
        4096,
        32,
        32064,
    )
    assert c.vision_config.num_patches == 576 and c.image_tokens_per_image == 576
    assert c.feature_layers == [-2, -5, -8, -11, 6]
    assert c.pad_token_id == 32001


def test_to_hf_round_trips():
    for raw in (VIP_LLAVA_7B, LLAVA_15_7B, OLD_ROPE):
        c = VipLlavaConfig.from_hf(raw)
        assert VipLlavaConfig.from_hf(c.to_hf()) == c
        hf_parse(c.to_hf())  # transformers accepts what we write


def test_unknown_keys_are_ignored():
    raw = copy.deepcopy(LLAVA_15_7B)
    raw["something_new"] = 1
    raw["text_config"]["another_new_field"] = [1, 2]
    assert VipLlavaConfig.from_hf(raw) == VipLlavaConfig.from_hf(LLAVA_15_7B)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vision_feature_layers": [30]}, "out of range"),
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy"),
        ({"text_config": {"model_type": "mistral"}}, "'mistral' is not supported"),
        ({"text_config": {"hidden_size": 100, "num_attention_heads": 3, "head_dim": 0}}, "head_dim"),
        ({"text_config": {"num_attention_heads": 32, "num_key_value_heads": 5}}, "multiple of"),
        ({"text_config": {"rope_scaling": {"type": "yarn", "factor": 2.0}}}, "unsupported rope type 'yarn'"),
        ({"vision_config": {"model_type": "siglip_vision_model"}}, "not supported"),
        ({"vision_config": {"hidden_act": "mish"}}, "unsupported activation"),
    ],
)
def test_bad_configs_name_the_field(change, message):
    raw = {**copy.deepcopy(VIP_LLAVA_7B), **change}
    with pytest.raises(ValueError, match=message):
        VipLlavaConfig.from_hf(raw)


def test_llama_rope_forms():
    new = LlamaConfig.from_hf({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})
    old = LlamaConfig.from_hf({"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert new == old and new.rope_theta == 1e6 and new.rope_scaling["factor"] == 4.0


def test_clip_list_sizes():
    c = CLIPVisionConfig.from_hf({"image_size": [336, 336], "patch_size": [14, 14]})
    assert c.num_patches == 576
    with pytest.raises(ValueError, match="non-square"):
        CLIPVisionConfig.from_hf({"image_size": [336, 224]})

"""Weight-only quantization: the formats' error bounds, the layer on every kernel path this machine has, whole
models against transformers with the same (dequantized) weights, quantized checkpoints, the demo models,
the engine, QLoRA, memory plans, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from checkpoints import build_idefics_checkpoint, build_llava_checkpoint
from families import idefics_reference_inputs, llava_reference_inputs
from PIL import Image
from safetensors import safe_open

import vlmkit
from vlmkit.cli import convert_command, generate_command, info_command, main
from vlmkit.demo.shapes import EXAMPLES, handmade
from vlmkit.plan import memory_plan
from vlmkit.quant import (
    GROUP_SIZES,
    QuantConfig,
    QuantLinear,
    cpu_int4_block_rows,
    dequantize,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_cpu_int4,
    unpack_int4,
)
from vlmkit.serve.engine import Engine, Request, SamplingParams
from vlmkit.train.finetune import FinetuneConfig, finetune
from vlmkit.weights import CheckpointError

TEXT = {"hidden_size": 64, "intermediate_size": 128}  # inputs every int4 group size up to 64 divides


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    folder, hf, proc = build_llava_checkpoint(tmp_path_factory.mktemp("qllava"), text=TEXT)
    return folder, hf, proc


@pytest.fixture(scope="module")
def idefics(tmp_path_factory):
    folder, hf, proc = build_idefics_checkpoint(
        tmp_path_factory.mktemp("qidefics"),
        hidden_size=64,
        intermediate_size=128,
        vision=dict(image_size=28, embed_dim=32),  # the cross-attention keys read 32-wide image features
    )
    return folder, hf, proc


def weights(n: int = 40, k: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3] *= 20  # an outlier row
    w[:, 5] += 0.3  # an offset column
    return w


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def test_int8_round_trip_is_within_half_a_step():
    w = weights()
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() <= 127
    err = (dequantize("int8", q, scale) - w).abs()
    assert (err <= scale.float()[:, None] / 2 * 1.0001 + 1e-7).all()
    assert torch.equal(scale, scale.bfloat16())  # the kernels' scales are exactly the ones used


@pytest.mark.parametrize("group", GROUP_SIZES[:3])
def test_int4_round_trip_is_within_half_a_step(group):
    w = weights(k=128 if group < 128 else 256)
    q, scale, zero = quantize_int4(w, group)
    assert q.shape == (w.shape[0], w.shape[1] // 2) and scale.shape == (w.shape[0], w.shape[1] // group)
    assert torch.equal(pack_int4(unpack_int4(q)), q) and unpack_int4(q).max() <= 15
    err = (dequantize("int4", q, scale, zero) - w).abs().view(w.shape[0], -1, group)
    # half a step, plus what rounding the zero to bf16 shifts the grid by
    bound = scale.float() / 2 + zero.float().abs() / 256 + 1e-7
    assert (err <= bound[..., None] * 1.0001).all()


def test_pack_int4_puts_the_even_column_in_the_low_nibble():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x21, 0x0F]]


# ---------------------------------------------------------------------------------------------
# The layer, on every path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("n", [40, 128])  # 40: not a whole block of the int4 CPU packing, which is padded
def test_quantized_linear_equals_the_dequantized_matmul(scheme, n, monkeypatch):
    w, bias = weights(n=n), torch.randn(n) * 0.1
    config = QuantConfig(scheme, 32 if scheme == "int4" else None)
    layer = QuantLinear.from_weight(w, bias, config)
    deq = layer.dequantize()
    for shape in [(1, 128), (4, 128), (2, 33, 128)]:
        x = torch.randn(shape)
        plain = layer(x)  # dequantize, then F.linear in x's dtype: fp32 rounding
        assert plain.shape == (*shape[:-1], n)
        assert (plain - F.linear(x, deq, bias)).abs().max() < 1e-5
    layer.to_cpu_kernels()
    assert layer.layout == "cpu"
    assert torch.equal(layer.dequantize(), deq)  # the kernel layout reads back exactly
    monkeypatch.setattr("vlmkit.quant.dense_rows", lambda scheme, dtype: 1 << 62)  # always the kernel
    with torch.no_grad():
        for shape in [(1, 128), (4, 128), (2, 33, 128)]:
            x = torch.randn(shape)
            got = layer(x)  # bf16 activations through the packed kernel, back in fp32
            want = F.linear(x.bfloat16().float(), deq, bias)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert (got - want).abs().max() < 2e-2 * want.abs().max()
            xb = x.bfloat16()
            assert layer(xb).dtype == torch.bfloat16
        last = torch.randn(2, 5, 128).bfloat16()[:, -1]  # a strided view, as a prompt's last position is
        assert torch.equal(layer(last), layer(last.contiguous()))
        monkeypatch.setattr("vlmkit.quant.dense_rows", lambda scheme, dtype: 8)  # 8 rows and more: one GEMM
        x = torch.randn(2, 33, 128)
        assert (layer(x) - F.linear(x, deq, bias)).abs().max() < 1e-5
        want = F.linear(x[:, :3].bfloat16().float(), deq, bias)  # 6 rows: the kernel
        assert (layer(x[:, :3]) - want).abs().max() < 2e-2 * want.abs().max()


def test_int4_cpu_block_is_found_on_this_cpu():
    """The packing's block of rows is what the CPU's kernels use (64 with AVX-512, 32 with AVX2), and a
    weight of exactly one block round-trips through it."""
    block = cpu_int4_block_rows()
    expected = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability())
    assert block == expected or expected is None
    q = torch.randint(0, 16, (block, 64), dtype=torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    assert torch.equal(unpack_cpu_int4(packed.reshape(block, -1), block), q)


def test_int4_cpu_layout_is_read_back_for_every_row_count():
    """`dequantize` reads PyTorch's int4 packing by a documented layout; this pins it to the op itself."""
    for n in (16, 64, 100, 192, 320):
        layer = QuantLinear.from_weight(weights(n=n, k=64), None, QuantConfig("int4", 32))
        plain = layer.dequantize()
        layer.to_cpu_kernels()
        assert layer.qweight.shape[0] % cpu_int4_block_rows() == 0 and torch.equal(layer.dequantize(), plain)
        half = layer.dequantize(torch.bfloat16)  # the faster 16-bit path a prefill takes
        assert half.dtype == torch.bfloat16 and (half.float() - plain).abs().max() <= plain.abs().max() / 64


def test_int8_dequantizes_to_16_bits_within_rounding():
    layer = QuantLinear.from_weight(weights(), None, QuantConfig("int8"))
    plain = layer.dequantize()
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.allclose(layer.dequantize(dtype).float(), plain, rtol=1e-2, atol=1e-6)


def test_dense_rows_is_measured_for_each_scheme_and_dtype():
    from vlmkit.quant import dense_rows

    for scheme in ("int8", "int4"):
        rows = dense_rows(scheme, torch.bfloat16)
        assert rows >= 8 and dense_rows(scheme, torch.bfloat16) == rows  # measured once, then cached


def test_gradients_reach_the_input_through_a_frozen_quantized_layer():
    w = weights()
    layer = QuantLinear.from_weight(w, None, QuantConfig("int4", 32))
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    F.linear(xr, layer.dequantize()).square().sum().backward()
    assert (x.grad - xr.grad).abs().max() < 1e-4
    layer.to_cpu_kernels()  # the kernel layout differentiates the same way
    x2 = x.detach().clone().requires_grad_(True)
    layer(x2).square().sum().backward()
    assert (x2.grad - x.grad).abs().max() < 1e-5 * x.grad.abs().max()


# ---------------------------------------------------------------------------------------------
# Whole models against transformers with the same weights
# ---------------------------------------------------------------------------------------------


def dequantized_reference(hf: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """`hf` with every weight vlmkit quantized replaced by what the quantized layer stands for."""
    import copy

    from vlmkit.models import family_of
    from vlmkit.quant import quantized_layers
    from vlmkit.weights import remap_keys

    ref = copy.deepcopy(hf)
    state = ref.state_dict()
    family = family_of(model)
    ours_to_hf = remap_keys({k: k for k in state}, family.key_map, family.ignore)  # our name -> theirs
    for prefix, layer in quantized_layers(model):
        state[ours_to_hf[f"{prefix}.weight"]] = layer.dequantize()
    ref.load_state_dict(state)
    return ref


def llava_inputs(proc):
    return llava_reference_inputs(proc, "What shape is it?", [Image.new("RGB", (30, 30), "red")])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_llava_logits_equal_transformers_with_the_dequantized_weights(llava, quantize):
    folder, hf, proc = llava
    model = vlmkit.load_model(
        folder, quantize=quantize, group_size=32 if quantize == "int4" else None, inference=False
    )
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 7 * hf.config.text_config.num_hidden_layers + 1  # every decoder linear + LM head
    assert not any(isinstance(m, QuantLinear) for m in model.vision_tower.modules())
    ref = dequantized_reference(hf, model)
    inputs = llava_inputs(proc)
    with torch.no_grad():
        assert (model(**inputs).logits - ref(**inputs).logits).abs().max() < 1e-4


def test_idefics_logits_equal_transformers_with_the_dequantized_weights(idefics):
    folder, hf, proc = idefics
    model = vlmkit.load_model(folder, quantize="int4", group_size=32, inference=False)
    assert isinstance(model.lm_head.weight, QuantLinear)  # the decoupled head, through its linear_fn
    assert any(isinstance(m, QuantLinear) for m in model.model.gated_cross_attn_layers.modules())
    ref = dequantized_reference(hf, model)
    pictures = [Image.new("RGB", (28, 28), "red"), Image.new("RGB", (40, 20), "blue")]
    inputs = idefics_reference_inputs(proc, "Compare them.", pictures)
    with torch.no_grad():
        assert (model(**inputs).logits - ref(**inputs).logits).abs().max() < 1e-4


def test_vision_and_projector_are_quantized_only_when_asked(llava):
    folder, _, _ = llava
    model = vlmkit.load_model(folder, quantize="int8", quantize_parts=["vision", "projector"])
    assert any(isinstance(m, QuantLinear) for m in model.vision_tower.modules())
    assert any(isinstance(m, QuantLinear) for m in model.multi_modal_projector.modules())


def test_bf16_checkpoint_keeps_bf16_weights(llava, tmp_path):
    folder, _, _ = llava
    convert_command(str(folder), str(tmp_path / "bf16"), dtype="bfloat16")
    model = vlmkit.load_model(tmp_path / "bf16", quantize="int8")
    floats = {p.dtype for p in model.parameters()}
    assert floats == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Quantized checkpoints, info, plans
# ---------------------------------------------------------------------------------------------


def test_convert_quantize_round_trip(llava, tmp_path, capsys):
    folder, _, proc = llava
    out = tmp_path / "int4"
    assert main(["convert", str(folder), str(out), "--quantize", "int4", "--group-size", "32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "vlmkit",
        "version": 1,
        "scheme": "int4",
        "group_size": 32,
        "parts": ["language"],
    }
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("language_model.model.layers.0.mlp.down_proj.qweight").get_dtype() == "U8"
    assert "language_model.model.layers.0.mlp.down_proj.weight" not in keys
    loaded = vlmkit.load_model(out)  # as saved, not quantized again
    direct = vlmkit.load_model(folder, quantize="int4", group_size=32)
    inputs = llava_inputs(proc)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, direct(**inputs).logits)
    info = info_command(str(out))
    assert info["quantization"] == "int4, groups of 32 (language)"
    plan_bytes = info["memory"]["weight_bytes"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        file_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert plan_bytes == file_bytes  # the plan counts exactly what the file holds
    assert main(["info", str(out)]) == 0 and "quantization: int4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already quantized"):
        convert_command(str(out), str(tmp_path / "again"), quantize="int8")
    with pytest.raises(ValueError, match="already quantized"):
        vlmkit.load_model(out, quantize="int8")
    from transformers import AutoModelForImageTextToText

    with pytest.raises(Exception, match="vlmkit"):
        AutoModelForImageTextToText.from_pretrained(out)


IDEFICS_80B = {  # the published idefics-80b config.json, in its sizes
    "model_type": "idefics",
    "vocab_size": 32000,
    "additional_vocab_size": 2,
    "hidden_size": 8192,
    "intermediate_size": 22016,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "cross_layer_interval": 4,
    "qk_layer_norms": True,
    "use_resampler": True,
    "dtype": "bfloat16",
    "vision_config": {
        "embed_dim": 1280,
        "image_size": 224,
        "intermediate_size": 5120,
        "patch_size": 14,
        "num_attention_heads": 16,
        "num_hidden_layers": 32,
    },
    "perceiver_config": {
        "resampler_depth": 6,
        "resampler_head_dim": 96,
        "resampler_n_heads": 16,
        "resampler_n_latents": 64,
    },
}


def test_memory_plan_shows_idefics_80b_in_int4_fits_one_80gb_gpu(tmp_path):
    config = IDEFICS_80B  # the published idefics-80b config.json, in its sizes
    (tmp_path / "config.json").write_text(json.dumps(config))
    full = memory_plan(tmp_path, length=2048)
    int4 = memory_plan(tmp_path, quantize="int4", length=2048)
    int8 = memory_plan(tmp_path, quantize="int8", length=2048)
    assert 75e9 < full.parameters < 85e9 and 150e9 < full.weight_bytes < 170e9
    assert 38e9 < int4.weight_bytes < 50e9 < int8.weight_bytes < 90e9
    assert int4.total_bytes < 80e9
    assert int4.kv_cache_bytes == 80 * 2 * 8192 * 2048 * 2  # layers x (k, v) x width x tokens x bf16


# ---------------------------------------------------------------------------------------------
# The demo models, generation paths, the engine
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,name", [("vipllava", "demo"), ("idefics", "demo-idefics")])
def test_int8_demo_models_answer_the_handmade_set_as_full_precision_does(family, name):
    questions = [q for q in handmade()["questions"] if q["family"] == family]
    for q in questions:
        args = dict(
            images=[str(EXAMPLES / f"{n}.png") for n in q["images"]],
            visual_prompts=[json.dumps(p) for p in q["visual_prompts"]],
            max_new_tokens=24,
        )
        assert generate_command(q["question"], name, quantize="int8", **args) == generate_command(
            q["question"], name, **args
        ), q


@pytest.mark.parametrize("name", ["demo", "demo-idefics"])
def test_generate_beams_stream_and_engine_with_int4_weights(name):
    from vlmkit.bench import picture

    vlm = vlmkit.VLM.load(name, quantize="int4", batched=True)
    images = [picture(None)]
    prompt = "How many shapes are there?"
    greedy = vlm.generate(prompt, images=images, max_new_tokens=8)
    assert "".join(vlm.stream(prompt, images=images, max_new_tokens=8)) == greedy
    inputs = vlm.inputs(prompt, images)
    beams = vlm.model.generate(**inputs, max_new_tokens=6, num_beams=3)
    assert beams.shape[0] == 1 and beams.shape[1] > inputs["input_ids"].shape[1]
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=2, max_seq_len=256).start()
    try:
        texts = ["", "", ""]
        for i in range(3):  # the second and third reuse the first's prefix blocks and features

            def emit(ev, i=i):
                texts[i] += ev.text

            request = Request(
                inputs=vlm.inputs(prompt, images), params=SamplingParams(max_tokens=8), emit=emit
            )
            engine.submit(request)
            assert request.done.wait(60)
    finally:
        engine.stop(10)
    assert texts == [greedy] * 3


# ---------------------------------------------------------------------------------------------
# QLoRA
# ---------------------------------------------------------------------------------------------


def test_qlora_trains_adapters_on_a_frozen_int4_base(llava, tmp_path):
    from test_finetune import write_dataset

    folder, _, _ = llava
    data = write_dataset(tmp_path / "data", n=4)
    config = FinetuneConfig(
        data=str(data),
        output_dir=str(tmp_path / "qlora"),
        model=str(folder),
        train="lora",
        quantize="int4",
        group_size=32,
        max_steps=10,
        batch_size=4,
        lr=3e-2,
        lora_r=4,
        progress=False,
    )
    result = finetune(config)
    assert result.losses[-1] < result.losses[0] * 0.85, result.losses
    final = tmp_path / "qlora" / "final"
    assert (final / "adapter_model.safetensors").is_file()
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())  # only adapters: the base stayed frozen
    with pytest.raises(ValueError, match="QLoRA"):
        FinetuneConfig(data="d", output_dir="o", model=str(folder), quantize="int4").validate()
    argv = ["finetune", "--data", str(data), "--output-dir", str(tmp_path / "cli"), "--model", str(folder)]
    argv += "--train lora --quantize int8 --max-steps 1 --batch-size 4 --no-progress".split()
    assert main(argv) == 0


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_raise_value_errors(llava):
    folder, _, _ = llava
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        vlmkit.load_model(folder, quantize="int3")
    with pytest.raises(ValueError, match="group_size must be one of"):
        vlmkit.load_model(folder, quantize="int4", group_size=48)
    with pytest.raises(ValueError, match="does not divide"):
        vlmkit.load_model(folder, quantize="int4", group_size=128)  # 64 inputs
    with pytest.raises(ValueError, match="int4 only"):
        QuantConfig("int8", 32)
    with pytest.raises(ValueError, match="unknown parts"):
        vlmkit.load_model(folder, quantize="int8", quantize_parts=["everything"])
    with pytest.raises(ValueError, match="need quantize"):
        vlmkit.load_model(folder, group_size=32)
    assert issubclass(CheckpointError, ValueError)


def test_foreign_quantized_checkpoints_are_refused_by_name(llava, tmp_path):
    import shutil

    folder, _, _ = llava
    copy = Path(shutil.copytree(folder, tmp_path / "bnb"))
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bitsandbytes.*quantize at load"):
        vlmkit.load_model(copy)

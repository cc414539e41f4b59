"""Bad input gets a clear error; the preallocated KV cache reproduces a full forward."""

from __future__ import annotations

import pytest
import torch
from oracle import hf_llava_config, hf_llava_model, llava_inputs, tokens_per_image

import vlmkit
from vlmkit import fastpath
from vlmkit.fastpath import FusedLinears, column_major_reads_faster, dense, optimize_for_cpu_inference


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = hf_llava_config("vipllava", vision_feature_layers=[-1, 2], text=dict(num_key_value_heads=2))
    folder = tmp_path_factory.mktemp("m")
    hf_llava_model(cfg).save_pretrained(folder)
    return cfg, vlmkit.load_model(folder)


def test_image_token_count_mismatch_states_both_counts(setup):
    cfg, model = setup
    inputs = llava_inputs(cfg, batch=2)
    p = tokens_per_image(cfg)
    with pytest.raises(ValueError, match=rf"{2 * p} <image> tokens .* 1 image\(s\) give {p} features"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:1])
    ids = inputs["input_ids"].clone()
    ids[0, 2] = 5  # one image token fewer
    with pytest.raises(ValueError, match=rf"{2 * p - 1} <image> tokens .* give {2 * p} features"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"])


def test_image_tokens_without_pixels(setup):
    cfg, model = setup
    inputs = llava_inputs(cfg, batch=1)
    with pytest.raises(ValueError, match=r"0 image\(s\)"):
        model(input_ids=inputs["input_ids"])


def test_pixels_of_the_wrong_size(setup):
    cfg, model = setup
    inputs = llava_inputs(cfg, batch=1)
    with pytest.raises(
        ValueError, match=r"pixel_values must have shape \(batch, 3, 30, 30\); got \(1, 3, 32, 32\)"
    ):
        model(input_ids=inputs["input_ids"], pixel_values=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="num_images, channels, height, width"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][None])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.zeros(5, dtype=torch.long)), "shape \\(batch, seq_len\\); got \\(5,\\)"),
        (dict(input_ids=torch.zeros(1, 5)), "integer tensor"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
        (
            dict(input_ids=torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4)),
            "attention_mask shape",
        ),
        (
            dict(input_ids=torch.zeros(1, 5, dtype=torch.long), labels=torch.zeros(2, 5, dtype=torch.long)),
            "labels shape",
        ),
        (dict(input_ids=torch.tensor([[1, 2, 500]])), "outside the vocabulary \\[0, 128\\): \\[500\\]"),
        (dict(input_ids=torch.tensor([[1, -2]])), "outside the vocabulary"),
    ],
)
def test_bad_text_inputs(setup, kwargs, message):
    _, model = setup
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_pixels_and_features_together(setup):
    cfg, model = setup
    inputs = llava_inputs(cfg, batch=1)
    feats = model.get_image_features(inputs["pixel_values"])
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, image_features=feats)
    with torch.no_grad():  # precomputed features give the same logits as pixels
        a = model(input_ids=inputs["input_ids"], image_features=feats).logits
        b = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    assert torch.equal(a, b)


def test_kv_cache_decode_equals_full_forward(setup):
    """Prefill part of a left-padded batch into the preallocated cache, then feed one token at a time:
    every step's logits equal the full forward at that position."""
    cfg, model = setup
    inputs = llava_inputs(cfg, batch=2, shorter=(0, 3))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, T = ids.shape
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    lm = model.language_model
    with torch.no_grad():
        embeds = model.embed_inputs(ids, model.get_image_features(inputs["pixel_values"]))
        full = lm.lm_head(lm.model(embeds, attention_mask=mask, position_ids=position_ids))
        lm.model.setup_cache(B, T + 4)
        try:
            k = T - 5
            pos = torch.arange(k)
            step = lm.lm_head(
                lm.model(
                    embeds[:, :k], attention_mask=mask[:, :k], position_ids=position_ids[:, :k], input_pos=pos
                )
            )
            got = [step]
            for t in range(k, T):
                out = lm.model(
                    embeds[:, t : t + 1],
                    attention_mask=mask[:, : t + 1],
                    position_ids=position_ids[:, t : t + 1],
                    input_pos=torch.tensor([t]),
                )
                got.append(lm.lm_head(out))
        finally:
            lm.model.clear_cache()
    got = torch.cat(got, dim=1)
    valid = mask.bool()
    assert (got - full)[valid].abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="input_pos is required"):
        lm.model.setup_cache(B, T)
        try:
            lm.model(embeds)
        finally:
            lm.model.clear_cache()


def test_left_padding_with_mask_positions_matches_unpadded_row(setup):
    """With position ids from the mask, a left-padded row gives the logits of the same row alone."""
    cfg, model = setup
    inputs = llava_inputs(cfg, batch=2, shorter=(0, 3))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(**inputs, position_ids=pos).logits
        alone = model(input_ids=ids[1:, 3:], pixel_values=inputs["pixel_values"][1:]).logits
    assert (batch[1, 3:] - alone[0]).abs().max().item() < 1e-5


def test_cpu_layouts_keep_outputs_and_step_aside(tmp_path):
    """Fused q/k/v and gate/up products (CPU inference) give the unfused result; with gradients, after a
    dtype change or a re-assigned weight, the layers' own weights are used again."""
    cfg = hf_llava_config("vipllava", vision_feature_layers=[-1], text=dict(num_key_value_heads=2))
    hf = hf_llava_model(cfg)
    hf.save_pretrained(tmp_path)
    model = vlmkit.load_model(tmp_path)
    attn = model.language_model.model.layers[0].self_attn
    assert isinstance(attn.project_qkv, FusedLinears)
    assert isinstance(model.language_model.model.layers[0].mlp.project_gate_up, FusedLinears)
    inputs = llava_inputs(cfg, batch=1)
    with torch.no_grad():
        ref = hf(**inputs).logits
        assert (model(**inputs).logits - ref).abs().max() < 1e-5
    out = model(**inputs).logits  # gradients on: the layers' weights, and gradients reach them
    out.sum().backward()
    assert (
        attn.q_proj.weight.grad is not None
        and model.language_model.model.layers[0].mlp.up_proj.weight.grad is not None
    )
    with torch.no_grad():
        attn.q_proj.weight.data = attn.q_proj.weight.data.clone() * 0  # re-assigned: the fused copy is stale
        changed = model(**inputs).logits
        assert not attn.project_qkv.usable()
        assert (changed - ref).abs().max() > 1e-3
    model = vlmkit.load_model(tmp_path).to(torch.float64)
    with torch.no_grad():
        assert (
            model(**{**inputs, "pixel_values": inputs["pixel_values"].double()}).logits - ref
        ).abs().max() < 1e-5
    state = vlmkit.load_model(tmp_path).state_dict()
    assert all(torch.equal(state[k], v) for k, v in hf_state_in_our_names(hf).items())


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 64, 65, 300])
def test_dense_equals_linear_for_every_batch_size(rows, transposed, monkeypatch):
    """The small-batch kernel (weight @ x.T), chosen or not for the shape, gives F.linear's result, for 3-d
    inputs, with a bias, and falls back to F.linear for column-major weights and with gradients."""
    monkeypatch.setitem(fastpath.TRANSPOSED_FASTER, (80, 48, torch.float32), transposed)
    torch.manual_seed(rows)
    x, w, b = torch.randn(1, rows, 48), torch.randn(80, 48), torch.randn(80)
    ref = torch.nn.functional.linear(x, w, b)
    with torch.no_grad():
        out = dense(x, w, b)
        assert out.shape == ref.shape and out.is_contiguous()
        assert (out - ref).abs().max() < 1e-5
        assert (dense(x[0], w.t().contiguous().t()) - ref[0] + b).abs().max() < 1e-5  # column-major
    g = torch.randn(80, 48, requires_grad=True)
    dense(x, g).sum().backward()  # gradients flow (F.linear)
    assert g.grad is not None


def test_small_batch_kernel_is_measured_per_shape(monkeypatch):
    """Each row-major weight shape gets a measured choice of kernel once; column-major, integer and
    already measured weights are left alone."""
    monkeypatch.setattr(fastpath, "TRANSPOSED_FASTER", {(8, 4, torch.float32): True})
    fastpath.measure_small_batches(
        [
            torch.randn(96, 32),
            torch.randn(96, 32),  # the same shape: measured once
            torch.randn(32, 96).t(),  # column-major
            torch.ones(8, 4, dtype=torch.int8),
            torch.randn(8, 4),  # noted already
        ]
    )
    assert set(fastpath.TRANSPOSED_FASTER) == {(96, 32, torch.float32), (8, 4, torch.float32)}
    assert fastpath.TRANSPOSED_FASTER[(8, 4, torch.float32)] is True
    assert isinstance(fastpath.TRANSPOSED_FASTER[(96, 32, torch.float32)], bool)


def test_batched_layout_keeps_outputs_and_switches_back(tmp_path):
    """The server's row-major layout (optimize_for_cpu_inference(batched=True)) gives the reference logits
    for one row and for a batch, keeps the checkpoint's tensors, and switches back to column-major."""
    cfg = hf_llava_config("vipllava", vision_feature_layers=[-1], text=dict(num_key_value_heads=2))
    hf = hf_llava_model(cfg)
    hf.save_pretrained(tmp_path)
    model = vlmkit.load_model(tmp_path)
    mlp = model.language_model.model.layers[0].mlp
    columns = column_major_reads_faster(torch.float32)  # the one-row layout, measured on this CPU
    assert mlp.project_gate_up.weight.is_contiguous() is not columns
    optimize_for_cpu_inference(model, batched=True)
    assert mlp.project_gate_up.weight.is_contiguous()
    with torch.no_grad():
        assert mlp.project_gate_up.usable()
    assert all(p.is_contiguous() for p in model.parameters())
    for batch in (1, 3):
        inputs = llava_inputs(cfg, batch=batch)
        with torch.no_grad():
            assert (model(**inputs).logits - hf(**inputs).logits).abs().max() < 1e-5
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in hf_state_in_our_names(hf).items())
    optimize_for_cpu_inference(model, batched=False)
    assert mlp.project_gate_up.weight.is_contiguous() is not columns
    with torch.no_grad():
        assert (model(**inputs).logits - hf(**inputs).logits).abs().max() < 1e-5


def hf_state_in_our_names(hf):
    from vlmkit.vipllava.model import KEY_MAP
    from vlmkit.weights import remap_keys

    return remap_keys(dict(hf.state_dict()), KEY_MAP)


def test_fused_projection_steps_aside_for_a_wrapped_layer(tmp_path):
    """A wrapper put in place of q_proj (as peft's LoRA does) turns the fused q/k/v product off by itself:
    the wrapper's output is used."""
    cfg = hf_llava_config("vipllava", vision_feature_layers=[-1], text=dict(num_key_value_heads=2))
    hf = hf_llava_model(cfg)
    hf.save_pretrained(tmp_path)
    model = vlmkit.load_model(tmp_path)
    attn = model.language_model.model.layers[0].self_attn
    inputs = llava_inputs(cfg, batch=1)
    with torch.no_grad():
        ref = model(**inputs).logits
        assert attn.project_qkv.usable()
        attn.q_proj = torch.nn.Sequential(attn.q_proj)  # same output, another module
        assert not attn.project_qkv.usable()
        assert (model(**inputs).logits - ref).abs().max() < 1e-5
        attn.q_proj = torch.nn.Sequential(attn.q_proj[0], torch.nn.Dropout(0.0), torch.nn.Identity())
        attn.q_proj[0].weight.data = attn.q_proj[0].weight.data * 2  # the wrapper's weights are what count
        assert (model(**inputs).logits - ref).abs().max() > 1e-4

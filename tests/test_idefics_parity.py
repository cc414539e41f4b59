"""IDEFICS against transformers on tiny random configs with randomised gates."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from oracle import hf_idefics_config, hf_idefics_model, idefics_inputs

import vlmkit

TOL = 1e-4
# text before the first image, two images, a sample with fewer images (zero-padded), left padding
ROWS = [[3, "img", 4, "img", 2], ["img", 5], [2, "img", 1]]

CONFIGS = {
    "plain-interval2": dict(),
    "resampler-qknorm-vector": dict(
        use_resampler=True,
        qk_layer_norms=True,
        alpha_type="vector",
        perceiver=dict(qk_layer_norms_perceiver=True),
    ),
    "resampler-interval1": dict(use_resampler=True, cross_layer_interval=1),
    "qknorm-interval4-float": dict(qk_layer_norms=True, cross_layer_interval=4),
    "no-extra-vocab-tied": dict(additional_vocab_size=0, tie_word_embeddings=True),
}


def build(name_or_kwargs, tmp_path_factory, seed: int = 0):
    kwargs = CONFIGS[name_or_kwargs] if isinstance(name_or_kwargs, str) else name_or_kwargs
    cfg = hf_idefics_config(**kwargs)
    hf = hf_idefics_model(cfg, seed=seed)
    folder = tmp_path_factory.mktemp("idefics")
    hf.save_pretrained(folder)
    return cfg, hf, folder


def rows_for(cfg):
    """With no extra vocabulary the image markers would be out of range: use base ids instead."""
    return ROWS if cfg.additional_vocab_size else [[3, 4, 2], [5, 1], [2, 1]]


def inputs_for(cfg, rows=None, **kw):
    inputs = idefics_inputs(cfg, rows or ROWS, **kw)
    if not cfg.additional_vocab_size:
        inputs["input_ids"] = inputs["input_ids"].clamp(max=cfg.vocab_size - 1)
    return inputs


def diff(a, b, mask=None):
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path_factory):
    cfg, hf, folder = build(name, tmp_path_factory)
    model = vlmkit.load_model(folder)
    inputs = inputs_for(cfg)
    with torch.no_grad():
        ref = hf(**inputs).logits
        out = model(**inputs).logits
    assert out.shape == ref.shape == (*inputs["input_ids"].shape, cfg.vocab_size + cfg.additional_vocab_size)
    assert diff(out, ref, inputs["attention_mask"]) < TOL


def test_gates_matter(tmp_path_factory):
    """The comparison sees the cross-attention: changing one image changes the logits after it only."""
    cfg, hf, folder = build("plain-interval2", tmp_path_factory)
    model = vlmkit.load_model(folder)
    inputs = inputs_for(cfg)
    other = {**inputs, "pixel_values": inputs["pixel_values"].clone()}
    other["pixel_values"][0, 1] += 1.0  # the second image of sample 0
    with torch.no_grad():
        a, b = model(**inputs).logits, model(**other).logits
    first_token_of_image_2 = int(inputs["image_attention_mask"][0, :, 1].nonzero()[0])
    assert diff(a[0, :first_token_of_image_2], b[0, :first_token_of_image_2]) == 0
    assert diff(a[0, first_token_of_image_2:], b[0, first_token_of_image_2:]) > 1e-3


def test_text_before_any_image_gets_no_cross_attention(tmp_path_factory):
    cfg, hf, folder = build("resampler-qknorm-vector", tmp_path_factory)
    model = vlmkit.load_model(folder)
    inputs = inputs_for(cfg, [[4, "img", 3]])
    other = {**inputs, "pixel_values": torch.randn_like(inputs["pixel_values"])}
    with torch.no_grad():
        a, b = model(**inputs).logits, model(**other).logits
    assert diff(a[0, :5], b[0, :5]) == 0  # BOS + 4 text tokens come before the image
    assert diff(a[0, 5:], b[0, 5:]) > 1e-3


def test_text_only_equals_reference_with_an_all_zero_image_mask(tmp_path_factory):
    cfg, hf, folder = build("resampler-interval1", tmp_path_factory)
    model = vlmkit.load_model(folder)
    inputs = inputs_for(cfg, [[6], [3]])
    B, T = inputs["input_ids"].shape
    inputs["pixel_values"] = torch.randn(B, 1, 3, 28, 28)
    inputs["image_attention_mask"] = torch.zeros(B, T, 1, dtype=torch.long)
    with torch.no_grad():
        ref = hf(**inputs).logits  # the reference needs an image; the mask hides it from every token
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        masked = model(**inputs).logits  # what the processor gives a text-only prompt: one unused image
    assert diff(out, ref, inputs["attention_mask"]) < TOL
    assert diff(masked, ref, inputs["attention_mask"]) < TOL


def test_loss_over_all_columns(tmp_path_factory):
    """The reference's loss fails with extra vocabulary (it views logits with the base vocab size), so the
    expected loss is the shifted cross-entropy over the reference logits; without extra vocabulary it is
    the reference's own loss."""
    for name in ("plain-interval2", "no-extra-vocab-tied"):
        cfg, hf, folder = build(name, tmp_path_factory)
        model = vlmkit.load_model(folder)
        inputs = inputs_for(cfg)
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        with torch.no_grad():
            ref_logits = hf(**inputs).logits
            expected = F.cross_entropy(
                ref_logits[:, :-1].reshape(-1, ref_logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
            if not cfg.additional_vocab_size:
                assert abs(hf(**inputs, labels=labels).loss.item() - expected.item()) < 1e-6
            loss = model(**inputs, labels=labels).loss
        assert abs(loss.item() - expected.item()) < 1e-5
        assert bool((labels >= cfg.vocab_size).any()) == bool(cfg.additional_vocab_size)


def test_vision_encoder_resampler_and_one_gated_block(tmp_path_factory):
    cfg, hf, folder = build("resampler-qknorm-vector", tmp_path_factory)
    model = vlmkit.load_model(folder)
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        ref_vis = hf.model.vision_model(pixel_values=pixels).last_hidden_state
        out_vis = model.model.vision_model(pixels)[0]
        assert diff(out_vis, ref_vis) < TOL
        assert diff(model.model.perceiver_resampler(ref_vis), hf.model.perceiver_resampler(ref_vis)) < TOL

        B, T, N, S = 2, 6, 2, 3
        hidden = torch.randn(B, T, cfg.hidden_size)
        states = torch.randn(B, N, S, cfg.vision_config.embed_dim)
        iam = torch.tensor([[0, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]]).expand(B, T, N).clone()
        iam[1, :3] = 0
        expanded = iam[..., None].expand(-1, -1, -1, S).reshape(B, T, N * S)
        additive = torch.where(expanded[:, None].bool(), 0.0, torch.finfo(torch.float32).min)
        gate = (additive == 0).any(dim=-1).float().squeeze(1)
        ref = hf.model.gated_cross_attn_layers[1](
            hidden,
            None,
            states.reshape(B, N * S, -1),
            image_attention_mask=additive,
            cross_attention_gate=gate,
        )
        ctx = model.cross_context(states, iam)
        block = model.model.gated_cross_attn_layers[1]
        out = block(hidden, kv=ctx.kv[1], mask=ctx.mask, gate=ctx.gate)
        assert diff(out, ref) < TOL


def test_precomputed_embeddings(tmp_path_factory):
    cfg, hf, folder = build("resampler-qknorm-vector", tmp_path_factory)
    model = vlmkit.load_model(folder)
    inputs = inputs_for(cfg)
    pixels = inputs.pop("pixel_values")
    B, N = pixels.shape[:2]
    with torch.no_grad():
        enc = hf.model.vision_model(pixel_values=pixels.flatten(0, 1)).last_hidden_state
        enc = enc.reshape(B, N, *enc.shape[1:])
        per = hf.model.perceiver_resampler(enc.flatten(0, 1)).reshape(B, N, 3, -1)
        for kind, tensor in (("image_encoder_embeddings", enc), ("perceiver_embeddings", per)):
            ref = hf(**inputs, **{kind: tensor}).logits
            out = model(**inputs, **{kind: tensor}).logits
            assert diff(out, ref, inputs["attention_mask"]) < TOL, kind
        states = model.encode_images(pixel_values=pixels, image_attention_mask=inputs["image_attention_mask"])
        assert (
            diff(model(**inputs, image_states=states).logits, model(**inputs, pixel_values=pixels).logits)
            == 0
        )


def test_interpolate_pos_encoding(tmp_path_factory):
    cfg, hf, folder = build("plain-interval2", tmp_path_factory)
    inputs = inputs_for(cfg, image_size=42)  # 6x6 patches for a 4x4 position grid
    for dtype, tol in ((torch.float32, TOL), (torch.bfloat16, 0.1)):
        model = vlmkit.load_model(folder, dtype=dtype)
        ref_model = hf.to(dtype)
        with torch.no_grad():
            ref = ref_model(
                **{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}, interpolate_pos_encoding=True
            ).logits
            out = model(**inputs, interpolate_pos_encoding=True).logits
        assert diff(out, ref, inputs["attention_mask"]) < tol
    hf.float()
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model(**inputs)


def test_padded_images_are_not_encoded(tmp_path_factory):
    cfg, hf, folder = build("plain-interval2", tmp_path_factory)
    model = vlmkit.load_model(folder)
    inputs = inputs_for(cfg)  # 2 + 1 + 1 real images among 3 x 2 slots
    seen = []
    handle = model.model.vision_model.register_forward_hook(
        lambda m, args, kw_out: seen.append(args[0].shape[0])
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    assert seen == [4]


FREEZE_SETTINGS = {
    "defaults": dict(),
    "nothing-frozen": dict(freeze_text_layers=False, freeze_vision_layers=False),
    "exceptions": dict(
        freeze_text_module_exceptions=["Linear"], freeze_vision_module_exceptions=["LayerNorm"]
    ),
    "lm-head": dict(freeze_lm_head=True, freeze_vision_module_exceptions=["Embedding", "Linear"]),
    "tied": dict(tie_word_embeddings=True, freeze_lm_head=True, freeze_text_layers=False),
    "tied-frozen-text": dict(tie_word_embeddings=True, use_resampler=True),
}


@pytest.mark.parametrize("name", list(FREEZE_SETTINGS))
def test_requires_grad_matches_transformers(name, tmp_path):
    """Compared with the reference as constructed. (transformers 5.23's from_pretrained loses the freezing:
    every parameter of a loaded IDEFICS trains. We keep the config's intent after loading.)"""
    cfg = hf_idefics_config(**FREEZE_SETTINGS[name])
    hf = hf_idefics_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = vlmkit.load_model(tmp_path)
    expected = {n: p.requires_grad for n, p in hf.named_parameters()}
    got = {n: p.requires_grad for n, p in ours.named_parameters()}
    assert got == expected
    assert ours.model.embed_tokens.additional_embedding.weight.requires_grad
    assert ours.lm_head.additional_fc.weight.requires_grad


def test_save_pretrained_round_trip_sharded(tmp_path_factory, tmp_path):
    from transformers import IdeficsForVisionText2Text

    cfg, hf, folder = build("resampler-qknorm-vector", tmp_path_factory)
    model = vlmkit.load_model(folder)
    model.save_pretrained(tmp_path, max_shard_bytes=40_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    inputs = inputs_for(cfg)
    back = IdeficsForVisionText2Text.from_pretrained(tmp_path).eval()
    again = vlmkit.load_model(tmp_path)
    with torch.no_grad():
        ref = hf(**inputs).logits
        assert diff(back(**inputs).logits, ref) < TOL
        assert diff(again(**inputs).logits, ref, inputs["attention_mask"]) < TOL


def test_kv_cache_with_image_keys_values_computed_once(tmp_path_factory):
    """Prefill + one-token steps through the preallocated cache, the image states and the cross-attention
    keys/values computed once, reproduce the full forward."""
    cfg, hf, folder = build("resampler-qknorm-vector", tmp_path_factory)
    model = vlmkit.load_model(folder)
    inputs = inputs_for(cfg, ROWS[:2])
    ids, mask, iam = inputs["input_ids"], inputs["attention_mask"], inputs["image_attention_mask"]
    B, T = ids.shape
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        full = model(**inputs).logits
        states = model.encode_images(pixel_values=inputs["pixel_values"], image_attention_mask=iam)
        kv = model.cross_attention_kv(states)
        embeds = model.model.embed_tokens(ids)
        model.setup_cache(B, T + 2)
        try:
            k = T - 4
            ctx = model.cross_context(states, iam[:, :k], kv=kv)
            h = model.model(
                embeds[:, :k],
                attention_mask=mask[:, :k],
                position_ids=pos[:, :k],
                state=ctx,
                input_pos=torch.arange(k),
            )
            steps = [model.lm_head(h)]
            for t in range(k, T):
                ctx = model.cross_context(states, iam[:, t : t + 1], kv=kv)
                h = model.model(
                    embeds[:, t : t + 1],
                    attention_mask=mask[:, : t + 1],
                    position_ids=pos[:, t : t + 1],
                    state=ctx,
                    input_pos=torch.tensor([t]),
                )
                steps.append(model.lm_head(h))
        finally:
            model.clear_cache()
    assert diff(torch.cat(steps, dim=1), full, mask) < 1e-5


def random_idefics(rng: random.Random) -> dict:
    heads = rng.choice([2, 4])
    layers = rng.choice([2, 4, 6])
    return dict(
        hidden_size=heads * rng.choice([8, 12]),
        num_attention_heads=heads,
        num_hidden_layers=layers,
        intermediate_size=rng.choice([24, 50]),
        cross_layer_interval=rng.choice([i for i in (1, 2, 3) if layers % i == 0]),
        use_resampler=rng.random() < 0.5,
        qk_layer_norms=rng.random() < 0.5,
        alpha_type=rng.choice(["float", "vector"]),
        rms_norm_eps=rng.choice([1e-5, 1e-6]),
        additional_vocab_size=2,
        vision=dict(
            embed_dim=rng.choice([16, 24]),
            num_attention_heads=rng.choice([2, 4]),
            num_hidden_layers=rng.choice([1, 3]),
            image_size=rng.choice([14, 28]),
            patch_size=7,
            hidden_act=rng.choice(["gelu", "quick_gelu"]),
        ),
        perceiver=dict(
            resampler_n_latents=rng.choice([1, 4]),
            resampler_depth=rng.choice([1, 2]),
            resampler_n_heads=rng.choice([1, 3]),
            resampler_head_dim=rng.choice([4, 8]),
            qk_layer_norms_perceiver=rng.random() < 0.5,
        ),
    )


@pytest.mark.parametrize("seed", range(4))
def test_random_configs(seed, tmp_path_factory):
    kwargs = random_idefics(random.Random(seed))
    cfg, hf, folder = build(kwargs, tmp_path_factory, seed=seed)
    model = vlmkit.load_model(folder)
    inputs = inputs_for(cfg, seed=seed)
    with torch.no_grad():
        assert diff(model(**inputs).logits, hf(**inputs).logits, inputs["attention_mask"]) < TOL, kwargs

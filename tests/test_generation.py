"""generate() token for token against transformers' generate, both families; settings and errors."""

from __future__ import annotations

import pytest
import torch
from oracle import (
    build_tokenizer,
    hf_idefics_config,
    hf_idefics_model,
    hf_llava_config,
    hf_llava_model,
    idefics_inputs,
    llava_inputs,
)

import vlmkit
from vlmkit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    cfg = hf_llava_config("vipllava", vision_feature_layers=[-2, 0], text=dict(num_key_value_heads=2))
    hf = hf_llava_model(cfg, seed=2)
    folder = tmp_path_factory.mktemp("llava")
    hf.save_pretrained(folder)
    return hf, vlmkit.load_model(folder), llava_inputs(cfg, batch=2, shorter=(0, 3))


@pytest.fixture(scope="module")
def idefics(tmp_path_factory):
    cfg = hf_idefics_config(use_resampler=True, qk_layer_norms=True, alpha_type="vector")
    hf = hf_idefics_model(cfg, seed=2)
    folder = tmp_path_factory.mktemp("idefics")
    hf.save_pretrained(folder)
    return hf, vlmkit.load_model(folder), idefics_inputs(cfg, [[3, "img", 4, "img", 2], ["img", 5]])


FAMILIES = ["llava", "idefics"]


def both(request, name):
    return request.getfixturevalue(name)


def reference(hf, inputs, **kwargs):
    with torch.no_grad():
        return hf.generate(**inputs, **kwargs)


SETTINGS = {
    "greedy": dict(max_new_tokens=10),
    "beams": dict(max_new_tokens=8, num_beams=3, num_return_sequences=2),
    "beams-length-penalty": dict(max_new_tokens=7, num_beams=4, length_penalty=0.3, early_stopping=True),
    "beams-never": dict(max_new_tokens=6, num_beams=2, early_stopping="never", length_penalty=2.0),
    "processors": dict(
        max_new_tokens=9, repetition_penalty=1.4, bad_words_ids=[[9], [3, 4], [60, 61, 62]], min_new_tokens=4
    ),
    "one-token": dict(max_new_tokens=1),
    "one-token-beams": dict(max_new_tokens=1, num_beams=2),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_tokens_match_transformers(request, family, setting):
    hf, model, inputs = both(request, family)
    kwargs = SETTINGS[setting]
    ref = reference(hf, inputs, do_sample=False, pad_token_id=0, **kwargs)
    out = model.generate(**inputs, pad_token_id=0, **kwargs)
    assert out.dtype == torch.long
    assert torch.equal(out, ref), (out[:, -12:], ref[:, -12:])


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_lists_and_per_row_stopping(request, family):
    """EOS ids taken from the greedy output, so rows really stop (at different steps) and get padded."""
    hf, model, inputs = both(request, family)
    T = inputs["input_ids"].shape[1]
    free = model.generate(**inputs, max_new_tokens=10, pad_token_id=0)
    eos = [int(free[0, T + 2]), int(free[1, T + 5])]
    for kwargs in (dict(), dict(num_beams=2, num_return_sequences=2)):
        ref = reference(
            hf, inputs, do_sample=False, max_new_tokens=10, eos_token_id=eos, pad_token_id=1, **kwargs
        )
        out = model.generate(**inputs, max_new_tokens=10, eos_token_id=eos, pad_token_id=1, **kwargs)
        assert torch.equal(out, ref)
    greedy = model.generate(**inputs, max_new_tokens=10, eos_token_id=eos, pad_token_id=1)
    assert greedy.shape[1] < T + 10 or bool((greedy[:, T:] == 1).any())
    single = model.generate(**inputs, max_new_tokens=10, eos_token_id=eos[0], pad_token_id=1)
    assert torch.equal(
        single, reference(hf, inputs, do_sample=False, max_new_tokens=10, eos_token_id=eos[0], pad_token_id=1)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_matches_under_the_same_seed(request, family):
    """The reference draws with the global RNG; so does vlmkit without a generator: same seed, same tokens."""
    hf, model, inputs = both(request, family)
    for kwargs in (
        dict(top_k=5, top_p=0.9, temperature=0.7),
        dict(num_return_sequences=3),
        dict(num_beams=2, num_return_sequences=2, top_k=0),
    ):
        torch.manual_seed(11)
        ref = reference(hf, inputs, do_sample=True, max_new_tokens=8, pad_token_id=0, **kwargs)
        torch.manual_seed(11)
        out = model.generate(**inputs, do_sample=True, max_new_tokens=8, pad_token_id=0, **kwargs)
        assert torch.equal(out, ref), kwargs


def test_sampling_with_a_generator_is_reproducible(llava):
    _, model, inputs = llava
    runs = [
        model.generate(
            **inputs,
            do_sample=True,
            max_new_tokens=12,
            top_k=0,
            temperature=1.5,
            generator=torch.Generator().manual_seed(seed),
        )
        for seed in (1, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    greedy = model.generate(**inputs, max_new_tokens=12)
    assert torch.equal(model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=0.0), greedy)


@pytest.mark.parametrize("family", FAMILIES)
def test_max_new_tokens_zero_returns_the_prompt(request, family):
    _, model, inputs = both(request, family)
    out = model.generate(**inputs, max_new_tokens=0, num_beams=2, num_return_sequences=2)
    assert torch.equal(out, inputs["input_ids"].repeat_interleave(2, dim=0))
    assert torch.equal(model.generate(**inputs, max_new_tokens=0), inputs["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_tokens_equal_generate(request, family):
    _, model, inputs = both(request, family)
    steps = list(model.stream_tokens(**inputs, max_new_tokens=6))
    full = model.generate(**inputs, max_new_tokens=6)
    assert torch.equal(torch.stack(steps, dim=1), full[:, inputs["input_ids"].shape[1] :])
    with pytest.raises(ValueError, match="beam search cannot stream"):
        next(model.stream_tokens(**inputs, max_new_tokens=6, num_beams=2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k"),
        (dict(num_beams=2, num_return_sequences=3), "must not exceed num_beams"),
        (dict(num_return_sequences=2), "greedy decoding returns one sequence"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(min_new_tokens=-2), "min_new_tokens"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(num_beams=0), "num_beams"),
        (dict(bad_words_ids=[[]]), "bad_words_ids"),
        (dict(bad_words_ids=[1, 2]), "bad_words_ids"),
        (dict(stop_strings=[""]), "stop_strings"),
        (dict(stop_strings=["x"]), "need a tokenizer"),
        (dict(eos_token_id="2"), "eos_token_id"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(foo=1), r"unknown generate\(\) arguments: \['foo'\]"),
    ],
)
def test_invalid_arguments_raise_before_any_work(llava, kwargs, message):
    _, model, inputs = llava
    calls = []
    handle = model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            model.generate(**inputs, **{"max_new_tokens": 4, **kwargs})
    finally:
        handle.remove()
    assert calls == []


def test_input_errors_before_any_work(llava, idefics):
    _, model, inputs = llava
    with pytest.raises(ValueError, match="image tokens do not match"):
        model.generate(
            input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:1], max_new_tokens=2
        )
    _, model, inputs = idefics
    with pytest.raises(ValueError, match="covers"):
        model.generate(
            **{**inputs, "image_attention_mask": inputs["image_attention_mask"][:, 1:]}, max_new_tokens=2
        )


def test_image_work_runs_once(idefics, llava):
    """The vision tower and the resampler run once per request; IDEFICS's cross-attention keys and values
    are projected once, not at every step."""
    _, model, inputs = idefics
    counts = {"vision": 0, "resampler": 0, "k_proj": 0}
    hooks = [
        model.model.vision_model.register_forward_hook(
            lambda *a: counts.__setitem__("vision", counts["vision"] + 1)
        ),
        model.model.perceiver_resampler.register_forward_hook(
            lambda *a: counts.__setitem__("resampler", counts["resampler"] + 1)
        ),
        model.model.gated_cross_attn_layers[0].cross_attn.k_proj.register_forward_hook(
            lambda *a: counts.__setitem__("k_proj", counts["k_proj"] + 1)
        ),
    ]
    try:
        model.generate(**inputs, max_new_tokens=6, num_beams=2)
    finally:
        for h in hooks:
            h.remove()
    assert counts == {"vision": 1, "resampler": 1, "k_proj": 1}
    _, model, inputs = llava
    seen = []
    h = model.vision_tower.register_forward_hook(lambda *a: seen.append(1))
    try:
        model.generate(**inputs, max_new_tokens=5)
    finally:
        h.remove()
    assert seen == [1]


def test_text_only_idefics_generation(idefics):
    hf, model, inputs = idefics
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ref = reference(
        hf,
        {**inputs, "image_attention_mask": torch.zeros_like(inputs["image_attention_mask"])},
        do_sample=False,
        max_new_tokens=6,
        pad_token_id=0,
    )
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(out, ref)


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A LLaVA model whose vocabulary is a real tokenizer's, for stop strings."""
    from transformers import AutoTokenizer

    folder = build_tokenizer(tmp_path_factory.mktemp("tok"))
    hf_tok = AutoTokenizer.from_pretrained(folder)
    tok = Tokenizer.from_folder(folder)
    cfg = hf_llava_config("llava", text=dict(vocab_size=tok.vocab_size))
    cfg.image_token_index = tok.token_to_id("<image>")
    hf = hf_llava_model(cfg, seed=5)
    model_dir = tmp_path_factory.mktemp("m")
    hf.save_pretrained(model_dir)
    ids = hf_tok(["a chat between a curious human", "what shape is it"], padding=True, return_tensors="pt")
    return hf, vlmkit.load_model(model_dir), hf_tok, tok, dict(ids)


def test_stop_strings_match_transformers(with_tokenizer):
    hf, model, hf_tok, tok, inputs = with_tokenizer
    T = inputs["input_ids"].shape[1]
    # only whole-character tokens, so that the generated text is clean to cut stop strings from
    banned = [
        [i]
        for i in range(tok.vocab_size)
        if tok.decode([i]).strip(" ") in ("", "\ufffd") or tok.backend.id_to_token(i).startswith("<")
    ]
    free = model.generate(**inputs, max_new_tokens=12, pad_token_id=0, bad_words_ids=banned)

    def piece(row: int, i: int) -> str:
        return tok.decode([int(free[row, T + i])]).strip(" ")

    # strings that really occur: the end of one token, the start of another (it ends inside that token)
    stops = [s for s in (piece(0, 2)[-2:], piece(1, 4)[:2]) if s]
    assert stops
    outs = []
    for kwargs in (dict(), dict(num_beams=2)):
        ref = reference(
            hf,
            inputs,
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=0,
            stop_strings=stops,
            tokenizer=hf_tok,
            bad_words_ids=banned,
            **kwargs,
        )
        out = model.generate(
            **inputs,
            max_new_tokens=12,
            pad_token_id=0,
            stop_strings=stops,
            tokenizer=tok,
            bad_words_ids=banned,
            **kwargs,
        )
        assert torch.equal(out, ref), (stops, tok.batch_decode(out[:, T:]), tok.batch_decode(ref[:, T:]))
        outs.append(out)
    assert outs[0].shape[1] < free.shape[1] or bool((outs[0][:, T:] == 0).any())


def test_stop_strings_find_the_earliest_completed_occurrence():
    """One stop-string implementation for generate and the server: an occurrence counts when it ends in
    the new text, and the cut is at the earliest such start."""
    from vlmkit.generation import StopStrings

    stops = StopStrings(["END", "D!", ""])
    assert stops.find("", "no stop here") is None
    assert stops.find("the EN", "the END!") == 4  # "END" ends in the new text; "D!" starts later
    assert stops.find("the END", "the END and more") is None  # completed earlier, not now
    assert stops.find("xx", "xxD!") == 2
    assert StopStrings([]).find("", "anything") is None

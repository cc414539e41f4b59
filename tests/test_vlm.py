"""The high-level API end to end against transformers (processor + generate + decode), and streaming text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import build_idefics_checkpoint, build_llava_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import build_tokenizer
from PIL import Image

import vlmkit
from vlmkit.tokenizer import IncrementalDecoder, Tokenizer

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    return build_llava_checkpoint(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def idefics_folder(tmp_path_factory):
    return build_idefics_checkpoint(tmp_path_factory.mktemp("idefics"))


def whole_characters(tok) -> list[list[int]]:
    """bad_words_ids that keep a random model to tokens of whole characters. (A run of byte-fallback tokens
    that is not valid UTF-8 decodes as a whole to U+FFFD per byte, which no stream can know in advance.)"""
    return [[i] for i in range(len(tok)) if tok.convert_ids_to_tokens(i).startswith("<0x")]


def reference_text(hf, proc, inputs, **kwargs) -> str:
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=False, **kwargs)
    return proc.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def test_llava_generate_stream_chat(llava_folder):
    folder, hf, proc = llava_folder
    vlm = vlmkit.VLM.load(folder)
    prompt = "USER: <image>\nWhat shape is it? ASSISTANT:"
    inputs = proc(text=[prompt], images=[IMAGE], return_tensors="pt")
    eos, pad = proc.tokenizer.eos_token_id, proc.tokenizer.pad_token_id
    bad = whole_characters(proc.tokenizer)
    want = reference_text(
        hf, proc, inputs, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad, bad_words_ids=bad
    )
    assert vlm.generate(prompt, images=[IMAGE], max_new_tokens=12, bad_words_ids=bad) == want
    assert "".join(vlm.stream(prompt, images=[IMAGE], max_new_tokens=12, bad_words_ids=bad)) == want
    messages = [
        {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What?"}]}
    ]
    chat_inputs = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    chat_want = reference_text(
        hf,
        proc,
        proc(text=[chat_inputs], images=[IMAGE], return_tensors="pt"),
        max_new_tokens=8,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    assert vlm.chat(messages, max_new_tokens=8) == chat_want
    assert "".join(vlm.stream_chat(messages, max_new_tokens=8)) == chat_want
    # no marker in the prompt: the images go first
    assert vlm.generate("What shape is it? ASSISTANT:", images=[IMAGE], max_new_tokens=4) == vlm.generate(
        "<image>\nWhat shape is it? ASSISTANT:", images=[IMAGE], max_new_tokens=4
    )
    several = vlm.generate(prompt, images=[IMAGE], max_new_tokens=5, do_sample=True, num_return_sequences=2)
    assert isinstance(several, list) and len(several) == 2


def test_idefics_generate_stream_chat(idefics_folder):
    folder, hf, proc = idefics_folder
    vlm = vlmkit.VLM.load(folder)
    sample = ["User:", IMAGE, "What shape is it?<end_of_utterance>\nAssistant:"]
    inputs = proc(text=[sample], add_end_of_utterance_token=False, return_tensors="pt")
    tok = proc.tokenizer
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_utterance>")]
    bad = whole_characters(tok)
    want = reference_text(
        hf,
        proc,
        inputs,
        max_new_tokens=10,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        bad_words_ids=bad,
    )
    prompt = "User:<image>What shape is it?<end_of_utterance>\nAssistant:"
    assert vlm.generate(prompt, images=[IMAGE], max_new_tokens=10, bad_words_ids=bad) == want
    assert "".join(vlm.stream(prompt, images=[IMAGE], max_new_tokens=10, bad_words_ids=bad)) == want
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What shape is it?"}],
        }
    ]
    assert vlm.chat(messages, max_new_tokens=10) == vlm.generate(
        "User:<image>What shape is it?<end_of_utterance>\nAssistant:", images=[IMAGE], max_new_tokens=10
    )
    with pytest.raises(ValueError, match="holds 2 <image> markers but 1 images"):
        vlm.generate("<image><image>", images=[IMAGE])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_folder(build_tokenizer(tmp_path_factory.mktemp("tok")))


def stream_all(tokenizer, ids):
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    return deltas, decoder.flush()


def test_incremental_text_never_splits_a_character(tokenizer):
    text = "héllo жёлтый 中文 ☃ 🦊 what shape? a circle."  # characters outside the training corpus
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(
        tokenizer.backend.id_to_token(i).startswith("<0x") for i in ids
    )  # byte-fallback pieces in play
    deltas, tail = stream_all(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=80, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_incremental_text_equals_whole_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, tail = stream_all(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any(d.endswith("\ufffd") for d in deltas)

"""Tokenizer parity with transformers: ids, padding, truncation, decoding, chat templates; clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from oracle import build_tokenizer

from vlmkit.tokenizer import ChatTemplateError, Tokenizer

TEXTS = [
    "Hello world",
    " leading space and  two spaces",
    "<image>\nWhat is in the image?",
    "a<image><image>b",
    "日本語 ✓ héllo 🙂 — unseen ü characters",
    "line one\n\nline two\t tab",
    "",
    "</s> inside <s> text <pad>",
]


@pytest.fixture(scope="module", params=["metaspace", "bytelevel"])
def pair(request, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = build_tokenizer(
        tmp_path_factory.mktemp(request.param),
        style=request.param,
        published_layout=request.param == "bytelevel",
    )
    return Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder), folder


def test_ids_match(pair):
    ours, ref, _ = pair
    for text in TEXTS:
        for special in (True, False):
            assert (
                ours.encode(text, add_special_tokens=special)
                == ref(text, add_special_tokens=special)["input_ids"]
            )


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_and_truncation_match(pair, side):
    ours, ref, _ = pair
    ours.padding_side = ref.padding_side = side
    ours.truncation_side = ref.truncation_side = side
    for kwargs in (
        dict(padding=True),
        dict(padding="max_length", max_length=40),
        dict(padding=True, truncation=True, max_length=6),
    ):
        got = ours(TEXTS, **kwargs)
        want = ref(TEXTS, return_tensors="pt", **kwargs)
        assert torch.equal(got["input_ids"], want["input_ids"]), kwargs
        assert torch.equal(got["attention_mask"], want["attention_mask"]), kwargs
    assert ours.pad_token_id == ref.pad_token_id and ours.bos_token_id == ref.bos_token_id


def test_decode_matches(pair):
    ours, ref, _ = pair
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    batch = ours(TEXTS[:3], padding=True)["input_ids"]
    assert ours.batch_decode(batch, skip_special_tokens=True) == ref.batch_decode(
        batch, skip_special_tokens=True
    )


def test_chat_template_matches(pair):
    ours, ref, _ = pair
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}"
        "{% elif m['role'] == 'assistant' %} ASSISTANT: {{ m['content'] }}{{ eos_token }}"
        "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    messages = [
        {"role": "user", "content": "hi ✓"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"},
    ]
    for gen in (True, False):
        want = ref.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=gen
        )
        assert ours.render_chat(messages, chat_template=template, add_generation_prompt=gen) == want
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        ours.render_chat([{"role": "tool", "content": "x"}], chat_template=template)
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        ours.render_chat(messages, chat_template="{% for %}")
    with pytest.raises(ValueError, match="no chat template"):
        ours.render_chat(messages)


def test_sentencepiece_only_folder(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_broken_files(tmp_path):
    build_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="cannot read .*tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_no_pad_token(tmp_path):
    folder = build_tokenizer(tmp_path, pad_token=None)
    tok = Tokenizer.from_folder(folder)
    assert tok(["one"])["input_ids"].shape[0] == 1  # a single text needs no padding
    with pytest.raises(ValueError, match="needs a pad token"):
        tok(["one", "two three four"], padding=True)
    with pytest.raises(ValueError, match="pass padding=True"):
        tok(["one", "two three four"])


def test_config_special_token_forms(tmp_path):
    folder = build_tokenizer(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = {
        "content": "</s>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "special": True,
    }
    config["chat_template"] = [{"name": "default", "template": "T"}, {"name": "tool_use", "template": "U"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_folder(folder)
    assert tok.eos_token == "</s>" and tok.eos_token_id == 2
    assert tok.chat_template == "T"
    assert tok.convert_tokens_to_ids("<image>") == tok.token_to_id("<image>")
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tok.convert_tokens_to_ids("<nope>")

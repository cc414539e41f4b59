"""The rest of the OpenAI request fields against a live server and the official `openai` client, on both demo
models: log-probabilities equal to the model's log-softmax, usage at the end of a stream, presence and
frequency penalties and logit bias equal to `generate` with the same settings, seeded n > 1 streams that
repeat, and a 400 naming every field that is unknown, unsupported or invalid."""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from test_serve import NAMES, Live

import vlmkit
from vlmkit.generation import GenerationConfig, openai_adjustments
from vlmkit.models import family_of, stop_token_ids


@pytest.fixture(scope="module", params=["vipllava", "idefics"])
def live(request):
    server = Live(vlmkit.VLM.load(NAMES[request.param]), name=NAMES[request.param])
    # a completions prompt the demo model answers at some length: a chat turn rendered as text
    turn = [{"role": "user", "content": [{"type": "text", "text": "Describe the picture."}]}]
    server.prompt = server.vlm.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    yield server
    server.close()


def reference_logprobs(vlm, prompt: str, new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of `generate` (up to EOS) and the log-softmax of one forward over prompt + answer at
    each answer position."""
    inputs = vlm.inputs(prompt)
    ids = inputs.pop("input_ids")
    out = vlm.model.generate(ids, **inputs, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1] :]
    eos = set(stop_token_ids(vlm.tokenizer, family_of(vlm.model)))
    answer = []
    for t in out.tolist():
        if t in eos:
            break
        answer.append(t)
    full = torch.cat([ids, torch.tensor([answer], dtype=ids.dtype)], dim=1)
    with torch.no_grad():  # a text-only prompt: the ids alone (IDEFICS's empty picture slots attend nowhere)
        logits = vlm.model(full).logits[0].float()
    L = ids.shape[1]
    return answer, [torch.log_softmax(logits[L - 1 + i], -1) for i in range(len(answer))]


def test_logprobs_are_the_models_log_softmax(live):
    answer, reference = reference_logprobs(live.vlm, live.prompt, 8)
    assert answer, "the demo model ended at once; pick another prompt"
    got = live.client.completions.create(
        model="m", prompt=live.prompt, max_tokens=8, temperature=0, logprobs=3
    ).choices[0]
    lp = got.logprobs
    assert len(lp.token_logprobs) == len(answer)
    for i, (token, ref) in enumerate(zip(answer, reference, strict=True)):
        assert abs(lp.token_logprobs[i] - float(ref[token])) < 1e-5
        top = list(lp.top_logprobs[i].values())
        assert len(top) <= 3 and top == sorted(top, reverse=True)
        assert abs(top[0] - float(ref.max())) < 1e-5  # greedy: the chosen token is the most likely
    assert len(lp.text_offset) == len(lp.tokens) and lp.text_offset == sorted(lp.text_offset)
    # chat: the same numbers in chat's form, streamed and not
    messages = [{"role": "user", "content": "What colour is the circle?"}]
    whole = live.client.chat.completions.create(
        model="m", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    ).choices[0]
    content = whole.logprobs.content
    assert content and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(abs(c.logprob - c.top_logprobs[0].logprob) < 1e-6 for c in content)  # greedy
    assert all(bytes(c.bytes) == c.token.encode() for c in content)
    streamed = []
    for chunk in live.client.chat.completions.create(
        model="m", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(c.token, round(c.logprob, 5)) for c in streamed] == [
        (c.token, round(c.logprob, 5)) for c in content
    ]
    # without the field, none
    plain = live.client.chat.completions.create(model="m", messages=messages, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_usage_at_the_end_of_a_stream_equals_usage_without_streaming(live):
    ask = dict(model="m", prompt=live.prompt, max_tokens=7, temperature=0)
    whole = live.client.completions.create(**ask)
    chunks = list(live.client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    last = chunks[-1].usage
    assert (last.prompt_tokens, last.completion_tokens, last.total_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
        whole.usage.total_tokens,
    )
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text


def test_penalties_and_logit_bias_equal_generate(live):
    vlm = live.vlm
    for settings in (
        dict(frequency_penalty=1.5),
        dict(presence_penalty=2.0, frequency_penalty=-0.5),
    ):
        want = vlm.generate(live.prompt, max_new_tokens=12, **settings)
        got = live.client.completions.create(
            model="m", prompt=live.prompt, max_tokens=12, temperature=0, **settings
        )
        assert got.choices[0].text == want, settings
    # the penalty acts: the scores the tokens were drawn from (their log-probabilities) change
    ask = dict(model="m", prompt=live.prompt, max_tokens=12, temperature=0, logprobs=0)
    plain = live.client.completions.create(**ask).choices[0].logprobs.token_logprobs
    penalised = (
        live.client.completions.create(**ask, frequency_penalty=2.0).choices[0].logprobs.token_logprobs
    )
    assert plain != penalised
    token = vlm.tokenizer.encode(" square", add_special_tokens=False)[-1]
    forced = live.client.completions.create(
        model="m", prompt=live.prompt, max_tokens=4, temperature=0, logit_bias={str(token): 100}
    )
    assert forced.choices[0].text == vlm.tokenizer.decode([token] * 4)


def test_openai_adjustments_count_the_generated_tokens_only():
    sequences = torch.tensor([[1, 1, 2, 3, 3, 4]])  # a prompt of 3, then 3 generated
    config = GenerationConfig(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={5: 2.0, 0: -1.0})
    out = openai_adjustments(torch.zeros(1, 6), sequences, config, new_tokens=3)
    assert out.tolist() == [[-1.0, 0.0, 0.0, -1.0, -0.75, 2.0]]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        openai_adjustments(torch.zeros(1, 6), sequences, GenerationConfig(logit_bias={6: 1.0}), new_tokens=3)
    with pytest.raises(ValueError, match="presence_penalty"):
        GenerationConfig(presence_penalty=2.5).validate()


def test_seeded_streams_with_n_repeat(live):
    ask = dict(model="m", prompt=live.prompt, max_tokens=8, temperature=1.0, n=3, seed=1234, stream=True)
    runs = []
    for _ in range(2):
        texts = [""] * 3
        for chunk in live.client.completions.create(**ask):
            for c in chunk.choices:
                texts[c.index] += c.text
        runs.append(texts)
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"echo": True}, "echo"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"hello": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"logprobs": 9}, "logprobs"),
    ],
)
def test_every_unsupported_or_invalid_field_is_a_400_naming_it(live, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        live.client.completions.create(model="m", prompt="hi", max_tokens=2, extra_body=fields)
    assert param in str(e.value)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        live.client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, top_logprobs=2
        )
    # an end-user id changes nothing and is accepted
    ok = live.client.completions.create(model="m", prompt="hi", max_tokens=2, temperature=0, user="someone")
    assert math.isfinite(ok.usage.total_tokens)


# -- structured output --------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "shape": {"enum": ["circle", "square", "triangle", "star"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue", "yellow"]}, "maxItems": 3},
        "where": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "row": {"type": "integer", "minimum": 0, "maximum": 2},
                "note": {"type": "string", "maxLength": 8},
            },
            "required": ["row", "note"],
        },
    },
    "required": ["shape", "count", "colors", "where"],
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA}}


def ask_chat(live, **fields):
    messages = [{"role": "user", "content": "Describe the picture."}]
    fields.setdefault("max_tokens", 200)
    return live.client.chat.completions.create(model="m", messages=messages, **fields)


def test_json_schema_answers_validate_also_in_a_mixed_concurrent_batch(live):
    import jsonschema

    answers = [
        c.message.content
        for seed in (3, 4, 5)
        for c in ask_chat(live, temperature=1.0, n=8, seed=seed, response_format=SCHEMA_FORMAT).choices
    ]

    def streamed(i: int) -> tuple[bool, str]:
        constrained = i % 2 == 0
        fields = dict(response_format=SCHEMA_FORMAT) if constrained else {}
        text = ""
        for chunk in ask_chat(live, temperature=1.0, seed=100 + i, stream=True, **fields):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        return constrained, text

    with ThreadPoolExecutor(8) as pool:
        mixed = list(pool.map(streamed, range(8)))
    answers += [text for constrained, text in mixed if constrained]
    assert len(answers) == 28
    for text in answers:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(answers)) > 1  # sampled, not one forced answer
    assert any(
        not text.startswith("{") for constrained, text in mixed if not constrained
    )  # the others are free


def test_regex_choice_grammar_and_json_object(live):
    pattern = r"(yes|no), [a-z]{1,8}\."
    got = live.client.completions.create(
        model="m",
        prompt=live.prompt,
        max_tokens=20,
        temperature=1.0,
        seed=5,
        extra_body={"guided_regex": pattern},
    )
    assert re.fullmatch(pattern, got.choices[0].text), got.choices[0].text
    choice = ask_chat(
        live, temperature=1.0, seed=6, extra_body={"guided_choice": ["red circle", "blue square"]}
    )
    assert choice.choices[0].message.content in ("red circle", "blue square")
    grammar = 'start: "The " COLOR " " SHAPE "."\nCOLOR: "red" | "green"\nSHAPE: "circle" | "square"'
    lark = ask_chat(live, temperature=0, extra_body={"guided_grammar": grammar}).choices[0].message.content
    assert re.fullmatch(r"The (red|green) (circle|square)\.", lark), lark
    obj = ask_chat(live, temperature=0, max_tokens=200, response_format={"type": "json_object"}).choices[0]
    if obj.finish_reason == "stop":  # a free-form object may outrun the budget; a finished one parses
        assert isinstance(json.loads(obj.message.content), dict)
    else:
        assert obj.message.content.startswith("{")


@pytest.mark.parametrize(
    "fields,param",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objectx"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_regex": "a(b"}, "regex"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "one constraint"),
    ],
)
def test_an_invalid_constraint_is_a_400(live, fields, param):
    with pytest.raises(openai.BadRequestError, match=re.escape(param)):
        ask_chat(live, temperature=0, extra_body=fields)


def test_constraints_on_the_python_side():
    vlm = vlmkit.VLM.load("demo")
    import jsonschema

    turn = [{"role": "user", "content": [{"type": "text", "text": "Describe the picture."}]}]
    jsonschema.validate(json.loads(vlm.chat(turn, max_new_tokens=200, response_format=SCHEMA_FORMAT)), SCHEMA)
    assert vlm.generate("Is it red?", max_new_tokens=5, guided_choice=["yes", "no"]) in ("yes", "no")
    streamed = "".join(vlm.stream_chat(turn, max_new_tokens=200, guided_json=SCHEMA))
    jsonschema.validate(json.loads(streamed), SCHEMA)
    with pytest.raises(ValueError, match="beam search"):
        vlm.chat(turn, num_beams=2, guided_regex="a+")

"""Why vlmkit's structured output uses llguidance: the per-token cost of a JSON-schema mask (compute the mask,
take the token) in llguidance and in xgrammar, on the same path of 120 tokens the grammar allows, for the demo
model's tokenizer and for a 32k-token byte-level BPE trained here (the size of LLaMA's vocabulary).

    .venv/bin/pip install xgrammar   # benchmark-only (it brings triton along, even on a CPU machine)
    .venv/bin/python benchmarks/grammar_engines.py [vlmkit/demo/models/vipllava/tokenizer.json]

Both are fed the vocabulary as it is: llguidance reads tokenizer.json itself; xgrammar gets the token strings
(byte-level) through its TokenizerInfo.
"""

from __future__ import annotations

import json
import random
import sys
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def big_tokenizer(vocab: int) -> Tokenizer:
    """A byte-level BPE of `vocab` tokens trained on pseudo-words and a little JSON."""
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(40000)
    ]
    text = [" ".join(rng.choice(words) for _ in range(30)) + ' {"a": 1, "b": [2, 3]}' for _ in range(8000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return tok


schema = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "shape": {"enum": ["circle", "square", "triangle"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "note": {"type": "string", "maxLength": 4000},
    },
    "required": ["shape", "count", "note"],
}
prefix = '{"shape": "circle", "count": 12, "note": "'
body = "the quick brown fox jumps over the lazy dog " * 20


def run(tok: Tokenizer, name: str) -> None:
    """Print both engines' microseconds per token over the same allowed path of 120 tokens."""
    V = tok.get_vocab_size()
    eos = tok.token_to_id("</s>")
    from llguidance import LLMatcher, LLTokenizer

    lt = LLTokenizer(tok.to_str(), n_vocab=V, eos_token=[eos])
    grammar = LLMatcher.grammar_from_json_schema(
        json.dumps(schema),
        defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    )
    # a path the grammar allows: the text's own tokens while they fit, else a random allowed token
    probe, ids, rng = LLMatcher(lt, grammar), [], random.Random(1)
    want = tok.encode(prefix + body).ids
    for step in range(120):
        allowed = [i for i, b in enumerate(probe.compute_logit_bias()) if b and i != eos]
        nxt = want[step] if step < len(want) and want[step] in allowed else rng.choice(allowed)
        ids.append(nxt)
        probe.consume_token(nxt)
    m = LLMatcher(lt, grammar)
    t = time.perf_counter()
    n = 0
    for i in ids:
        m.compute_logit_bias()
        ok = m.consume_token(i)
        n += 1
        if not ok:
            break
    lg = (time.perf_counter() - t) / n * 1e6
    # xgrammar
    import xgrammar as xgr

    vocab = [None] * V
    for s, i in tok.get_vocab().items():
        vocab[i] = s
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=V, stop_token_ids=[eos])
    comp = xgr.GrammarCompiler(info)
    g = comp.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
    xm = xgr.GrammarMatcher(g)
    bm = xgr.allocate_token_bitmask(1, V)
    t = time.perf_counter()
    k = 0
    for i in ids:
        xm.fill_next_token_bitmask(bm)
        ok = xm.accept_token(i)
        k += 1
        if not ok:
            break
    xg = (time.perf_counter() - t) / k * 1e6
    print(f"{name}: vocab {V}, tokens {n}/{k}: llguidance {lg:.1f} us/token, xgrammar {xg:.1f} us/token")


DEMO = "vlmkit/demo/models/vipllava/tokenizer.json"
run(Tokenizer.from_file(sys.argv[1] if len(sys.argv) > 1 else DEMO), "demo tokenizer")
run(big_tokenizer(32000), "32k byte-level BPE")

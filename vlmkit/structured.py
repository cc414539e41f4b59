"""Structured output: answers held to a JSON schema, any JSON object, a regular expression, a Lark grammar or
a list of choices, by masking at every step the tokens that could not continue a match.

The grammar engine is llguidance: it reads the checkpoint's own `tokenizer.json` (no second tokenizer to keep
in step), compiles a JSON schema or regex in milliseconds, and computes a step's mask without holding the
interpreter lock, so where a mask is slow to compute the engine computes each row's next one while the model
runs the next forward (`Guide.advance`). `Constraint` is what a caller asks for (OpenAI's `response_format`, vLLM's `guided_*`);
`Guide` is one row's grammar state.
"""

from __future__ import annotations

import json
import re
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from vlmkit import safejson

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
# JSON as json.dumps writes it: a fixed space after ',' and ':' and no other whitespace. Free whitespace lets a
# model pad forever between tokens (small models do); a schema's "x-guidance" section may still allow it.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# the request fields that ask for a constraint: OpenAI's, then vLLM's
CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_grammar", "guided_choice")
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vlmkit-guide")


@dataclass(frozen=True)
class Constraint:
    """What every answer must match. kind: "json_schema" (spec: the schema, a dict), "json_object" (any JSON
    object), "regex" (spec: the pattern, matched in full), "grammar" (spec: a Lark grammar, or GBNF as
    llama.cpp writes it), "choice" (spec: a tuple of the allowed answers)."""

    kind: str
    spec: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}; one of {list(KINDS)}")

    def grammar(self) -> str:
        """The llguidance grammar of this constraint."""
        from llguidance import LLMatcher, gbnf_to_lark

        if self.kind == "json_schema":
            if not isinstance(self.spec, dict):
                raise ValueError(f"a JSON schema must be an object, got {type(self.spec).__name__}")
            return LLMatcher.grammar_from_json_schema(json.dumps(self.spec), defaults=JSON_LAYOUT)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=JSON_LAYOUT)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(str(self.spec))
        if self.kind == "choice":
            if not self.spec or not all(isinstance(c, str) and c for c in self.spec):
                raise ValueError("a choice constraint needs a non-empty list of non-empty strings")
            return LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.spec))
        text = str(self.spec)
        lark = text if "::=" not in text else gbnf_to_lark(text)
        return LLMatcher.grammar_from_lark(lark)

    def key(self) -> str:
        """A text that names this constraint exactly (its spec may be a dict, which does not hash)."""
        return json.dumps([self.kind, self.spec], sort_keys=True, default=list)


def constraint_from(
    *,
    response_format: dict[str, Any] | None = None,
    guided_json: dict[str, Any] | str | None = None,
    guided_regex: str | None = None,
    guided_grammar: str | None = None,
    guided_choice: list[str] | None = None,
) -> Constraint | None:
    """The one constraint the OpenAI (`response_format`) and vLLM (`guided_*`) fields ask for; None when they
    ask for none; ValueError when they ask for two or are malformed."""
    found: list[Constraint] = []
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_object":
            found.append(Constraint("json_object"))
        elif kind == "json_schema":
            section = response_format.get("json_schema")
            if not isinstance(section, dict) or not isinstance(section.get("schema"), dict):
                raise ValueError(
                    'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}'
                )
            found.append(Constraint("json_schema", section["schema"]))
        elif kind != "text":
            raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}")
    if guided_json is not None:
        schema = safejson.loads(guided_json) if isinstance(guided_json, str) else guided_json
        found.append(Constraint("json_schema", schema))
    if guided_regex is not None:
        found.append(Constraint("regex", guided_regex))
    if guided_grammar is not None:
        found.append(Constraint("grammar", guided_grammar))
    if guided_choice is not None:
        found.append(Constraint("choice", tuple(guided_choice)))
    if len(found) > 1:
        raise ValueError("ask for one constraint at a time (response_format or one guided_* field)")
    return found[0] if found else None


# llguidance's view of each vlmkit tokenizer, by vocabulary size and end tokens: built from tokenizer.json once
# per tokenizer, not once per constrained row (serializing and hashing a 2 MB tokenizer.json takes milliseconds)
_LLTOKENIZERS: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], Any]] = (
    weakref.WeakKeyDictionary()
)


def _lltokenizer(tokenizer: Any, n_vocab: int, eos: tuple[int, ...]) -> Any:
    from llguidance import LLTokenizer

    built = _LLTOKENIZERS.setdefault(tokenizer, {})
    if (n_vocab, eos) not in built:
        built[(n_vocab, eos)] = LLTokenizer(tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=list(eos))
    return built[(n_vocab, eos)]


def checked_grammar(constraint: Constraint, lltokenizer: Any = None) -> str:
    """The constraint's llguidance grammar, checked (against the tokenizer when given); ValueError naming the
    problem when the schema, pattern or grammar is invalid."""
    from llguidance import LLMatcher

    try:
        grammar = constraint.grammar()
    except ValueError as e:
        raise ValueError(f"invalid {constraint.kind}: {e}") from None
    error = LLMatcher.validate_grammar(grammar, lltokenizer)
    if error:
        raise ValueError(f"invalid {constraint.kind}: {error.splitlines()[0]}")
    return grammar


def check_constraint(constraint: Constraint) -> None:
    """Raise ValueError now, before any work, when the constraint is invalid (no tokenizer needed)."""
    checked_grammar(constraint)


_COMPILED: dict[tuple[str, int], tuple[Any, Any, bytes, float]] = {}


def _compiled(constraint: Constraint, lltokenizer: Any) -> tuple[Any, bytes, float]:
    """A matcher for the constraint at its start (to copy), its first mask, and how long that mask took;
    kept for the last 64 (constraint, tokenizer) pairs."""
    from llguidance import LLMatcher

    key = (constraint.key(), id(lltokenizer))
    hit = _COMPILED.get(key)
    if hit is not None and hit[0] is lltokenizer:
        return hit[1], hit[2], hit[3]
    matcher = LLMatcher(lltokenizer, checked_grammar(constraint, lltokenizer))
    first = matcher.compute_logit_bias()  # the first one also warms the matcher up: time the next ones
    seconds = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        matcher.compute_logit_bias()
        seconds = min(seconds, time.perf_counter() - started)
    if len(_COMPILED) >= 64:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = (lltokenizer, matcher, first, seconds)
    return matcher, first, seconds


class Guide:
    """One row's grammar state: which tokens may come next (`allowed`), advanced by each chosen token
    (`advance`). When a mask takes longer to compute than handing it to a worker thread costs (large
    vocabularies, complex grammars; timed on the constraint's first mask, once warm), `advance` starts the next one on a worker
    (llguidance releases the interpreter lock), so it overlaps whatever runs meanwhile, the next forward in
    the engine; else it is computed when asked for."""

    HANDOFF_S = 150e-6  # measured cost of a thread-pool round trip here; cheaper masks are computed in place

    def __init__(self, constraint: Constraint, tokenizer: Any, vocab_size: int, eos: list[int]) -> None:

        if not eos:
            raise ValueError("constrained decoding needs an end-of-answer token, and this tokenizer has none")
        lltok = _lltokenizer(tokenizer, vocab_size, tuple(eos))
        prototype, first, seconds = _compiled(constraint, lltok)
        self.constraint = constraint
        self.matcher = prototype.deep_copy()  # compiled once per constraint; a copy is much cheaper
        self.vocab_size = vocab_size
        self._ready: bytes | Future[bytes] | None = first
        self.background = seconds > self.HANDOFF_S

    def allowed(self) -> torch.Tensor:
        """(vocab_size,) bool: the tokens that keep the answer a possible match (EOS once it is complete)."""
        ready, self._ready = self._ready, None
        if ready is None:
            ready = self.matcher.compute_logit_bias()
        elif isinstance(ready, Future):
            ready = ready.result()
        # one byte per token, 0 where it is not allowed: cheaper to turn into a mask than a bitmask's bits
        mask = torch.frombuffer(bytearray(ready), dtype=torch.uint8)[: self.vocab_size].bool()
        if not bool(mask.any()):  # a dead end: the constraint needs text this model's tokens cannot write
            raise ValueError(
                f"no token of this model can continue an answer to the {self.constraint.kind} constraint "
                f"({self.matcher.get_error() or 'it needs characters the tokenizer has no tokens for'})"
            )
        return mask

    def advance(self, token: int) -> None:
        """Take the chosen token (one the mask allowed never fails); start the next mask if that pays."""
        if isinstance(self._ready, Future):  # never consume while a mask is being computed
            self._ready.result()
        self._ready = None
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        if self.background and not self.matcher.is_stopped():
            self._ready = _POOL.submit(self.matcher.compute_logit_bias)


def mask_scores(scores: torch.Tensor, guides: list[Guide | None]) -> torch.Tensor:
    """scores (R, V) with every token a row's guide does not allow at -inf (rows without one untouched)."""
    if not any(g is not None for g in guides):
        return scores
    if len(guides) == 1:  # one row (the engine's): one select, no copy first
        return torch.where(guides[0].allowed().to(scores.device), scores, -float("inf"))
    scores = scores.clone()
    for r, guide in enumerate(guides):
        if guide is not None:
            scores[r].masked_fill_(~guide.allowed().to(scores.device), -float("inf"))
    return scores

"""The engine's output stage: a row's next token from its logits (the same logits processors and sampler as
`generate`), its text as it grows (never half a character), stop strings (the one implementation
`generate` uses) and the end of the row."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmkit.generation import GenerationConfig, StopStrings, process_logits, sample
from vlmkit.structured import Guide, mask_scores
from vlmkit.tokenizer import IncrementalDecoder


@dataclass
class TokenLogprob:
    """One generated token's log-probability and, when asked, the most likely alternatives: (token text,
    log-probability), most likely first. Token text is the token decoded alone."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Event:
    """What a request hears: a text delta of choice `index`, then its end (finish_reason "stop", "length"
    or "cancelled", or "error" with a typed `vlmkit.serve.errors.EngineError`). With logprobs asked for,
    an event carries the tokens generated since the last one (those whose text it releases)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    error: Exception | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Row:
    """One running sequence (a request's choice) in one cache row."""

    request: Any  # vlmkit.serve.engine.Request
    index: int  # choice index
    config: GenerationConfig
    sequence: torch.Tensor  # (1, prompt + generated) token ids, for repetition-style processors
    length: int  # tokens in the cache (its next token goes to slot `length`)
    decoder: IncrementalDecoder
    stops: StopStrings
    generator: torch.Generator | None
    prompt: Any = None  # vlmkit.serve.cache.Prompt
    logprobs: int | None = None  # None: none; k: each token's log-probability and its k best alternatives
    held: list[TokenLogprob] = field(default_factory=list)  # log-probabilities not yet sent
    guide: Guide | None = None  # the row's grammar state when its answer must match a constraint
    key: int = -1  # the prompt's key in the engine's executor
    text: str = ""
    generated: int = 0
    pending: int | None = None  # the token sampled but not yet run through the model
    finished: bool = False


def choose(row: Row, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The row's next token from its logits (V,), and the scores it was drawn from (1, V): the logits after
    penalties, bias and (when sampling) temperature, top-k and top-p."""
    raw = mask_scores(logits[None].float(), [row.guide])
    scores = process_logits(raw, row.sequence, row.config, new_tokens=row.generated)
    return int(sample(scores, row.config, row.generator)[0]), scores


def plain_greedy(row: Row) -> bool:
    """Whether the row's next token is the argmax of its raw logits: greedy, with no grammar, no
    log-probabilities and no setting that changes the scores at this step."""
    c = row.config
    return (
        not c.sampling
        and row.guide is None
        and row.logprobs is None
        and c.repetition_penalty == 1.0
        and not c.bad_words_ids
        and not c.logit_bias
        and not ((c.presence_penalty or c.frequency_penalty) and row.generated)
        and not (row.generated < c.min_new_tokens and c.eos_token_id)
    )


def greedy_choices(rows: list[Row], logits: torch.Tensor) -> list[int | None]:
    """The next token of every `plain_greedy` row from the rows' logits (n, V), in one argmax for them all;
    None for the other rows, and for a row whose best score is not finite (NaN, +inf: `choose` settles
    those)."""
    plain = [i for i, row in enumerate(rows) if plain_greedy(row)]
    tokens: list[int | None] = [None] * len(rows)
    if not plain:
        return tokens
    best, index = logits[plain].float().max(-1)
    for i, ok, token in zip(plain, torch.isfinite(best).tolist(), index.tolist(), strict=True):
        tokens[i] = token if ok else None
    return tokens


def token_logprob(row: Row, token: int, scores: torch.Tensor) -> TokenLogprob:
    """log_softmax of the scores the token was drawn from, for it and the row's `logprobs` best tokens."""
    logprobs = torch.log_softmax(scores[0], dim=-1)
    decode = row.decoder.tokenizer.decode
    top = []
    if row.logprobs:
        values, ids = torch.topk(logprobs, min(row.logprobs, logprobs.shape[-1]))
        top = [(decode([i]), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return TokenLogprob(decode([token]), float(logprobs[token]), top)


def emit(row: Row, text: str = "", reason: str | None = None) -> None:
    """Send the row's text delta (or its end) with the log-probabilities held since the last event."""
    if reason is None and not text and not row.held:
        return
    row.request.emit(Event(row.index, text, reason, logprobs=row.held))
    row.held = []


def take(row: Row, logits: torch.Tensor, end: Callable[[Row, str], None], token: int | None = None) -> None:
    """Choose the row's next token (or take `token`, chosen already by `greedy_choices`), emit its text, and
    end the row (`end(row, reason)`) or leave the token pending (it runs through the model at the next
    step)."""
    scores = None
    if token is None:
        token, scores = choose(row, logits)
    req = row.request
    if req.first_token_at is None:
        req.first_token_at = time.monotonic()
    row.generated += 1
    req.completion_tokens += 1
    if token in row.config.eos_token_id:  # the end of the answer, not part of it: no text, no logprob
        end(row, "stop")
        return
    if row.guide is not None:
        row.guide.advance(token)  # and start its next mask, computed while the model runs the next step
    if row.logprobs is not None and scores is not None:
        row.held.append(token_logprob(row, token, scores))
    row.sequence = torch.cat([row.sequence, row.sequence.new_tensor([[token]])], 1)
    delta = row.decoder.push(token)
    if delta:
        before, row.text = row.text, row.text + delta
        cut = row.stops.find(before, row.text)
        if cut is not None:
            emit(row, row.text[len(before) : cut])
            row.text = row.text[:cut]
            end(row, "stop")
            return
        emit(row, delta)
    if row.generated >= row.config.max_new_tokens:
        emit(row, row.decoder.flush())
        end(row, "length")
        return
    row.pending = token

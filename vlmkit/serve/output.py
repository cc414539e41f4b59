"""The engine's output stage: a row's next token from its logits (the same logits processors and sampler as
`generate`), its text as it grows (never half a character), stop strings (the one implementation
`generate` uses) and the end of the row."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlmkit.generation import GenerationConfig, StopStrings, process_logits, sample
from vlmkit.tokenizer import IncrementalDecoder


@dataclass
class Event:
    """What a request hears: a text delta of choice `index`, then its end (finish_reason "stop", "length"
    or "cancelled", or "error" with a typed `vlmkit.serve.errors.EngineError`)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    error: Exception | None = None


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
    key: int = -1  # the prompt's key in the engine's executor
    text: str = ""
    generated: int = 0
    pending: int | None = None  # the token sampled but not yet run through the model
    finished: bool = False


def choose(row: Row, logits: torch.Tensor) -> int:
    """The row's next token from its logits (V,)."""
    scores = process_logits(logits[None].float(), row.sequence, row.config, new_tokens=row.generated)
    return int(sample(scores, row.config, row.generator)[0])


def take(row: Row, logits: torch.Tensor, end: Callable[[Row, str], None]) -> None:
    """Choose the row's next token, emit its text, and end the row (`end(row, reason)`) or leave the token
    pending (it runs through the model at the next step)."""
    token = choose(row, logits)
    req = row.request
    if req.first_token_at is None:
        req.first_token_at = time.monotonic()
    row.generated += 1
    req.completion_tokens += 1
    if token in row.config.eos_token_id:
        end(row, "stop")
        return
    row.sequence = torch.cat([row.sequence, row.sequence.new_tensor([[token]])], 1)
    delta = row.decoder.push(token)
    if delta:
        before, row.text = row.text, row.text + delta
        cut = row.stops.find(before, row.text)
        if cut is not None:
            if cut > len(before):
                req.emit(Event(row.index, row.text[len(before) : cut]))
            row.text = row.text[:cut]
            end(row, "stop")
            return
        req.emit(Event(row.index, delta))
    if row.generated >= row.config.max_new_tokens:
        tail = row.decoder.flush()
        if tail:
            req.emit(Event(row.index, tail))
        end(row, "length")
        return
    row.pending = token

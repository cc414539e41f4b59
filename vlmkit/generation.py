"""Generation: a preallocated KV cache, image work done once, and decoding that returns what transformers'
`generate` returns token for token.

The pieces, smallest first: `process_logits` (the reference's logits processors, in its order), `sample`
(pick the next token), `decode_tokens` (the one generator of token ids that generate, streaming, the CLI and
the server consume), `vlmkit.beams.beam_search`, and `GenerationMixin.generate`. A model provides `start_session`, which
runs the prompt once (vision tower, projector or resampler, cross-attention keys/values, prefill) and
returns a `vlmkit.runner.DecoderSession` whose `step` feeds one token per row through the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vlmkit.runner import DecoderSession
from vlmkit.structured import Constraint, Guide, mask_scores

# -------------------------------------------------------------------------------------------------
# Settings
# -------------------------------------------------------------------------------------------------

# The answer budget wherever a person asks (VLM, CLI, server) and sets none. `GenerationConfig` keeps the
# reference's own default (20) so that `model.generate` matches transformers call for call.
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class GenerationConfig:
    """Decoding settings, with the reference's names and defaults. `validate` raises ValueError on any
    setting that would fail later or silently mean something else."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bad_words_ids: list[list[int]] | None = None
    stop_strings: list[str] | None = None
    # OpenAI's, applied to the raw logits first (off by default, so `generate` stays the reference's):
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    logit_bias: dict[int, float] | None = None  # added to the logits of these token ids
    constraint: Constraint | None = None  # what every answer must match (vlmkit.structured); needs tokenizer=

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            bad(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            bad(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if self.temperature is None or not math.isfinite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            bad(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.top_p is None or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if (
            self.repetition_penalty is None
            or not math.isfinite(self.repetition_penalty)
            or self.repetition_penalty <= 0
        ):
            bad(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            bad(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            bad(f"num_return_sequences must be an integer >= 1, got {self.num_return_sequences!r}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            bad(
                f"num_return_sequences ({self.num_return_sequences}) must not exceed num_beams ({self.num_beams})"
            )
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            bad(
                "greedy decoding returns one sequence per input: set do_sample=True or num_beams >= "
                f"num_return_sequences ({self.num_return_sequences})"
            )
        if self.early_stopping not in (True, False, "never"):
            bad(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.bad_words_ids is not None and (
            not isinstance(self.bad_words_ids, list)
            or not all(
                isinstance(w, list) and w and all(isinstance(i, int) and i >= 0 for i in w)
                for w in self.bad_words_ids
            )
        ):
            bad("bad_words_ids must be a list of non-empty lists of token ids")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                bad(f"{name} must be a number in [-2, 2], got {value!r}")
        if self.logit_bias is not None and (
            not isinstance(self.logit_bias, dict)
            or not all(
                isinstance(k, int) and k >= 0 and isinstance(v, (int, float)) and -100 <= v <= 100
                for k, v in self.logit_bias.items()
            )
        ):
            bad("logit_bias must map token ids (integers >= 0) to biases in [-100, 100]")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            bad(f"constraint must be a vlmkit.structured.Constraint, got {type(self.constraint).__name__}")
        if self.constraint is not None and self.num_beams > 1:
            bad(
                "a constraint holds one answer per row to a grammar; beam search (num_beams > 1) does not take one"
            )
        if self.stop_strings is not None and (
            not isinstance(self.stop_strings, list)
            or not all(isinstance(s, str) and s for s in self.stop_strings)
        ):
            bad("stop_strings must be a list of non-empty strings")

    @property
    def sampling(self) -> bool:
        return self.do_sample and self.temperature > 0


def make_config(eos_default: list[int], pad_default: int | None, **kwargs: Any) -> GenerationConfig:
    """GenerationConfig from generate() keywords: eos_token_id may be an int or a list (None: the model's);
    pad_token_id None means the model's, else the first EOS id, as the reference does."""
    unknown = set(kwargs) - set(GenerationConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown generation arguments: {sorted(unknown)}")
    eos = kwargs.pop("eos_token_id", None)
    eos = eos_default if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if not all(isinstance(i, int) for i in eos):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos!r}")
    pad = kwargs.pop("pad_token_id", None)
    pad = pad if pad is not None else pad_default if pad_default is not None else (eos[0] if eos else None)
    if isinstance(kwargs.get("stop_strings"), str):
        kwargs["stop_strings"] = [kwargs["stop_strings"]]
    config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, **kwargs)
    config.validate()
    return config


# -------------------------------------------------------------------------------------------------
# Logits processing and sampling
# -------------------------------------------------------------------------------------------------


def process_logits(
    scores: torch.Tensor,
    sequences: torch.Tensor,
    config: GenerationConfig,
    *,
    new_tokens: int,
    beams: bool = False,
) -> torch.Tensor:
    """The reference's processors in its order: repetition penalty, bad words, min_new_tokens; with sampling
    also temperature, top-k, top-p. Before them, OpenAI's presence and frequency penalties (counted over the
    `new_tokens` generated) and logit bias, when set. scores (B, V) fp32; sequences (B, T) hold prompt and
    generated tokens."""
    scores = openai_adjustments(scores, sequences, config, new_tokens)
    if config.repetition_penalty != 1.0:
        seen = torch.gather(scores, 1, sequences)
        seen = torch.where(seen < 0, seen * config.repetition_penalty, seen / config.repetition_penalty)
        scores = scores.scatter(1, sequences, seen)
    if config.bad_words_ids:
        scores = ban_bad_words(scores, sequences, config.bad_words_ids, config.eos_token_id)
    if new_tokens < config.min_new_tokens and config.eos_token_id:
        scores = scores.clone()
        scores[:, config.eos_token_id] = -float("inf")
    if config.sampling:
        keep = len(config.eos_token_id) + 1 if beams else 1
        if config.temperature != 1.0:
            scaled = scores / config.temperature
            if bool(
                (~torch.isfinite(scaled) & torch.isfinite(scores)).any()
            ):  # a tiny temperature overflowed
                # (or underflowed to 0 in the scores' dtype): the same distribution, its order kept
                top = scores.masked_fill(~torch.isfinite(scores), -torch.inf).amax(-1, keepdim=True)
                scaled = (scores - top) / max(config.temperature, torch.finfo(scores.dtype).tiny)
            scores = scaled
        if config.top_k:
            k = min(max(config.top_k, keep), scores.shape[-1])
            kth = torch.topk(scores, k).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if config.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - config.top_p)
            drop[..., -keep:] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def openai_adjustments(
    scores: torch.Tensor, sequences: torch.Tensor, config: GenerationConfig, new_tokens: int
) -> torch.Tensor:
    """scores - frequency_penalty * count - presence_penalty * (count > 0) over the generated tokens, plus
    logit_bias, as the OpenAI API defines them."""
    if (config.presence_penalty or config.frequency_penalty) and new_tokens:
        generated = sequences[:, sequences.shape[1] - new_tokens :]
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        scores = (
            scores
            - config.frequency_penalty * counts
            - config.presence_penalty * (counts > 0).to(scores.dtype)
        )
    if config.logit_bias:
        ids = torch.tensor(list(config.logit_bias), device=scores.device)
        if int(ids.max()) >= scores.shape[-1]:
            raise ValueError(
                f"logit_bias names token id {int(ids.max())}, outside the vocabulary of {scores.shape[-1]} tokens"
            )
        bias = torch.tensor(list(config.logit_bias.values()), dtype=scores.dtype, device=scores.device)
        scores = scores.clone()
        scores[:, ids] += bias
    return scores


def ban_bad_words(
    scores: torch.Tensor, sequences: torch.Tensor, bad_words: list[list[int]], eos: list[int]
) -> torch.Tensor:
    """A single-token bad word is never produced; a longer one never completed (its last token is banned
    when the row ends with the rest). Single EOS ids are not banned, as in the reference."""
    scores = scores.clone()
    vocab = scores.shape[-1]
    for word in bad_words:
        if len(word) == 1 and word[0] in eos:
            continue
        last = word[-1]
        if last >= vocab:
            continue
        prefix = word[:-1]
        if not prefix:
            scores[:, last] = -float("inf")
            continue
        if len(prefix) > sequences.shape[1]:
            continue
        tail = sequences[:, -len(prefix) :]
        hit = (tail == torch.tensor(prefix, device=sequences.device)).all(dim=-1)
        scores[hit, last] = -float("inf")
    return scores


def sample(
    scores: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token per row (B,): argmax, or a draw from softmax(scores) when sampling."""
    if not config.sampling:
        if not bool(torch.isfinite(scores.amax(-1)).all()):  # NaN (it wins an argmax), +inf, or all -inf
            scores = settled(scores)
        return torch.argmax(scores, dim=-1)
    probs = F.softmax(scores, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        probs = F.softmax(settled(scores), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def settled(scores: torch.Tensor) -> torch.Tensor:
    """Scores whose softmax (and argmax) is defined, for rows that overflowed: a tiny temperature or
    repetition penalty (1e-300, 0 in float32) divides finite logits into +inf and turns a masked -inf into
    NaN (-inf * 0). Such a row's +inf tokens are the limit of its distribution (equally likely, the rest
    impossible), and NaN is no chance; a row left with no possible token is a ValueError."""
    scores = torch.nan_to_num(scores, nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    top = scores == torch.inf
    scores = torch.where(top.any(-1, keepdim=True), torch.where(top, 0.0, -torch.inf), scores)
    if bool((scores == -torch.inf).all(-1).any()):
        raise ValueError(
            "no token is possible: every score is -inf or NaN after the sampling settings (a constraint, "
            "logit_bias, or an extreme penalty or temperature)"
        )
    return scores


# -------------------------------------------------------------------------------------------------
# Stopping
# -------------------------------------------------------------------------------------------------


class StopStrings:
    """Stop strings, found in text as it grows. One implementation for `generate` (which asks, per token,
    whether the last token completed one, as the reference's StopStringCriteria) and the server (which
    also cuts its answer where the first completed one starts)."""

    def __init__(self, stop_strings: Sequence[str], decode: Callable[[list[int]], str] | None = None) -> None:
        self.stop_strings = [s for s in stop_strings if s]
        self.decode = decode
        # tokens of context that cover any stop string
        self.window = 8 + max((len(s) for s in self.stop_strings), default=0)

    def find(self, before: str, now: str) -> int | None:
        """Where the earliest stop string that `now` completes starts: an occurrence that ends past
        `before` (the text one step earlier, a prefix of `now`); None when there is none."""
        found = [
            at
            for s in self.stop_strings
            if (at := now.find(s, max(0, len(before) - len(s) + 1))) >= 0 and at + len(s) > len(before)
        ]
        return min(found) if found else None

    def hit(self, tokens: list[int]) -> bool:
        """True when the last token completes a stop string (decoding the last `window` tokens)."""
        tail = tokens[-self.window :]
        return self.find(self.decode(tail[:-1]), self.decode(tail)) is not None


# -------------------------------------------------------------------------------------------------
# Decoding: a session (vlmkit.runner.DecoderSession) runs the prompt once, then one token at a time
# -------------------------------------------------------------------------------------------------


def decode_tokens(
    session: DecoderSession,
    config: GenerationConfig,
    prompt_ids: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    decode: Callable[[list[int]], str] | None = None,
    tokenizer: Any = None,
) -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding. Yields the next token of every row (R,) at each step, R = B *
    num_return_sequences; a finished row yields the pad id. Stops at max_new_tokens or when every row hit an
    EOS id or a stop string. With a constraint, every row's tokens are held to it (`tokenizer` builds the
    grammar's view of the vocabulary)."""
    if config.max_new_tokens == 0:
        return
    logits = session.prefill()
    n = config.num_return_sequences
    if n > 1:
        session.expand(n)
        logits = logits.repeat_interleave(n, dim=0)
        prompt_ids = prompt_ids.repeat_interleave(n, dim=0)
    rows = prompt_ids.shape[0]
    eos = torch.tensor(config.eos_token_id or [-1], device=prompt_ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else -1
    unfinished = torch.ones(rows, dtype=torch.bool, device=prompt_ids.device)
    stops = StopStrings(config.stop_strings, decode) if config.stop_strings else None
    if config.stop_strings and decode is None:
        raise ValueError("stop_strings need a tokenizer to decode with: pass tokenizer=...")
    T = prompt_ids.shape[1]
    sequences = torch.empty(rows, T + config.max_new_tokens, dtype=torch.long, device=prompt_ids.device)
    sequences[:, :T] = prompt_ids  # what the processors look back on, filled one column per step
    # stop strings may start in the prompt: keep its last tokens as context
    generated = [row[-stops.window :] for row in prompt_ids.tolist()] if stops else []
    guides: list[Guide | None] = []
    if config.constraint is not None:
        if tokenizer is None:
            raise ValueError("a constraint needs the tokenizer: pass tokenizer=...")
        guides = [
            Guide(config.constraint, tokenizer, logits.shape[-1], config.eos_token_id) for _ in range(rows)
        ]
    for i in range(config.max_new_tokens):
        scores = process_logits(
            mask_scores(logits.float(), guides), sequences[:, : T + i], config, new_tokens=i
        )
        tokens = sample(scores, config, generator)
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        sequences[:, T + i] = tokens
        unfinished &= ~torch.isin(tokens, eos)
        for r, guide in enumerate(guides):
            if guide is not None and bool(unfinished[r]):
                guide.advance(int(tokens[r]))
            elif guide is not None:
                guides[r] = None  # an ended row needs no more masks
        if stops is not None:
            for r, t in enumerate(tokens.tolist()):
                generated[r].append(t)
                if unfinished[r] and stops.hit(generated[r]):
                    unfinished[r] = False
        yield tokens
        if i + 1 == config.max_new_tokens or not bool(unfinished.any()):
            return
        logits = session.step(tokens)


# -------------------------------------------------------------------------------------------------
# generate() for every model
# -------------------------------------------------------------------------------------------------


class GenerationMixin:
    """`generate` and `stream_tokens` for a model with `start_session(**inputs, max_len, ...)`."""

    def default_eos(self) -> list[int]:
        eos = getattr(self.config, "eos_token_id", None) or getattr(
            getattr(self.config, "text_config", None), "eos_token_id", None
        )
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def default_pad(self) -> int | None:
        return getattr(self.config, "pad_token_id", None)

    def check_prompt_length(self, input_ids: torch.Tensor) -> None:
        """Refuse, before any work, a prompt longer than the text model's context (max_position_embeddings):
        attention over it would take memory quadratic in its length, and positions past the context were never
        trained."""
        text = getattr(self.config, "text_config", self.config)
        limit = getattr(text, "max_position_embeddings", None)
        if limit is not None and input_ids.shape[-1] > limit:
            raise ValueError(
                f"the prompt is {input_ids.shape[-1]} tokens long, more than this model's context of {limit} "
                f"tokens (max_position_embeddings); shorten it"
            )

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Same arguments and output layout as transformers' generate: (B * num_return_sequences,
        prompt + new), rows of one input next to each other, finished rows padded with pad_token_id.

        Image inputs are the model's forward arguments (pixel_values, image_attention_mask, ...).
        `tokenizer` is needed for stop_strings (anything with `decode`) and a constraint (a vlmkit tokenizer).
        """
        config, inputs = self._split_generation_kwargs(kwargs)
        decode = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else None
        if config.stop_strings and decode is None:
            raise ValueError("stop_strings need a tokenizer to decode with: pass tokenizer=...")
        self.check_prompt_length(input_ids)
        session = self.start_session(input_ids, attention_mask=attention_mask, config=config, **inputs)
        try:
            if config.num_beams > 1:
                if config.max_new_tokens == 0:
                    return input_ids.repeat_interleave(config.num_return_sequences, dim=0)
                from vlmkit.beams import beam_search

                return beam_search(session, config, input_ids, generator=generator, decode=decode)
            steps = list(
                decode_tokens(
                    session, config, input_ids, generator=generator, decode=decode, tokenizer=tokenizer
                )
            )
        finally:
            session.close()
        prompt = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        if not steps:
            return prompt
        return torch.cat([prompt, torch.stack(steps, dim=1)], dim=1)

    def stream_tokens(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> Iterator[torch.Tensor]:
        """The tokens of each step as they come (R,); greedy or sampling (beam search cannot stream)."""
        config, inputs = self._split_generation_kwargs(kwargs)
        if config.num_beams > 1:
            raise ValueError("beam search cannot stream: its best sequence is known only at the end")
        decode = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else None
        self.check_prompt_length(input_ids)
        with torch.inference_mode():
            session = self.start_session(input_ids, attention_mask=attention_mask, config=config, **inputs)
        try:
            steps = decode_tokens(
                session, config, input_ids, generator=generator, decode=decode, tokenizer=tokenizer
            )
            while True:
                with torch.inference_mode():
                    token = next(steps, None)
                if token is None:
                    return
                yield token
        finally:
            session.close()

    def _split_generation_kwargs(self, kwargs: dict[str, Any]) -> tuple[GenerationConfig, dict[str, Any]]:
        names = set(GenerationConfig.__dataclass_fields__)
        gen = {k: v for k, v in kwargs.items() if k in names}
        inputs = {k: v for k, v in kwargs.items() if k not in names}
        allowed = set(self.generation_inputs)
        unknown = set(inputs) - allowed
        if unknown:
            raise ValueError(f"unknown generate() arguments: {sorted(unknown)}")
        return make_config(self.default_eos(), self.default_pad(), **gen), inputs

"""Generation: a preallocated KV cache, image work done once, and decoding that returns what transformers'
`generate` returns token for token.

The pieces, smallest first: `process_logits` (the reference's logits processors, in its order), `sample`
(pick the next token), `decode_tokens` (the one generator of token ids that generate, streaming, the CLI and
the server consume), `beam_search`, and `GenerationMixin.generate`. A model provides `start_session`, which
runs the prompt once (vision tower, projector or resampler, cross-attention keys/values, prefill) and
returns a `Session` whose `step` feeds one token per row through the cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

# -------------------------------------------------------------------------------------------------
# Settings
# -------------------------------------------------------------------------------------------------


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

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            bad(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            bad(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if self.temperature is None or self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            bad(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.top_p is None or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.repetition_penalty is None or self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
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
    also temperature, top-k, top-p. scores (B, V) fp32; sequences (B, T) hold prompt and generated tokens."""
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
            scores = scores / config.temperature
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
        return torch.argmax(scores, dim=-1)
    probs = F.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# -------------------------------------------------------------------------------------------------
# Stopping
# -------------------------------------------------------------------------------------------------


class StopStrings:
    """Finds, per row, the step at which generated text first completes one of the stop strings."""

    def __init__(self, stop_strings: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        self.stop_strings = list(stop_strings)
        self.decode = decode
        self.window = 8 + max(
            len(s) for s in self.stop_strings
        )  # tokens of context that cover any stop string

    def hit(self, tokens: list[int]) -> bool:
        """True when the last token completes a stop string: an occurrence in the text ends inside the last
        token's text (so it was not complete one token earlier), as the reference's StopStringCriteria."""
        tail = tokens[-self.window :]
        before, now = self.decode(tail[:-1]), self.decode(tail)
        for s in self.stop_strings:
            at = now.rfind(s)
            if at >= 0 and at + len(s) > len(before):
                return True
        return False


# -------------------------------------------------------------------------------------------------
# Sessions: a prompt run once, then one token at a time
# -------------------------------------------------------------------------------------------------


class Session(Protocol):
    def prefill(self) -> torch.Tensor:
        """Run the prompt; return the last position's logits (B, V)."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); return the next logits (B, V)."""

    def expand(self, n: int) -> None:
        """Repeat every row n times in place (beams, several return sequences)."""

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search)."""

    def close(self) -> None:
        """Free the cache."""


def decode_tokens(
    session: Session,
    config: GenerationConfig,
    prompt_ids: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding. Yields the next token of every row (R,) at each step, R = B *
    num_return_sequences; a finished row yields the pad id. Stops at max_new_tokens or when every row hit an
    EOS id or a stop string."""
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
    for i in range(config.max_new_tokens):
        scores = process_logits(logits.float(), sequences[:, : T + i], config, new_tokens=i)
        tokens = sample(scores, config, generator)
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        sequences[:, T + i] = tokens
        unfinished &= ~torch.isin(tokens, eos)
        if stops is not None:
            for r, t in enumerate(tokens.tolist()):
                generated[r].append(t)
                if unfinished[r] and stops.hit(generated[r]):
                    unfinished[r] = False
        yield tokens
        if i + 1 == config.max_new_tokens or not bool(unfinished.any()):
            return
        logits = session.step(tokens)


def beam_search(
    session: Session,
    config: GenerationConfig,
    prompt_ids: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> torch.Tensor:
    """Beam search as the reference's vectorised implementation does it (K = max(2, 1 + n_eos) * beams
    candidates per input, finished hypotheses kept in a second beam set, its early-stop heuristic and
    length penalty). Returns (B * num_return_sequences, prompt + generated)."""
    B, T = prompt_ids.shape
    nb, n_ret = config.num_beams, config.num_return_sequences
    max_len = T + config.max_new_tokens
    device = prompt_ids.device
    eos_ids = config.eos_token_id
    keep = max(2, 1 + len(eos_ids)) * nb
    top_beams = torch.arange(keep, device=device) < nb
    # the reference fills unused slots with `pad or eos[0]`: a pad id of 0 falls through to EOS
    fill = config.pad_token_id if config.pad_token_id else (eos_ids[0] if eos_ids else -1)
    running = torch.full((B, nb, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :T] = prompt_ids[:, None]
    finished = running.clone()
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = -1e9
    finished_scores = torch.full((B, nb), -1e9, device=device)
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    running_lengths = torch.zeros(B, nb, dtype=torch.long, device=device)  # generated tokens per beam
    finished_lengths = torch.zeros(B, nb, dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids or [-1], device=device)
    stops = StopStrings(config.stop_strings, decode) if config.stop_strings else None
    if config.stop_strings and decode is None:
        raise ValueError("stop_strings need a tokenizer to decode with: pass tokenizer=...")

    logits = session.prefill()
    session.expand(nb)
    logits = logits.repeat_interleave(nb, dim=0)
    cur = T
    hits = torch.zeros(B, keep, dtype=torch.bool, device=device)
    while cur < max_len:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        flat_seq = running[:, :, :cur].reshape(B * nb, cur)
        log_probs = process_logits(log_probs, flat_seq, config, new_tokens=cur - T, beams=True)
        V = log_probs.shape[-1]
        total = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        if config.sampling:
            idx = torch.multinomial(F.softmax(total, dim=-1), keep, generator=generator)
            cand_scores = torch.gather(total, 1, idx)
        else:
            cand_scores, idx = torch.topk(total, keep)
        src_beam, token = idx // V, idx % V  # (B, K)
        cand = torch.gather(running, 1, src_beam[:, :, None].expand(-1, -1, max_len)).clone()
        cand[:, :, cur] = token
        cand_lengths = torch.gather(running_lengths, 1, src_beam) + 1
        hits = torch.isin(token, eos) | (cur + 1 >= max_len)
        if stops is not None:
            for b in range(B):
                for k in range(keep):
                    if not hits[b, k] and stops.hit(
                        cand[b, k, max(0, cur + 1 - stops.window) : cur + 1].tolist()
                    ):
                        hits[b, k] = True
        # beams that continue: the best `nb` candidates that did not stop
        live_scores = cand_scores - hits.float() * 1e9
        pick = torch.topk(live_scores, nb).indices
        next_running = torch.gather(cand, 1, pick[:, :, None].expand(-1, -1, max_len))
        running_scores = torch.gather(live_scores, 1, pick)
        running_lengths = torch.gather(cand_lengths, 1, pick)
        parent = torch.gather(src_beam, 1, pick)  # (B, nb) beam each survivor came from
        # finished hypotheses: the candidates among the top nb that stopped, length-normalised
        done_now = hits & top_beams[None]
        normed = cand_scores / ((cur + 1 - T) ** config.length_penalty)
        full = is_finished.all(dim=-1, keepdim=True) & (config.early_stopping is True)
        normed = normed - full.float() * 1e9 - (~improvable).float() * 1e9 - (~done_now).float() * 1e9
        merged_scores = torch.cat([finished_scores, normed], dim=1)
        best = torch.topk(merged_scores, nb).indices
        finished = torch.gather(torch.cat([finished, cand], 1), 1, best[:, :, None].expand(-1, -1, max_len))
        finished_scores = torch.gather(merged_scores, 1, best)
        finished_lengths = torch.gather(torch.cat([finished_lengths, cand_lengths], 1), 1, best)
        is_finished = torch.gather(torch.cat([is_finished, done_now], 1), 1, best)
        running = next_running
        cur += 1
        # can a running beam still beat the worst finished one?
        if config.early_stopping == "never" and config.length_penalty > 0:
            best_len = max_len - T
        else:
            best_len = cur - T
        best_running = running_scores[:, :1] / (best_len**config.length_penalty)
        worst_done = torch.where(
            is_finished, finished_scores.min(dim=1, keepdim=True).values, torch.tensor(-1e9, device=device)
        )
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        still_open = ~(is_finished.all() & (config.early_stopping is True))
        if not (bool(improvable.any()) and bool(still_open) and not bool(hits.all())) or cur >= max_len:
            break
        session.reorder((parent + torch.arange(B, device=device)[:, None] * nb).reshape(-1))
        logits = session.step(running[:, :, cur - 1].reshape(-1))
    out = finished[:, :n_ret].reshape(B * n_ret, max_len)
    length = int(finished_lengths[:, :n_ret].max())
    return out[:, : T + length]


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
        `tokenizer` (anything with `decode`) is needed for stop_strings.
        """
        config, inputs = self._split_generation_kwargs(kwargs)
        decode = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else None
        if config.stop_strings and decode is None:
            raise ValueError("stop_strings need a tokenizer to decode with: pass tokenizer=...")
        session = self.start_session(input_ids, attention_mask=attention_mask, config=config, **inputs)
        try:
            if config.num_beams > 1:
                if config.max_new_tokens == 0:
                    return input_ids.repeat_interleave(config.num_return_sequences, dim=0)
                return beam_search(session, config, input_ids, generator=generator, decode=decode)
            steps = list(decode_tokens(session, config, input_ids, generator=generator, decode=decode))
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
        with torch.inference_mode():
            session = self.start_session(input_ids, attention_mask=attention_mask, config=config, **inputs)
        try:
            steps = decode_tokens(session, config, input_ids, generator=generator, decode=decode)
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


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions of the prompt as the reference's generate makes them: count of real tokens so far,
    padding at 0."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


class DecoderSession(ABC):
    """The bookkeeping both families share: an attention mask that grows one slot per step, rotary
    positions that continue from the prompt's, and row selection over the KV caches. Subclasses give
    `prefill` and `forward_tokens`."""

    def __init__(
        self, layers: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
    ) -> None:
        B, T = input_ids.shape
        self.layers = layers
        self.input_ids = input_ids
        self.prompt_len = self.t = T
        self.mask = torch.zeros(B, T + max_new_tokens, dtype=torch.long, device=input_ids.device)
        self.mask[:, :T] = 1 if attention_mask is None else attention_mask
        self.positions = generation_positions(self.mask[:, :T])  # (B, T)
        self.next_pos = self.positions[:, -1:] + 1  # (B, 1)
        self.rows: dict[str, Any] = {}  # anything else held per row (tensors, or lists/tuples of them)

    @abstractmethod
    def prefill(self) -> torch.Tensor:
        """Run the prompt (and its images) into the cache; return the last position's logits (B, V)."""

    @abstractmethod
    def forward_tokens(
        self,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        input_pos: torch.Tensor,
        key_len: int,
    ) -> torch.Tensor:
        """Run tokens (B, 1) through the cached decoder; return logits (B, V)."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.t
        self.mask[:, t] = 1
        logits = self.forward_tokens(
            tokens[:, None],
            attention_mask=self.mask[:, : t + 1],
            position_ids=self.next_pos,
            input_pos=torch.tensor([t], device=tokens.device),
            key_len=t + 1,
        )
        self.t += 1
        self.next_pos = self.next_pos + 1
        return logits

    def select(self, index: torch.Tensor) -> None:
        self.mask = self.mask.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        for layer in self.layers:
            layer.self_attn.kv_cache.select_rows(index)
        self.rows = {k: select_rows(v, index) for k, v in self.rows.items()}

    def expand(self, n: int) -> None:
        rows = torch.arange(self.mask.shape[0], device=self.mask.device)
        self.select(rows.repeat_interleave(n))

    def reorder(self, index: torch.Tensor) -> None:
        self.select(index)

    def close(self) -> None:
        from vlmkit.llama import setup_kv_cache

        setup_kv_cache(self.layers, 0, 0)


def select_rows(value: Any, index: torch.Tensor) -> Any:
    """index_select along dim 0 through tensors and (nested) lists and tuples of them; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index)
    if isinstance(value, (list, tuple)):
        return type(value)(select_rows(v, index) for v in value)
    return value

"""Continuous batching for one model: requests join and leave the running batch between decode steps.

The engine knows a model only through the runner interface (`vlmkit.runner.Runner`), and runs schedule ->
execute -> update in one thread, with its parts in their own modules:
- `Scheduler` (scheduler.py): the waiting queue, admission into free rows, compaction;
- `CacheManager` (cache.py): every row's keys/values, the prefix cache of prompt and answer blocks (hash
  chained over tokens and the pictures they depend on), the feature cache;
- the runner (the model): `plan`, `encode`, `prompt_images`, `prefill`, `decode`, and its `row_store` of
  per-row family state;
- the output stage (output.py): sampling, stop strings, detokenization.

Every running sequence owns one row of the cache: its prompt sits in slots 0..L-1 and each step writes its
new token at its own next slot, so rows of any length decode together in one forward with a per-row mask
and per-row rotary positions. A joining request's prompt runs alone, straight into a free row, after the
blocks the prefix cache already holds. Callers get their events through a callback.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmkit.generation import DEFAULT_MAX_NEW_TOKENS, GenerationConfig, StopStrings, make_config
from vlmkit.llama import check_text_inputs
from vlmkit.models import family_of, stop_token_ids
from vlmkit.modules import CacheSlots
from vlmkit.serve.cache import CacheManager, PrefixCache, Prompt
from vlmkit.serve.config import EngineConfig
from vlmkit.serve.errors import (
    EngineError,
    EngineFailure,
    InvalidRequest,
    QueueFull,
    RequestTimeout,
)
from vlmkit.serve.output import Event, Row, take
from vlmkit.serve.scheduler import Scheduler
from vlmkit.tokenizer import IncrementalDecoder

__all__ = ["Engine", "EngineConfig", "Event", "PrefixCache", "QueueFull", "Request", "SamplingParams"]

log = logging.getLogger("vlmkit.serve")
RUNNER_METHODS = ("plan", "encode", "prompt_images", "prefill", "decode", "row_store")


@dataclass
class SamplingParams:
    """A request's settings, as the OpenAI API names them; `generate_kwargs` maps them onto `generate`'s."""

    max_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1

    def generate_kwargs(self) -> dict[str, Any]:
        sampling = self.temperature > 0
        return dict(
            max_new_tokens=self.max_tokens,
            do_sample=sampling,
            temperature=self.temperature if sampling else 1.0,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            stop_strings=list(self.stop) or None,
        )


@dataclass
class Request:
    inputs: dict[str, torch.Tensor]  # processor output for one prompt (batch of 1)
    params: SamplingParams
    emit: Callable[[Event], None]
    deadline: float | None = None  # time.monotonic() after which the request is cut off
    id: str = ""  # the caller's request id, for logs
    config: GenerationConfig | None = None  # `params` as generate's settings, set by Engine.submit
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    completion_tokens: int = 0
    open_rows: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Continuous batching over `model` (any family that implements the runner) with its tokenizer;
    settings in `EngineConfig` (keyword overrides accepted: `Engine(model, tok, max_batch=4)`)."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, config: EngineConfig | None = None, **overrides: Any
    ):
        missing = [m for m in RUNNER_METHODS if not callable(getattr(model, m, None))]
        if missing:
            raise TypeError(
                f"the engine serves models that implement vlmkit.runner.Runner; {type(model).__name__} "
                f"lacks {missing}"
            )
        self.config = dataclasses.replace(config or EngineConfig(), **overrides)
        c = self.config
        self.model, self.tokenizer = model, tokenizer
        self.eos = stop_token_ids(tokenizer, family_of(model))
        self.pad = tokenizer.pad_token_id
        self.scheduler = Scheduler(c.max_batch, c.max_queue)
        self.cache = CacheManager(
            model,
            max_batch=c.max_batch,
            max_seq_len=c.max_seq_len,
            feature_cache=c.feature_cache,
            prefix_cache_mb=c.prefix_cache_mb,
            prefix_block=c.prefix_block,
        )
        self.states = model.row_store(c.max_batch)
        self.features, self.prefix = self.cache.features, self.cache.prefix
        self.steps = 0
        self.error: EngineFailure | None = None
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="vlmkit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is running and waiting, then stop the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        """Queue a request; raises InvalidRequest (bad settings, too long) or QueueFull."""
        if self._stop.is_set():
            raise QueueFull("the server is shutting down")
        request.config = self.generation_config(request.params)  # invalid settings raise here, not later
        request.prompt_tokens = int(request.inputs["input_ids"].shape[1])
        limit = self.config.max_seq_len
        if request.prompt_tokens + request.params.max_tokens > limit:
            raise InvalidRequest(
                f"prompt ({request.prompt_tokens} tokens) + max_tokens ({request.params.max_tokens}) exceeds "
                f"this server's limit of {limit} tokens; shorten the prompt or lower max_tokens"
            )
        self.scheduler.enqueue(request)
        self._wake.set()

    def generation_config(self, params: SamplingParams) -> GenerationConfig:
        n = params.n
        if n < 1 or n > self.config.max_batch:
            raise InvalidRequest(f"n must be between 1 and {self.config.max_batch}, got {n}")
        try:
            return make_config(self.eos, self.pad, **params.generate_kwargs())
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    @property
    def running(self) -> int:
        return self.scheduler.running

    # -- joining --------------------------------------------------------------------------------

    def _plan(self, request: Request) -> Prompt:
        inputs = request.inputs
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        check_text_inputs(ids, mask, None)
        if ids.shape[0] != 1 or (mask is not None and not bool(mask.all())):
            raise InvalidRequest(
                f"the engine takes one unpadded prompt per request; got input_ids {tuple(ids.shape)}"
                + ("" if mask is None else f" with {int((mask == 0).sum())} padding positions")
            )
        return self.cache.plan(self.model.plan(inputs))

    def _admit(self) -> None:
        joining, cancelled = self.scheduler.admit()
        for r in cancelled:
            self._finish_request(r, "cancelled")
        planned: list[tuple[Request, Prompt]] = []
        for r in joining:
            try:
                planned.append((r, self._plan(r)))
            except Exception as e:  # a malformed request fails alone
                self._finish_request(r, "error", e)
        if not planned:
            return
        try:
            features = self.cache.encode_needed([prompt for _, prompt in planned])
        except Exception as e:  # a bad image batch: fail those requests, keep serving
            for r, _ in planned:
                self._finish_request(r, "error", e)
            return
        for r, prompt in planned:
            try:
                self._start_rows(r, prompt, features)
            except Exception as e:
                self._finish_request(r, "error", e)

    def _run_prompt(
        self, request: Request, prompt: Prompt, features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Run the prompt's uncached part straight into the next free row, after its cached blocks; give each
        further choice a copy of the row and of its state; keep the prompt's blocks. Returns the last
        logits (1, V)."""
        row, ids = self.scheduler.running, prompt.ids
        L = ids.shape[1]
        start = self.cache.load_prefix(row, prompt)
        images = self.model.prompt_images(prompt.plan, start, self.cache.needed_features(prompt, features))
        pos = torch.arange(start, L, device=ids.device)
        logits, state = self.model.prefill(
            ids[:, start:],
            images=images,
            attention_mask=None,
            position_ids=pos[None],
            at=CacheSlots(pos, key_len=L, row=row),
            kv_caches=self.cache.map,
        )
        n = request.params.n
        for j in range(1, n):
            self.cache.copy_row(row, row + j, L)
        self.states.join(row, n, state)
        self.cache.keep(row, prompt.hashes)
        self.prefix.hit_tokens += start
        request.cached_tokens = start
        return logits

    def _start_rows(self, request: Request, prompt: Prompt, features: dict[str, torch.Tensor]) -> None:
        logits = self._run_prompt(request, prompt, features)
        config = request.config
        request.open_rows = request.params.n
        seed = request.params.seed
        for j in range(request.params.n):
            gen = None
            if config.do_sample:
                gen = torch.Generator(device=logits.device)
                gen.manual_seed(seed + j if seed is not None else int(torch.randint(2**62, (1,))))
            row = Row(
                request=request,
                index=j,
                config=config,
                sequence=prompt.ids.clone(),
                length=prompt.ids.shape[1],
                decoder=IncrementalDecoder(self.tokenizer),
                stops=StopStrings(request.params.stop),
                generator=gen,
                prompt=prompt,
            )
            self.scheduler.rows.append(row)
            take(row, logits[0], self._end_row)

    # -- decoding -------------------------------------------------------------------------------

    def _end_row(self, row: Row, reason: str, error: EngineError | None = None, *, keep: bool = True) -> None:
        """Finish a row; keep its blocks (prompt and answer) for a follow-up turn that repeats them."""
        row.pending = None
        row.finished = True
        if keep:
            index = next(i for i, x in enumerate(self.scheduler.rows) if x is row)
            sequence = row.sequence[0, : row.length].tolist()
            self.cache.keep(index, self.cache.row_hashes(row.prompt, sequence))
        req = row.request
        req.emit(Event(row.index, finish_reason=reason, error=error))
        req.open_rows -= 1
        if req.open_rows == 0:
            req.done.set()

    def _step(self) -> None:
        """One decode step for every running row with a pending token."""
        rows = self.scheduler.rows
        n, device = len(rows), self.cache.device
        tokens = torch.tensor([[r.pending] for r in rows], device=device)
        lengths = torch.tensor([r.length for r in rows], device=device)
        key_len = int(lengths.max()) + 1
        mask = (torch.arange(key_len, device=device)[None, :] <= lengths[:, None]).long()  # (n, key_len)
        logits = self.model.decode(
            tokens,
            attention_mask=mask,
            position_ids=lengths[:, None],
            at=CacheSlots(torch.tensor([key_len - 1], device=device), key_len=key_len, slots=lengths),
            kv_caches=self.cache.map,
            state=self.states.view(n),
        )
        self.steps += 1
        now = time.monotonic()
        for i, row in enumerate(rows):
            row.length += 1
            row.pending = None
            if row.request.cancelled.is_set():
                self._end_row(row, "cancelled")
            elif row.request.deadline is not None and now > row.request.deadline:
                self._end_row(row, "error", RequestTimeout("the request timed out"))
            else:
                take(row, logits[i], self._end_row)

    def _compact(self) -> None:
        for old, new in self.scheduler.compact():
            self.cache.copy_row(old, new, self.scheduler.rows[new].length + 1)
            self.states.move(old, new)

    # -- the loop -------------------------------------------------------------------------------

    def _finish_request(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        """End every choice of a request that never got rows (cancelled while waiting, or failed to start)."""
        if error is not None and not isinstance(error, EngineError):
            kind = InvalidRequest if isinstance(error, ValueError) else EngineFailure
            error = kind(str(error))
        if isinstance(error, EngineFailure):  # a client's own mistakes are the caller's to report
            log.error("request %s failed: %s", request.id or "-", error)
        for j in range(request.params.n):
            request.emit(Event(j, finish_reason=reason, error=error))
        request.done.set()

    def _loop(self) -> None:
        try:
            while True:
                with torch.inference_mode():
                    self._admit()
                    self._compact()
                    if self.scheduler.pending():
                        self._step()
                        self._compact()
                        continue
                if self.scheduler.waiting.empty():
                    if self._stop.is_set():
                        return
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # the engine is broken: tell everyone, keep the error for /health
            self.error = EngineFailure(f"engine failure: {e}")
            log.exception("engine failure; failing %d running rows", len(self.scheduler.rows))
            for r in self.scheduler.rows:
                if not r.finished:
                    log.error("request %s failed: engine failure", r.request.id or "-")
                    self._end_row(r, "error", self.error, keep=False)
            raise

"""Continuous batching for one model: requests join and leave the running batch between decode steps.

The engine knows a model only through the runner interface (`vlmkit.runner.Runner`), and runs schedule ->
execute -> update in one thread, with its parts in their own modules:
- `Scheduler` (scheduler.py): the waiting queue, admission into free rows, compaction;
- `Executor` (executor.py): everything that touches the model and its caches, through a few calls of plain
  data, which a model split over processes (tensor parallel) runs on every process at once;
- `CacheManager` (cache.py, held by the executor): every row's keys/values, the prefix cache of prompt and
  answer blocks (hash chained over tokens and the pictures they depend on), the feature cache;
- the runner (the model): `plan`, `encode`, `prompt_images`, `batch_images`, `prefill`, `decode`, its
  `row_store` of per-row family state and its `filler_token`;
- the output stage (output.py): sampling, stop strings, detokenization.

Every running sequence owns one row of the cache: its prompt sits in slots 0..L-1 and each step writes its
new token at its own next slot, so rows of any length decode together in one forward with a per-row mask
and per-row rotary positions. The prompts that join in one round run as one prefill (padded on the right),
each after the blocks of it the prefix cache holds and straight into its free row. A prompt that would
compute the same blocks as another joining in that round, for at least half of its own work (the same
picture asked about again), waits one round and takes them from the cache. Callers get their events through
a callback.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmkit.adapters import AdapterSet
from vlmkit.generation import DEFAULT_MAX_NEW_TOKENS, GenerationConfig, StopStrings, make_config
from vlmkit.models import family_of, stop_token_ids
from vlmkit.runner import PromptPlan
from vlmkit.serve.cache import PrefixCache, Prompt
from vlmkit.serve.config import EngineConfig
from vlmkit.serve.errors import (
    EngineError,
    EngineFailure,
    InvalidRequest,
    QueueFull,
    RequestTimeout,
)
from vlmkit.serve.executor import Executor, plan_request
from vlmkit.serve.output import Event, Row, greedy_choices, take
from vlmkit.serve.scheduler import Scheduler
from vlmkit.structured import Constraint, Guide, check_constraint
from vlmkit.tokenizer import IncrementalDecoder

__all__ = ["Engine", "EngineConfig", "Event", "PrefixCache", "QueueFull", "Request", "SamplingParams"]

log = logging.getLogger("vlmkit.serve")
RUNNER_METHODS = (
    "plan", "encode", "prompt_images", "batch_images", "prefill", "decode", "row_store", "filler_token",
)  # fmt: skip


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # None: off; k >= 0: each token's log-probability and its k best alternatives
    constraint: Constraint | None = None  # what every answer must match (vlmkit.structured)

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
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias or None,
            constraint=self.constraint,
        )


@dataclass
class Request:
    inputs: dict[str, torch.Tensor]  # processor output for one prompt (batch of 1)
    params: SamplingParams
    emit: Callable[[Event], None]
    deadline: float | None = None  # time.monotonic() after which the request is cut off
    id: str = ""  # the caller's request id, for logs
    adapter: str | None = None  # the LoRA adapter to answer with, by name (None: the base model)
    config: GenerationConfig | None = None  # `params` as generate's settings, set by Engine.submit
    plan: PromptPlan | None = None  # the family's plan of `inputs`, made by Engine.submit
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
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        config: EngineConfig | None = None,
        *,
        adapters: AdapterSet | None = None,
        **overrides: Any,
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
        self.adapters = adapters
        self.executor = Executor(
            model, c, adapters
        )  # on a split model, every other process runs one beside it
        self.cache = self.executor.cache
        self.features, self.prefix = self.cache.features, self.cache.prefix
        self._keys = itertools.count()
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
        """Finish what is running and waiting, then stop the thread (an engine driven by `run_once` is only
        released: its caller decides what runs)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:  # driven by its caller (run_once), or never run
            self.executor.close()

    def submit(self, request: Request) -> None:
        """Queue a request; raises InvalidRequest (bad settings, too long, inputs the model cannot take) or
        QueueFull."""
        if self.error is not None:  # nothing would ever run it
            raise self.error
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
        try:  # in the caller's thread: hashing pictures here keeps it off the engine thread
            request.plan = plan_request(self.model, request.inputs)
        except InvalidRequest:
            raise
        except (ValueError, TypeError) as e:
            raise InvalidRequest(str(e)) from None
        self.scheduler.enqueue(request)
        self._wake.set()

    def generation_config(self, params: SamplingParams) -> GenerationConfig:
        n = params.n
        if n < 1 or n > self.config.max_batch:
            raise InvalidRequest(f"n must be between 1 and {self.config.max_batch}, got {n}")
        try:
            config = make_config(self.eos, self.pad, **params.generate_kwargs())
            if (
                config.constraint is not None
            ):  # an invalid schema, pattern or grammar fails here, not mid-answer
                check_constraint(config.constraint)
            return config
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    @property
    def running(self) -> int:
        return self.scheduler.running

    # -- joining --------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Plan the waiting requests that fit the free rows. A prompt that would compute the same blocks as a
        prompt joining now, for at least half of what it computes (the same picture asked about again), waits
        for the next round, when they are cached, and the request behind it takes its row."""
        planned: list[tuple[Request, int, Prompt]] = []
        held: list[Request] = []
        computing: set[bytes] = set()  # the blocks the planned prompts compute (not cached)
        while True:
            taken = sum(r.params.n for r, _, _ in planned)
            joining, cancelled = self.scheduler.admit(taken=taken)
            if not joining and not cancelled:
                break
            for r in cancelled:
                self._finish_request(r, "cancelled")
            for r in joining:
                key = next(self._keys)
                try:
                    prompt = self.executor.call("plan", key, r.plan, r.adapter)
                except Exception as e:  # a malformed request fails alone
                    self._finish_request(r, "error", e)
                    continue
                if self.worth_waiting(prompt, computing):
                    self.executor.call("forget", key)
                    held.append(r)
                    continue
                planned.append((r, key, prompt))
                computing.update(prompt.hashes[len(prompt.pinned) :])
        self.scheduler.hold(held)
        if not planned:
            return
        try:
            self.executor.call("encode", [key for _, key, _ in planned])
        except Exception as e:  # a bad image batch: fail those requests, keep serving
            for r, key, _ in planned:
                self.executor.call("forget", key)
                self._finish_request(r, "error", e)
            return
        jobs = [(key, r.params.n) for r, key, _ in planned]
        results = self.executor.call("run_prompts", jobs, self.scheduler.running)
        at = self.scheduler.running  # where the executor put the next prompt that ran
        firsts: list[tuple[Row, torch.Tensor]] = []  # each new row and its prompt's last logits (V,)
        for (r, key, prompt), result in zip(planned, results, strict=True):
            if isinstance(result, Exception):
                self.executor.call("forget", key)
                self._finish_request(r, "error", result)
                continue
            n, here = r.params.n, self.scheduler.running
            if at != here:  # an earlier request gave up its rows: this one's move up into them
                self.executor.call("compact", [(at + j, here + j, prompt.ids.shape[1]) for j in range(n)])
            at += n
            logits, r.cached_tokens = result
            try:
                rows = self._rows(r, key, prompt, logits.shape[-1])
            except Exception as e:  # its settings or its grammar: that request fails alone
                self.executor.call("forget", key)
                self._finish_request(r, "error", e)
                continue
            self.scheduler.rows.extend(rows)
            firsts += [(row, logits[0]) for row in rows]
        if firsts:
            self._take_all([row for row, _ in firsts], torch.stack([lg for _, lg in firsts]))

    def worth_waiting(self, prompt: Prompt, computing: set[bytes]) -> bool:
        """Whether the prompt should wait a round: the prompts joining this round compute (`computing`) blocks
        it would take from the cache next round (as many as it may: its last token always runs), covering at
        least half of the tokens it would compute now. (A shared template start of a block or two is not worth
        a round.) Block hashes chain over everything before them, so the shared blocks are an unbroken run."""
        block = self.prefix.block
        if self.prefix.capacity <= 0:
            return False
        first, usable = len(prompt.pinned), (prompt.ids.shape[1] - 1) // block
        n = first
        while n < usable and prompt.hashes[n] in computing:
            n += 1
        return 2 * (n - first) * block >= prompt.ids.shape[1] - first * block

    def _rows(self, request: Request, key: int, prompt: Prompt, vocab: int) -> list[Row]:
        """The request's rows, one per choice, for its prompt that ran into the next free cache rows
        (`Executor.run_prompts`); each then chooses its first token from the prompt's last logits."""
        config = request.config
        request.open_rows = request.params.n
        seed = request.params.seed
        rows = []
        for j in range(request.params.n):
            gen = None
            if config.do_sample:
                gen = torch.Generator(device=self.executor.cache.device)
                gen.manual_seed(seed + j if seed is not None else int(torch.randint(2**62, (1,))))
            rows.append(
                Row(
                    request=request,
                    index=j,
                    config=config,
                    sequence=prompt.ids.clone(),
                    length=prompt.ids.shape[1],
                    decoder=IncrementalDecoder(self.tokenizer),
                    stops=StopStrings(request.params.stop),
                    generator=gen,
                    prompt=prompt,
                    key=key,
                    logprobs=request.params.logprobs,
                    guide=None
                    if config.constraint is None
                    else Guide(config.constraint, self.tokenizer, vocab, config.eos_token_id),
                )
            )
        return rows

    # -- decoding -------------------------------------------------------------------------------

    def _end_row(self, row: Row, reason: str, error: EngineError | None = None, *, keep: bool = True) -> None:
        """Finish a row; keep its blocks (prompt and answer) for a follow-up turn that repeats them."""
        row.pending = None
        row.finished = True
        if keep:
            index = next(i for i, x in enumerate(self.scheduler.rows) if x is row)
            self.executor.call("keep", index, row.key, row.sequence[0, : row.length].tolist())
        req = row.request
        req.emit(Event(row.index, finish_reason=reason, error=error, logprobs=row.held))
        row.held = []
        req.open_rows -= 1
        if req.open_rows == 0:
            self.executor.call("forget", row.key)
            req.done.set()

    def _step(self) -> None:
        """One decode step for every running row with a pending token."""
        rows = self.scheduler.rows
        logits = self.executor.call("decode", [r.pending for r in rows], [r.length for r in rows])
        self.steps += 1
        now = time.monotonic()
        live = []
        for i, row in enumerate(rows):
            row.length += 1
            row.pending = None
            if row.finished:  # its request failed at an earlier row of this step
                continue
            if row.request.cancelled.is_set():
                self._end_row(row, "cancelled")
            elif row.request.deadline is not None and now > row.request.deadline:
                self._end_row(row, "error", RequestTimeout("the request timed out"))
            else:
                live.append(i)
        if live:
            self._take_all([rows[i] for i in live], logits[live] if len(live) < len(rows) else logits)

    def _take_all(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Each row's next token from its logits (n, V): the plain greedy rows' in one argmax."""
        tokens = greedy_choices(rows, logits)
        for row, lg, token in zip(rows, logits, tokens, strict=True):
            if not row.finished:  # its request failed at an earlier row
                self._take(row, lg, token)

    def _take(self, row: Row, logits: torch.Tensor, token: int | None = None) -> None:
        """The row's next token (`take`); a failure there (its settings, its grammar, its tokens) ends that
        row's request with an error and leaves the other rows running."""
        try:
            take(row, logits, self._end_row, token)
        except Exception as e:
            log.error("request %s: choosing its next token failed: %r", row.request.id or "-", e)
            error = (
                InvalidRequest(str(e))
                if isinstance(e, ValueError)
                else EngineFailure(f"choosing a token: {e}")
            )
            for other in self.scheduler.rows:  # every choice of the request ends with the error
                if other.request is row.request and not other.finished:
                    self._end_row(other, "error", error, keep=False)

    def _compact(self) -> None:
        moves = [(old, new, self.scheduler.rows[new].length + 1) for old, new in self.scheduler.compact()]
        if moves:
            self.executor.call("compact", moves)

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

    def _round(self) -> bool:
        """Admit what waits, then one decode step for the running rows; whether a step ran."""
        with torch.inference_mode():
            self._admit()
            self._compact()
            if self.scheduler.pending():
                self._step()
                self._compact()
                return True
        return False

    def _loop(self) -> None:
        try:
            while True:
                if self._round():
                    continue
                if self.scheduler.waiting.empty():
                    if self._stop.is_set():
                        self.executor.close()
                        return
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:
            self._fail(e)
            raise

    def _fail(self, e: BaseException) -> None:
        """The engine is broken: tell everyone, keep the error for /health."""
        self.error = EngineFailure(f"engine failure: {e}")
        log.exception("engine failure; failing %d running rows", len(self.scheduler.rows))
        for r in self.scheduler.rows:
            if not r.finished:
                log.error("request %s failed: engine failure", r.request.id or "-")
                self._end_row(r, "error", self.error, keep=False)
        self.executor.close()

    def run_once(self) -> bool:
        """One round in the caller's thread, for a caller that drives the engine itself instead of
        `start()`ing its thread (an offline batch: evaluation). Events are emitted from this call. With no
        engine thread beside it, the caller's own work (preparing the next requests) never contends with the
        engine for Python's lock or a core. Returns whether requests are still running or waiting."""
        if self._thread is not None:
            raise RuntimeError("this engine runs in its own thread (start()); it cannot also be driven")
        if self.error is not None:
            raise self.error
        try:
            self._round()
        except BaseException as e:
            self._fail(e)
            raise
        return bool(self.scheduler.rows) or not self.scheduler.waiting.empty()

"""Many requests through one in-process continuous-batching engine (`vlmkit.serve.engine.Engine`), driven from
the caller's thread: inputs are prepared as rows free up, a bounded number ahead, between the engine's rounds,
and answers come back as they finish. `vlmkit eval` and the lmms-eval entry both answer through this."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class Job:
    """One request: `key` identifies it to the caller; `inputs()` builds the processor outputs (called when a
    row is about to be free, so pictures are not all held at once); `params`: its SamplingParams."""

    key: Any
    inputs: Callable[[], dict[str, Any]]
    params: Any


@dataclass
class Answer:
    key: Any
    text: str
    finish_reason: str  # "stop", "length" or "error"
    error: str | None = None


ROW_STEP = 64  # the engine's rows are sized in steps of this many tokens


def engine_answers(
    vlm: Any, jobs: Iterable[Job], *, batch_size: int = 16, max_seq_len: int | None = None
) -> Iterator[Answer]:
    """Answers of `jobs` as they finish (not in order). A job whose inputs cannot be built (a broken picture)
    or whose prompt leaves no room for an answer within max_seq_len tokens (None: the model's context, at
    most 2048) answers "" with finish_reason "error"; an answer stops where max_seq_len ends. An engine that
    breaks raises. Greedy requests get the answer the model gives each alone.

    The engine's rows (batch_size x their length of keys and values, allocated at once) are as long as the
    prompts and answer budgets seen so far need, not max_seq_len: a 7B model's 16 rows of 2048 tokens take
    16 GiB in bf16, where VQA prompts need about 640 tokens (5 GiB). A job that needs longer rows waits until
    the running ones finish, and a new engine with rows at least twice as long takes over (so that happens
    a few times at most)."""
    from vlmkit.serve.engine import Engine, Request
    from vlmkit.serve.errors import EngineError

    if max_seq_len is None:  # the most the rows may hold
        text = getattr(vlm.model.config, "text_config", vlm.model.config)
        max_seq_len = min(2048, getattr(text, "max_position_embeddings", None) or 2048)
    ahead = 2 * batch_size  # requests waiting for a row: enough to refill rows as they free up
    # Driven from this thread (no engine thread): preparing the next inputs and running the model take
    # turns, so neither waits for Python's lock held by the other, and the model's kernels have every core.
    engine: Engine | None = None
    rows = 0  # the engine's row length
    finished: list[tuple[int, str, Any]] = []
    texts: dict[int, str] = {}
    keys: dict[int, Any] = {}  # submitted, not finished
    prepared: collections.deque = collections.deque()  # (n, job, inputs, params, need), not submitted yet
    upcoming = iter(enumerate(jobs))
    exhausted = False
    try:
        while True:
            while not exhausted and len(keys) + len(prepared) < ahead:
                nxt = next(upcoming, None)
                if nxt is None:
                    exhausted = True
                    break
                n, job = nxt
                try:
                    inputs = job.inputs()
                    length = int(inputs["input_ids"].shape[-1])
                except (ValueError, TypeError, OSError, EngineError) as e:
                    yield Answer(job.key, "", "error", str(e))
                    continue
                if length >= max_seq_len:
                    yield Answer(
                        job.key, "", "error",
                        f"the prompt ({length} tokens) exceeds max_seq_len ({max_seq_len}): no room is left "
                        "for an answer; raise max_seq_len",
                    )  # fmt: skip
                    continue
                params = job.params
                if length + params.max_tokens > max_seq_len:  # the answer stops where the context ends
                    params = dataclasses.replace(params, max_tokens=max_seq_len - length)
                prepared.append((n, job, inputs, params, length + params.max_tokens))
            while prepared:
                n, job, inputs, params, need = prepared[0]
                if need > rows:
                    if keys:
                        break  # the running requests finish first, then longer rows take over
                    if engine is not None:
                        engine.stop()
                    longest = max(p[4] for p in prepared)
                    rows = min(max_seq_len, max(2 * rows, -(-longest // ROW_STEP) * ROW_STEP))
                    engine = Engine(
                        vlm.model,
                        vlm.tokenizer,
                        max_batch=batch_size,
                        max_seq_len=rows,
                        max_queue=ahead + batch_size,
                    )
                prepared.popleft()

                def emit(event: Any, n: int = n) -> None:
                    if event.finish_reason is None:
                        texts[n] += event.text
                    else:
                        finished.append((n, event.finish_reason, event.error))

                try:
                    engine.submit(Request(inputs=inputs, params=params, emit=emit, id=str(job.key)))
                except (ValueError, TypeError, EngineError) as e:
                    yield Answer(job.key, "", "error", str(e))
                    continue
                texts[n], keys[n] = "", job.key
            if keys:
                engine.run_once()
            while finished:
                n, reason, error = finished.pop(0)
                yield Answer(keys.pop(n), texts.pop(n), reason, None if error is None else str(error))
            if exhausted and not keys and not prepared:
                return
    finally:
        if engine is not None:
            engine.stop()

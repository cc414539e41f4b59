"""Many requests through one in-process continuous-batching engine (`vlmkit.serve.engine.Engine`), driven from
the caller's thread: inputs are prepared as rows free up, a bounded number ahead, between the engine's rounds,
and answers come back as they finish. `vlmkit eval` and the lmms-eval entry both answer through this."""

from __future__ import annotations

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


def engine_answers(
    vlm: Any, jobs: Iterable[Job], *, batch_size: int = 16, max_seq_len: int | None = None
) -> Iterator[Answer]:
    """Answers of `jobs` as they finish (not in order). A job whose inputs cannot be built (a broken picture)
    or that the engine refuses (a prompt of max_seq_len tokens or more; None: the model's context, at most
    2048) answers "" with finish_reason "error"; an answer stops where max_seq_len ends. An engine that
    breaks raises. Greedy requests get the answer the model gives each alone."""
    from vlmkit.serve.engine import Engine, Request
    from vlmkit.serve.errors import EngineError

    if max_seq_len is None:  # the row cache holds batch_size x max_seq_len tokens: no more than can be used
        text = getattr(vlm.model.config, "text_config", vlm.model.config)
        max_seq_len = min(2048, getattr(text, "max_position_embeddings", None) or 2048)
    ahead = 2 * batch_size  # requests waiting for a row: enough to refill rows as they free up
    # Driven from this thread (no engine thread): preparing the next inputs and running the model take
    # turns, so neither waits for Python's lock held by the other, and the model's kernels have every core.
    engine = Engine(
        vlm.model, vlm.tokenizer, max_batch=batch_size, max_seq_len=max_seq_len, max_queue=ahead + batch_size
    )
    finished: list[tuple[int, str, Any]] = []
    texts: dict[int, str] = {}
    keys: dict[int, Any] = {}
    upcoming = iter(enumerate(jobs))
    exhausted = False
    try:
        while not exhausted or keys:
            while not exhausted and len(keys) < ahead:
                nxt = next(upcoming, None)
                if nxt is None:
                    exhausted = True
                    break
                n, job = nxt
                texts[n] = ""

                def emit(event: Any, n: int = n) -> None:
                    if event.finish_reason is None:
                        texts[n] += event.text
                    else:
                        finished.append((n, event.finish_reason, event.error))

                try:
                    inputs = job.inputs()
                    room = max_seq_len - int(inputs["input_ids"].shape[-1])
                    params = job.params
                    if 0 < room < params.max_tokens:  # the answer stops where the context ends
                        params = dataclasses.replace(params, max_tokens=room)
                    engine.submit(Request(inputs=inputs, params=params, emit=emit, id=str(job.key)))
                except (ValueError, TypeError, OSError, EngineError) as e:
                    texts.pop(n)
                    yield Answer(job.key, "", "error", str(e))
                    continue
                keys[n] = job.key
            if keys:
                engine.run_once()
            while finished:
                n, reason, error = finished.pop(0)
                yield Answer(keys.pop(n), texts.pop(n), reason, None if error is None else str(error))
    finally:
        engine.stop()

"""Many requests through one in-process continuous-batching engine (`vlmkit.serve.engine.Engine`): inputs are
prepared as rows free up (the engine decodes meanwhile), a bounded number ahead, and answers come back as
they finish. `vlmkit eval` and the lmms-eval entry both answer through this."""

from __future__ import annotations

import queue
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
    vlm: Any, jobs: Iterable[Job], *, batch_size: int = 16, max_seq_len: int = 2048
) -> Iterator[Answer]:
    """Answers of `jobs` as they finish (not in order). A job whose inputs cannot be built (a broken picture)
    or that the engine refuses (a prompt over max_seq_len) answers "" with finish_reason "error"; an engine
    that breaks raises. Greedy requests get the answer the model gives each alone."""
    from vlmkit.serve.engine import Engine, Request
    from vlmkit.serve.errors import EngineError

    ahead = 2 * batch_size  # requests waiting for a row: enough to refill rows as they free up
    engine = Engine(
        vlm.model, vlm.tokenizer, max_batch=batch_size, max_seq_len=max_seq_len, max_queue=ahead + batch_size
    ).start()
    finished: queue.Queue = queue.Queue()
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
                        finished.put((n, event.finish_reason, event.error))

                try:
                    engine.submit(Request(inputs=job.inputs(), params=job.params, emit=emit, id=str(job.key)))
                except (ValueError, TypeError, OSError, EngineError) as e:
                    texts.pop(n)
                    yield Answer(job.key, "", "error", str(e))
                    continue
                keys[n] = job.key
            try:
                n, reason, error = finished.get(timeout=1.0)
            except queue.Empty:
                if engine.error is not None:
                    raise engine.error from None
                continue
            yield Answer(keys.pop(n), texts.pop(n), reason, None if error is None else str(error))
    finally:
        engine.stop(timeout=30)

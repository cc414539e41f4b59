"""The engine's scheduler: the waiting queue, admission of requests into free rows, and compaction of the
running rows (finished rows leave, the rows behind them move up, so the running rows stay 0..n-1)."""

from __future__ import annotations

import queue
from typing import Any

from vlmkit.serve.errors import QueueFull
from vlmkit.serve.output import Row


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int) -> None:
        self.max_batch = max_batch
        self.waiting: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self.rows: list[Row] = []

    def enqueue(self, request: Any) -> None:
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.waiting.maxsize} requests are already waiting") from None

    def admit(self, taken: int = 0) -> tuple[list[Any], list[Any]]:
        """Waiting requests, in order, while their choices fit the free rows (less `taken` rows already given
        this round): (joining, cancelled)."""
        joining, cancelled = [], []
        free = self.max_batch - len(self.rows) - taken
        while free > 0:
            try:
                r = self.waiting.queue[0]
            except IndexError:
                break
            if r.params.n > free:
                break
            self.waiting.get_nowait()
            if r.cancelled.is_set():
                cancelled.append(r)
                continue
            joining.append(r)
            free -= r.params.n
        return joining, cancelled

    def hold(self, requests: list[Any]) -> None:
        """Put requests taken by `admit` back at the front of the queue, in order, for the next round (the
        queue may hold more than its size for that long)."""
        with self.waiting.mutex:  # submitters append meanwhile
            self.waiting.queue.extendleft(reversed(requests))

    def compact(self) -> list[tuple[int, int]]:
        """Drop finished rows; the (old, new) index of every row that moves up."""
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(keep) == len(self.rows):
            return []
        moves = [(old, new) for new, old in enumerate(keep) if new != old]
        self.rows = [self.rows[i] for i in keep]
        return moves

    def pending(self) -> bool:
        return any(r.pending is not None for r in self.rows)

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    @property
    def running(self) -> int:
        return len(self.rows)

"""Batches in progress at once, per agent: the model scores batch k while batch k-1 is written
and batch k+1 is decoded. Kafka-free: the agent hands in what each step does.

Order is kept where it matters: batches start (decode, queue the model run) in stream order and
finish (write, publish, acknowledge) in stream order, each after the previous one. When a batch
fails, it and every batch started after it that is still in progress are read again: their
records are rewound together, in one call, before the agent can admit anything else (so the
offset guard expects the rewound offsets at once, and each partition is sought back to its
first unwritten record). Batches admitted after that are the re-read records and run normally.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog

from streamtune.scorer.gate import BatchGate

log = structlog.get_logger(__name__)

S = TypeVar("S")


@dataclass(frozen=True)
class BatchSteps(Generic[S]):
    start: Callable[[list[Any]], Awaitable[S]]  # decode, queue the model run; nothing leaves yet
    finish: Callable[[S], Awaitable[Any]]  # wait for the model, write, publish, flush
    abandon: Callable[[S], None]  # a started batch that will not be finished (drop its model run)
    done: Callable[[list[Any]], None]  # acknowledge
    rewind: Callable[[list[Any]], Awaitable[Any]]  # leave unacknowledged, seek back, in one call
    failed: Callable[[list[Any]], None]  # log and count a batch's own failure


@dataclass(eq=False)
class _Batch:
    events: list[Any]
    abandoned: bool = False  # read again because this batch or one before it failed
    started_at: float = 0.0  # the clock when it was admitted (submit)
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Overlap(Generic[S]):
    def __init__(
        self,
        depth: int,
        steps: BatchSteps[S],
        gate: BatchGate,
        backoff_s: float,
        clock: Callable[[], float] = time.monotonic,  # admission times (oldest_started_at)
    ) -> None:
        self.depth = depth
        self.clock = clock
        self.steps = steps
        self.gate = gate
        self.backoff_s = backoff_s
        self._in_flight: list[_Batch] = []  # in stream order; finished ones until the agent pops them
        self._backoff_until = 0.0

    async def submit(self, events: list[Any]) -> None:
        """Start a batch; return once fewer than ``depth`` batches are in progress (after a
        failure, also after a back-off pause). Cancelling the caller does not cancel batches."""
        self.gate.begin()  # synchronously: a close from here on waits for this batch
        prev = self._in_flight[-1].task if self._in_flight else None
        batch = _Batch(events, started_at=self.clock())
        batch.task = asyncio.create_task(self._run(batch, prev))
        batch.task.add_done_callback(lambda _: self.gate.end())
        self._in_flight.append(batch)
        while self._in_flight and (len(self._in_flight) >= self.depth or self._in_flight[0].task.done()):  # type: ignore[union-attr]
            oldest = self._in_flight[0].task
            assert oldest is not None
            await asyncio.shield(oldest)
            self._in_flight.pop(0)
        if (pause := self._backoff_until - time.monotonic()) > 0:
            await asyncio.sleep(pause)  # back off after a failed batch before taking more

    def oldest_started_at(self) -> float | None:
        """When the oldest batch still in progress was admitted (``clock`` time), or None: how
        long the agent has been stuck on one batch (a metric; finished batches the agent has
        not popped yet do not count)."""
        return next((b.started_at for b in self._in_flight if b.task is not None and not b.task.done()), None)

    async def wait(self) -> None:
        """Until every batch in progress has ended (tests; stopping uses the gate)."""
        while self._in_flight:
            task = self._in_flight[0].task
            assert task is not None
            await asyncio.shield(task)
            self._in_flight.pop(0)

    async def _run(self, batch: _Batch, prev: asyncio.Task[None] | None) -> None:
        steps = self.steps
        started: S | None = None
        try:
            try:
                started = await steps.start(batch.events)
            finally:
                if prev is not None:
                    await asyncio.shield(prev)  # batches never raise: this waits, in order
            if batch.abandoned:  # rewound with an earlier batch's failure
                if started is not None:
                    steps.abandon(started)
                return
            assert started is not None
            await steps.finish(started)
            steps.done(batch.events)
        except Exception:
            if batch.abandoned:  # already rewound by the batch whose failure came first
                return
            steps.failed(batch.events)
            self._backoff_until = time.monotonic() + self.backoff_s
            # This batch and every later one in progress (they all wait for this one): one rewind.
            later = self._in_flight[self._in_flight.index(batch) :]
            for b in later:
                b.abandoned = True
            try:
                await steps.rewind([ev for b in later for ev in b.events])
            except Exception:  # left unacknowledged all the same: the next owner reads them
                log.exception("rewind_failed")

"""Batches in progress at once (pure asyncio; Kafka, Redis and the model are replaced by
recording steps here, and exercised for real in test_e2e / test_lifecycle / test_chaos)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from streamtune.scorer.gate import BatchGate
from streamtune.scorer.overlap import BatchSteps, Overlap

WAIT_S = 5.0  # every wait in these tests is bounded: a hang fails the test instead of the suite
T = TypeVar("T")


async def bounded(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, WAIT_S)


def run(scenario: Awaitable[None]) -> None:
    asyncio.run(bounded(scenario))


class Recorder:
    """A batch is a list of offsets, named by its first. Each batch's "model" waits for its own
    event, so tests choose the order in which model runs complete; ``fail`` names batches whose
    finish raises (once each). ``started(first)`` is set when that batch's start step ran."""

    def __init__(self, fail: set[int] | None = None, fail_start: set[int] | None = None) -> None:
        self.log: list[tuple[str, int]] = []
        self.fail = set(fail or ())
        self.fail_start = set(fail_start or ())
        self.models: dict[int, asyncio.Event] = {}
        self._started: dict[int, asyncio.Event] = {}
        self.rewound: list[list[int]] = []
        self.acked: list[int] = []
        self.failures: list[int] = []
        self.abandoned: list[int] = []
        self.all_free = False

    def model(self, first: int) -> asyncio.Event:
        ev = self.models.setdefault(first, asyncio.Event())
        if self.all_free:
            ev.set()
        return ev

    def started(self, first: int) -> asyncio.Event:
        return self._started.setdefault(first, asyncio.Event())

    async def release(self, first: int) -> None:
        """Let batch ``first``'s model finish, and return once every task already waiting for it
        has run on up to its next pause (asyncio wakes an event's waiters in the order they began
        to wait: a waiter registered here comes last). What is not done by then was not woken."""
        registered = asyncio.Event()

        async def last_waiter() -> None:
            registered.set()
            await self.model(first).wait()

        waiter = asyncio.create_task(last_waiter())
        await bounded(registered.wait())
        self.model(first).set()
        await bounded(waiter)

    def free_all(self) -> None:
        self.all_free = True
        for ev in self.models.values():
            ev.set()

    async def start(self, events: list[Any]) -> int:
        self.log.append(("start", events[0]))
        self.started(events[0]).set()
        if events[0] in self.fail_start:
            self.fail_start.discard(events[0])
            raise RuntimeError(f"batch {events[0]} could not start")
        self.model(events[0])
        return int(events[0])

    async def finish(self, first: int) -> None:
        await self.model(first).wait()
        if first in self.fail:
            self.fail.discard(first)
            raise RuntimeError(f"batch {first} failed")
        self.log.append(("finish", first))

    async def rewind(self, events: list[Any]) -> None:
        self.rewound.append(list(events))

    def steps(self) -> BatchSteps[int]:
        return BatchSteps(
            start=self.start,
            finish=self.finish,
            abandon=lambda first: self.abandoned.append(first),
            done=lambda events: self.acked.extend(events),
            rewind=self.rewind,
            failed=lambda events: self.failures.append(events[0]),
        )


async def _agent(ov: Overlap[int], batches: list[list[int]]) -> None:
    """Submit one after another, as the agent does."""
    for b in batches:
        await ov.submit(b)


def test_the_next_batch_starts_before_the_previous_finishes_and_writes_stay_in_order() -> None:
    rec = Recorder()
    gate = BatchGate()

    async def scenario() -> None:
        ov = Overlap(2, rec.steps(), gate, backoff_s=0.0)
        await ov.submit([0, 1])  # returns at once: one batch in progress, depth 2
        second = asyncio.ensure_future(ov.submit([2, 3]))  # waits for the first to finish
        await bounded(rec.started(2).wait())
        assert rec.log == [("start", 0), ("start", 2)]  # batch 2 decoded while 0 is "scored"
        assert not second.done()
        assert not gate._event().is_set()  # batches in progress hold the gate
        await rec.release(2)  # the later batch's model finishes first ...
        assert ("finish", 2) not in rec.log  # ... but it is not written before batch 0
        assert not second.done()
        rec.model(0).set()
        await bounded(second)
        await bounded(ov.wait())

    run(scenario())
    assert rec.log[2:] == [("finish", 0), ("finish", 2)]
    assert rec.acked == [0, 1, 2, 3]
    assert gate._event().is_set()


def test_with_depth_one_batches_run_one_at_a_time() -> None:
    rec = Recorder()
    rec.free_all()

    async def scenario() -> None:
        ov = Overlap(1, rec.steps(), BatchGate(), backoff_s=0.0)
        await ov.submit([0])
        assert rec.log == [("start", 0), ("finish", 0)]
        await ov.submit([1])

    run(scenario())
    assert rec.log == [("start", 0), ("finish", 0), ("start", 1), ("finish", 1)]


def test_a_failed_batch_and_the_later_ones_in_progress_are_rewound_together() -> None:
    rec = Recorder(fail={2})
    gate = BatchGate()

    async def scenario() -> None:
        ov = Overlap(3, rec.steps(), gate, backoff_s=0.0)
        agent = asyncio.ensure_future(_agent(ov, [[0, 1], [2, 3], [4, 5]]))
        await bounded(rec.started(4).wait())  # all three in progress before any model finishes
        assert rec.log == [("start", 0), ("start", 2), ("start", 4)]
        rec.free_all()
        await bounded(agent)
        await bounded(ov.wait())

    run(scenario())
    assert rec.acked == [0, 1]  # batch 0 went through
    assert ("finish", 4) not in rec.log  # batch 4 is not written after batch 2 failed
    assert rec.failures == [2]  # counted once, for the batch that failed
    assert rec.abandoned == [4]  # its queued model run is dropped
    assert rec.rewound == [[2, 3, 4, 5]]  # one rewind: every partition back to its first record
    assert gate._event().is_set()  # nothing left in progress


def test_batches_admitted_after_a_failure_run_normally() -> None:
    rec = Recorder(fail={0})
    rec.free_all()

    async def scenario() -> None:
        ov = Overlap(2, rec.steps(), BatchGate(), backoff_s=0.0)
        # 1 is in progress when 0 fails (read again with it); 10, 11, 12 are the re-read records
        # and later ones, submitted without waiting, as the agent does
        await _agent(ov, [[0], [1], [10], [11], [12]])
        await ov.wait()

    run(scenario())
    assert rec.failures == [0]
    assert rec.rewound == [[0, 1]]
    assert rec.acked == [10, 11, 12]


def test_a_batch_that_cannot_start_is_rewound_after_the_one_before_is_written() -> None:
    rec = Recorder(fail_start={2})
    rec.free_all()

    async def scenario() -> None:
        ov = Overlap(2, rec.steps(), BatchGate(), backoff_s=0.0)
        await _agent(ov, [[0], [2], [4]])
        await ov.wait()

    run(scenario())
    assert rec.failures == [2]
    assert rec.acked[0] == 0  # written before the failure is handled
    assert rec.rewound[0][0] == 2
    assert ("finish", 2) not in rec.log


def test_oldest_started_at_is_when_the_oldest_batch_in_progress_was_admitted() -> None:
    rec = Recorder()
    now = [100.0]

    async def scenario() -> None:
        ov = Overlap(3, rec.steps(), BatchGate(), backoff_s=0.0, clock=lambda: now[0])
        assert ov.oldest_started_at() is None  # nothing in progress
        await ov.submit([0])
        now[0] = 107.0
        await ov.submit([1])
        now[0] = 130.0
        assert ov.oldest_started_at() == 100.0  # the oldest batch's admission, not the newest's
        await rec.release(0)  # batch 0 written and acknowledged ...
        assert rec.acked == [0]
        assert ov.oldest_started_at() == 107.0  # ... so it no longer counts, popped or not
        await rec.release(1)
        assert ov.oldest_started_at() is None
        await bounded(ov.wait())

    run(scenario())

"""The offset guard's seeks over a stand-in consumer: Faust's consumer is the unit-level
collaborator here; the real one is exercised by the delivery and chaos tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from faust.types import TP

from streamtune.kafka.guard import SkipGuard

TOPIC = "events.click"


@dataclass(eq=False)
class Message:
    offset: int
    topic: str = TOPIC
    partition: int = 0
    refs: int = 0

    def incref(self) -> None:
        self.refs += 1


@dataclass
class Event:
    message: Message


@dataclass
class Consumer:
    seeks: list[tuple[int, int]] = field(default_factory=list)
    resumed: list[Any] = field(default_factory=list)
    assigned: set[Any] = field(default_factory=set)
    _committed_offset: dict[Any, int] = field(default_factory=dict)
    _unacked_messages: set[Any] = field(default_factory=set)
    _read_offset: dict[Any, int] = field(default_factory=dict)
    _paused_partitions: set[Any] = field(default_factory=set)
    _buffered_partitions: set[Any] = field(default_factory=set)
    _active_partitions: set[Any] = field(default_factory=set)

    async def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append((tp.partition, offset))

    def assignment(self) -> set[Any]:
        return self.assigned

    def resume_partitions(self, tps: set[Any]) -> None:
        self.resumed.extend(tps)
        self._paused_partitions -= tps
        self._active_partitions |= tps


class Signal:
    def connect(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn


@dataclass
class App:
    consumer: Consumer = field(default_factory=Consumer)
    on_partitions_revoked: Signal = field(default_factory=Signal)
    rebalancing: bool = False
    in_recovery: bool = False


def guard_from(first: int) -> tuple[SkipGuard, Consumer]:
    app = App()
    guard = SkipGuard(app)  # type: ignore[arg-type]
    guard.guard.start((TOPIC, 0), first)
    return guard, app.consumer


def test_a_skip_seeks_back_to_the_first_missing_offset_and_keeps_the_later_record_pending() -> None:
    guard, consumer = guard_from(5)
    kept = asyncio.run(guard.admit([Event(Message(5)), Event(Message(8))]))
    assert [e.message.offset for e in kept] == [5]
    assert consumer.seeks == [(0, 6)]


def test_a_stale_record_right_after_a_seek_still_gets_a_seek_when_nothing_else_arrives() -> None:
    """The stall of stop 16's CI: the second skip came within RESEEK_AFTER_S of the first seek
    and was dropped; the partition's last record had raised Faust's read offset, so nothing
    ever triggered another seek. Now the second skip seeks once the interval has passed."""
    guard, consumer = guard_from(5)

    async def two_skips() -> None:
        assert await guard.admit([Event(Message(9))]) == []
        assert await guard.admit([Event(Message(9))]) == []

    asyncio.run(two_skips())
    assert consumer.seeks == [(0, 5), (0, 5)]


def test_no_second_seek_once_the_missing_record_arrived_meanwhile() -> None:
    guard, consumer = guard_from(5)

    async def skip_then_arrival() -> None:
        assert await guard.admit([Event(Message(9))]) == []
        second = asyncio.create_task(guard.admit([Event(Message(9))]))
        await asyncio.sleep(0)  # the second skip waits out the interval
        kept = await guard.admit([Event(Message(5))])
        assert [e.message.offset for e in kept] == [5]
        assert await second == []

    asyncio.run(skip_then_arrival())
    assert consumer.seeks == [(0, 5)]


TP0 = TP(TOPIC, 0)


def idle_guard(first: int) -> tuple[SkipGuard, Consumer, App]:
    """A guard whose partition 0 is assigned and was last seen long ago (``idle_s`` is 0 in the
    tests below unless they say otherwise)."""
    app = App()
    app.consumer.assigned = {TP0}
    app.consumer._active_partitions = {TP0}
    guard = SkipGuard(app)  # type: ignore[arg-type]
    guard.guard.start((TOPIC, 0), first)
    return guard, app.consumer, app


def test_a_partition_whose_last_records_were_dropped_is_sought_back_once_idle() -> None:
    """The restart stall: Faust dropped a partition's last records (its fetch position moved
    past them), so no later record ever shows the skip. An idle partition with records beyond
    the expected offset is sought back to it."""
    guard, consumer, _ = idle_guard(5)
    assert asyncio.run(guard.admit([Event(Message(5))]))  # expects 6 now
    assert asyncio.run(guard.nudge(TP0, highwater=9, idle_s=0.0)) is True
    assert consumer.seeks == [(0, 6)]
    assert consumer.resumed == []  # it was active: nothing to resume


def test_no_nudge_without_records_beyond_the_expected_offset_or_before_the_idle_time() -> None:
    guard, consumer, _ = idle_guard(5)
    assert asyncio.run(guard.nudge(TP0, highwater=5, idle_s=0.0)) is False  # caught up
    assert asyncio.run(guard.nudge(TP0, highwater=None, idle_s=0.0)) is False  # unknown end
    asyncio.run(guard.admit([Event(Message(5))]))
    assert asyncio.run(guard.nudge(TP0, highwater=9, idle_s=60.0)) is False  # seen just now
    assert consumer.seeks == []


def test_a_nudge_waits_for_the_idle_time_again_and_never_runs_in_a_rebalance() -> None:
    guard, consumer, app = idle_guard(5)
    app.rebalancing = True
    assert asyncio.run(guard.nudge(TP0, highwater=9, idle_s=0.0)) is False
    app.rebalancing, app.in_recovery = False, True
    assert asyncio.run(guard.nudge(TP0, highwater=9, idle_s=0.0)) is False
    app.in_recovery = False
    guard._assigned_at -= 10.0  # assigned 10 s ago, never seen since
    assert asyncio.run(guard.nudge(TP0, highwater=9, idle_s=5.0)) is True
    assert asyncio.run(guard.nudge(TP0, highwater=9, idle_s=5.0)) is False  # just nudged
    assert consumer.seeks == [(0, 5)]


def test_a_partition_left_paused_outside_a_rebalance_is_resumed_by_the_nudge() -> None:
    guard, consumer, _ = idle_guard(5)
    consumer._paused_partitions = {TP0}
    consumer._active_partitions = set()
    assert asyncio.run(guard.nudge(TP0, highwater=9, idle_s=0.0)) is True
    assert consumer.resumed == [TP0] and consumer.seeks == [(0, 5)]


def test_an_unassigned_partition_is_not_nudged() -> None:
    guard, consumer, _ = idle_guard(5)
    consumer.assigned = set()
    assert asyncio.run(guard.nudge(TP0, highwater=9, idle_s=0.0)) is False
    assert consumer.seeks == []

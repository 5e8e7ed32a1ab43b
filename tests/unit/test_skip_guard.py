"""The offset guard's seeks over a stand-in consumer: Faust's consumer is the unit-level
collaborator here; the real one is exercised by the delivery and chaos tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    _committed_offset: dict[Any, int] = field(default_factory=dict)
    _unacked_messages: set[Any] = field(default_factory=set)

    async def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append((tp.partition, offset))


class Signal:
    def connect(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn


@dataclass
class App:
    consumer: Consumer = field(default_factory=Consumer)
    on_partitions_revoked: Signal = field(default_factory=Signal)


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

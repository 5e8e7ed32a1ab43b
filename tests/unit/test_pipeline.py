"""BatchProcessor.finish bounds each step: a stalled client fails the batch with the step's name
(the overlap then rewinds it and it is read again; exercised for real in test_e2e). The
publisher and the model future are unit-level stand-ins here; nothing else is touched."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from streamtune.core.errors import BatchStalledError
from streamtune.core.settings import Settings
from streamtune.ops.telemetry import ScorerMetrics
from streamtune.scorer.pipeline import BatchProcessor, Started


class StalledPublisher:
    """Sends are accepted; flush never returns (a wedged producer)."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[Any]:
        self.sent += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def flush(self, deliveries: Any) -> None:
        await asyncio.Event().wait()


class Publisher(StalledPublisher):
    async def flush(self, deliveries: Any) -> None:
        return None


def processor(publisher: Any) -> BatchProcessor:
    s = Settings(batch_step_timeout_s=0.2)
    # runtime, executor and sink are not reached by these batches (no valid event reaches Redis)
    return BatchProcessor(s, None, None, None, publisher, ScorerMetrics())  # type: ignore[arg-type]


def test_a_stalled_flush_fails_the_batch_naming_the_step() -> None:
    async def go() -> None:
        started = Started("review_sentiment", [], datetime.now(UTC), None, [], [])
        with pytest.raises(BatchStalledError, match=r"review_sentiment: the flush step took more than 0\.2"):
            await processor(StalledPublisher()).finish(started)

    asyncio.run(go())


def test_a_model_run_that_never_ends_fails_the_batch() -> None:
    async def go() -> None:
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        started = Started("query_class", [], datetime.now(UTC), never, [], [])
        with pytest.raises(BatchStalledError, match="the model step"):
            await processor(Publisher()).finish(started)
        assert never.cancelled(), "the abandoned model run is cancelled, not left pending"

    asyncio.run(go())


def test_a_batch_within_the_bound_finishes() -> None:
    async def go() -> None:
        started = Started("query_class", [], datetime.now(UTC), None, [], [])
        outcome = await processor(Publisher()).finish(started)
        assert (outcome.scored, outcome.dead) == (0, 0)

    asyncio.run(go())


def test_finish_hands_the_flush_exactly_the_deliveries_it_sent() -> None:
    """Dead letters' and results' delivery futures are what the batch waits for (a batch of
    malformed records: no model run, no Redis write)."""
    from streamtune.core.events import DeadLetter

    class Recording(Publisher):
        def __init__(self) -> None:
            super().__init__()
            self.returned: list[Any] = []
            self.flushed: list[Any] = []

        async def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[Any]:
            fut = await super().send(topic, key, value)
            self.returned.append(fut)
            return fut

        async def flush(self, deliveries: Any) -> None:
            self.flushed.append(list(deliveries))

    async def go() -> None:
        bad = [
            DeadLetter(
                source_topic="t",
                partition=0,
                offset=i,
                error="invalid JSON",
                raw="x",
                received_at=datetime.now(UTC),
            )
            for i in range(3)
        ]
        publisher = Recording()
        outcome = await processor(publisher).finish(
            Started("query_class", bad, datetime.now(UTC), None, [], [])
        )
        assert outcome.dead == 3 and len(publisher.returned) == 3
        assert publisher.flushed == [publisher.returned]

    asyncio.run(go())


def test_a_batch_waits_for_its_own_deliveries_only_and_a_timeout_leaves_them_alone() -> None:
    """The producer is shared by every agent: a batch whose flush times out must not cancel
    another batch's deliveries, and a failed delivery fails the batch that sent it."""
    from streamtune.scorer.app import FaustPublisher

    class Producer:
        async def flush(self) -> None:
            return None

    class App:
        producer = Producer()

    async def go() -> None:
        loop = asyncio.get_running_loop()
        publisher = FaustPublisher(App())  # type: ignore[arg-type]
        theirs: asyncio.Future[Any] = loop.create_future()  # another batch's, still in flight
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(publisher.flush([theirs]), 0.1)
        assert not theirs.cancelled(), "a timed-out flush cancelled a delivery"
        failed: asyncio.Future[Any] = loop.create_future()
        failed.set_exception(OSError("broker gone"))
        with pytest.raises(OSError, match="broker gone"):
            await publisher.flush([failed])
        theirs.set_result(None)
        await publisher.flush([theirs])

    asyncio.run(go())

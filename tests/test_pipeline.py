"""BatchProcessor.finish bounds each step: a stalled client fails the batch with the step's name
(the overlap then rewinds it and it is read again; exercised for real in test_e2e). The
publisher and the model future are unit-level stand-ins here; nothing else is touched."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from streamtune.errors import BatchStalledError
from streamtune.scorer.pipeline import BatchProcessor, Started
from streamtune.settings import Settings
from streamtune.telemetry import ScorerMetrics


class StalledPublisher:
    """Sends are accepted; flush never returns (a wedged producer)."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        self.sent += 1

    async def flush(self) -> None:
        await asyncio.Event().wait()


class Publisher(StalledPublisher):
    async def flush(self) -> None:
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

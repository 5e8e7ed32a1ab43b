"""BatchProcessor.finish bounds each step: a stalled client fails the batch with the step's name
(the overlap then rewinds it and it is read again; exercised for real in test_e2e). The
publisher and the model future are unit-level stand-ins here; nothing else is touched."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from streamtune.core.decode import Source
from streamtune.core.errors import BatchStalledError
from streamtune.core.scored import Scored
from streamtune.core.settings import Settings
from streamtune.model.cascade import ScorePath
from streamtune.model.runtime import Split
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


EARLY = Settings(early_answers=True)  # off by default (results of one product may reorder)


class RecordingSink:
    """Redis stand-in: records the event ids each write carried."""

    def __init__(self) -> None:
        self.writes: list[list[str]] = []

    async def write(self, results: Any, now_iso: str) -> None:
        self.writes.append([r.event_id for r in results])


class SplittingRuntime:
    """Model stand-in: the linear pass answers even rows alone; the transformer's rows wait for
    ``release`` (a slow model run), so what is published before it is seen."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.whole_batches = 0

    def split(self, task: str, inputs: list[str], keys: Any, shadow: bool) -> Split:
        early = [i for i in range(len(inputs)) if i % 2 == 0]
        later = [i for i in range(len(inputs)) if i % 2 == 1]
        return Split(task, self._scored(task, len(early), ScorePath.LINEAR), early, later, (), keys)

    def score_later(self, split: Split) -> Scored:
        assert self.release.wait(10), "the test never released the model run"
        return self._scored(split.task, len(split.later_rows), ScorePath.BLEND)

    def score(self, task: str, inputs: list[str], keys: Any, shadow: bool) -> Scored:
        self.whole_batches += 1
        return self._scored(task, len(inputs), ScorePath.BLEND)

    @staticmethod
    def _scored(task: str, n: int, path: ScorePath) -> Scored:
        probs = np.tile(np.array([[0.1, 0.2, 0.7]], dtype=np.float32), (n, 1))
        return Scored(task, ["negative", "neutral", "positive"], probs, np.full(n, 2),
                      paths=np.full(n, path, dtype=np.int8))  # fmt: skip


def _reviews(n: int) -> list[tuple[bytes | None, Source]]:
    out: list[tuple[bytes | None, Source]] = []
    for i in range(n):
        raw = json.dumps({"event_id": f"r{i}", "ts": datetime.now(UTC).isoformat(), "product_id": "p1",
                          "text": f"soft and lovely {i}"}).encode()  # fmt: skip
        out.append((raw, Source("review", 0, i)))
    out.append((b"{not json", Source("review", 0, n)))
    return out


class CountingPublisher(Publisher):
    """Signals each send, so a test waits for a count instead of polling."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    async def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[Any]:
        fut = await super().send(topic, key, value)
        self.changed.set()
        return fut

    async def until_sent(self, n: int, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while self.sent < n:
                self.changed.clear()
                await self.changed.wait()


def test_the_linear_answers_are_published_before_the_transformer_scores_the_rest() -> None:
    """A batch split by its linear pass: its linear answers and its dead letter are written and
    published while the transformer still runs on the other rows; the batch finishes (and may be
    acknowledged) only once both parts are out, each result once."""

    async def go() -> None:
        runtime, sink, publisher = SplittingRuntime(), RecordingSink(), CountingPublisher()
        with ThreadPoolExecutor(1) as executor:
            proc = BatchProcessor(EARLY, runtime, executor, sink, publisher, ScorerMetrics())  # type: ignore[arg-type]
            started = await proc.start("review_sentiment", _reviews(5))
            finished = asyncio.ensure_future(proc.finish(started))
            await publisher.until_sent(4)  # 3 linear answers + 1 dead letter
            assert sink.writes == [["r0", "r2", "r4"]] and not finished.done()
            runtime.release.set()
            outcome = await finished
        assert (outcome.scored, outcome.dead) == (5, 1)
        assert sink.writes == [["r0", "r2", "r4"], ["r1", "r3"]] and publisher.sent == 6
        assert runtime.whole_batches == 0 and len(proc.delivered) == 0

    asyncio.run(go())


def test_with_early_answers_off_the_whole_batch_is_one_model_run() -> None:
    async def go() -> None:
        runtime, sink, publisher = SplittingRuntime(), RecordingSink(), CountingPublisher()
        with ThreadPoolExecutor(1) as executor:
            settings = Settings(early_answers=False)
            proc = BatchProcessor(settings, runtime, executor, sink, publisher, ScorerMetrics())  # type: ignore[arg-type]
            outcome = await proc.finish(await proc.start("review_sentiment", _reviews(4)))
        assert (outcome.scored, outcome.dead) == (4, 1) and runtime.whole_batches == 1
        assert sink.writes == [["r0", "r1", "r2", "r3"]]

    asyncio.run(go())


def test_a_linear_pass_that_fails_leaves_the_batch_to_one_pass() -> None:
    """A text the linear stage cannot take must not stall the partition (a failing start is
    read again and again): the batch runs in one pass, where failures are retried and isolated."""

    class Failing(SplittingRuntime):
        def split(self, task: str, inputs: list[str], keys: Any, shadow: bool) -> Split:
            raise ValueError("a text the linear stage cannot take")

    async def go() -> None:
        runtime, sink = Failing(), RecordingSink()
        with ThreadPoolExecutor(1) as executor:
            proc = BatchProcessor(EARLY, runtime, executor, sink, Publisher(), ScorerMetrics())  # type: ignore[arg-type]
            outcome = await proc.finish(await proc.start("review_sentiment", _reviews(3)))
        assert (outcome.scored, outcome.dead) == (3, 1) and runtime.whole_batches == 1

    asyncio.run(go())

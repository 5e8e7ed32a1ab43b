"""One micro-batch, end to end, in two halves: ``start`` (decode, queue the model run) and
``finish`` (score, encode, write, publish, flush); overlap.py runs them for overlapping batches.

Kafka specifics stay in :mod:`streamtune.scorer.app`; this class sees records and two
outputs (a Redis sink and a publisher), so the wiring can be exercised directly in tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import numpy as np
import structlog

from streamtune.core.decode import Decoded, Source, split
from streamtune.core.encode import Result
from streamtune.core.errors import BatchStalledError
from streamtune.core.events import ClickEvent, DeadLetter, ReviewEvent, SearchEvent
from streamtune.core.features import SessionState, session_row, vectorize
from streamtune.core.settings import Settings
from streamtune.core.tasks import DLQ_TOPIC, TASKS
from streamtune.model.runtime import ModelRuntime, Scored
from streamtune.ops.telemetry import ScorerMetrics
from streamtune.scorer.sink import RedisSink

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Publisher(Protocol):
    async def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[Any]:
        """Queue one record; the future resolves once the broker acknowledged it."""
        ...

    async def flush(self, deliveries: Sequence[asyncio.Future[Any]]) -> None:
        """Send what is queued and wait for ``deliveries`` (one batch's own records); raise if
        one failed. Cancelling this wait must leave the deliveries themselves alone."""
        ...


# Applies decoded clicks to the session table (in stream order) and returns each click's
# session state after it; supplied by the Faust layer, which owns the table.
SessionUpdater = Callable[[list[Decoded[ClickEvent]]], Awaitable[list[SessionState]]]


@dataclass(frozen=True, slots=True)
class Started:
    """A batch between :meth:`BatchProcessor.start` and :meth:`BatchProcessor.finish`."""

    task: str
    bad: list[DeadLetter]
    now: datetime
    scoring: asyncio.Future[Scored] | None  # None: no valid event in the batch
    events: Sequence[ReviewEvent | SearchEvent | ClickEvent]
    page_views: list[int]  # clicks: each session's page views after its click


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    scored: int
    dead: int


class BatchProcessor:
    def __init__(
        self,
        settings: Settings,
        runtime: ModelRuntime,
        model_executor: Executor,
        sink: RedisSink,
        publisher: Publisher,
        metrics: ScorerMetrics,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.executor = model_executor
        self.sink = sink
        self.publisher = publisher
        self.metrics = metrics

    def _start_scoring(self, task: str, inputs: Sequence[Any], keys: list[str]) -> asyncio.Future[Scored]:
        """Queue the batch on the model thread and return at once; the model threads run while
        the event loop decodes the next batch and writes the previous one."""

        def timed() -> Scored:
            started = time.perf_counter()
            scored = self.runtime.score(task, list(inputs), keys, self.settings.shadow)
            self.metrics.model_seconds.labels(task).observe(time.perf_counter() - started)
            return scored

        return asyncio.get_running_loop().run_in_executor(self.executor, timed)

    async def start(
        self,
        task: str,
        records: list[tuple[bytes | None, Source]],
        sessions: SessionUpdater | None = None,
    ) -> Started:
        """First half of a batch: decode, validate, (clicks) update the session table in stream
        order, and queue the model run. Nothing leaves the process yet."""
        spec = TASKS[task]
        good, bad = split(spec.event_model, records)
        now = datetime.now(UTC)
        if not good:
            return Started(task, bad, now, None, [], [])
        events: list[Any] = [d.event for d in good]
        keys = [spec.key_of(ev) for ev in events]
        if spec.is_text:
            scoring = self._start_scoring(task, [spec.model_text(ev) for ev in events], keys)
            return Started(task, bad, now, scoring, events, [])
        assert sessions is not None, f"{task} needs the session table"
        states = await sessions(good)  # type: ignore[arg-type]
        scoring = self._start_scoring(task, [vectorize(session_row(st)) for st in states], keys)
        return Started(task, bad, now, scoring, events, [st.page_views for st in states])

    async def finish(self, started: Started) -> BatchOutcome:
        """Second half: wait for the model, then dead letters, Redis, output events, and flush
        (everything the batch's offsets may be committed for). The model run, the sends and the
        flush are bounded (``batch_step_timeout_s``): a stalled model thread or producer fails
        the batch with the step's name, and the batch is read again, instead of holding its
        partitions silently."""
        task, spec = started.task, TASKS[started.task]
        results: list[Result] = []
        deliveries: list[asyncio.Future[Any]] = []  # this batch's own records, not another's
        scored = await self._step(task, "model", started.scoring) if started.scoring is not None else None
        if started.bad:
            await self._step(task, "dead letters", self._dead_letters(task, started.bad, deliveries))
        if scored is not None:
            if scored.shadow is not None:
                self.metrics.shadow_agreement.labels(task).set(scored.shadow.agreement)
                self.metrics.shadow_confidence.labels(task).set(scored.shadow.confidence)
                self.metrics.shadow_rows.labels(task).inc(scored.shadow.rows)
            now = started.now
            results = spec.results(list(started.events), scored, now, started.page_views)
            for v, n in zip(*np.unique(scored.versions, return_counts=True), strict=True):
                self.metrics.results_by_version.labels(task, str(v)).inc(int(n))
            # Not bounded here: the sink retries with capped back-off while Redis is down (each
            # attempt bounded by the client's socket timeouts), so an outage pauses the scorer.
            await self.sink.write(results, now.isoformat())
            out_topic = self.settings.topic(spec.output_topic)
            await self._step(task, "publish", self._publish(task, out_topic, results, deliveries))
            self.metrics.scored.labels(task).inc(len(results))
            self.metrics.batch_size.labels(task).observe(len(results))
        await self._step(task, "flush", self.publisher.flush(deliveries))
        return BatchOutcome(scored=len(results), dead=len(started.bad))

    async def _step(self, task: str, step: str, aw: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(aw, self.settings.batch_step_timeout_s)
        except TimeoutError as e:
            raise BatchStalledError(
                f"{task}: the {step} step took more than {self.settings.batch_step_timeout_s:g} s"
            ) from e

    async def _publish(
        self, task: str, topic: str, results: list[Result], deliveries: list[asyncio.Future[Any]]
    ) -> None:
        done = time.time()
        for r in results:
            deliveries.append(await self.publisher.send(topic, r.key.encode("utf-8"), r.payload()))
            self.metrics.latency.labels(task).observe(max(0.0, done - r.event_ts.timestamp()))

    async def _dead_letters(
        self, task: str, bad: list[DeadLetter], deliveries: list[asyncio.Future[Any]]
    ) -> None:
        for dl in bad:
            deliveries.append(await self._dead_letter(task, dl))

    async def _dead_letter(self, task: str, dl: DeadLetter) -> asyncio.Future[Any]:
        self.metrics.dead_letters.labels(task).inc()
        log.warning(
            "dead_letter", topic=dl.source_topic, partition=dl.partition, offset=dl.offset, error=dl.error
        )
        key = dl.key.encode("utf-8") if dl.key is not None else None
        return await self.publisher.send(
            self.settings.topic(DLQ_TOPIC), key, dl.model_dump_json().encode("utf-8")
        )

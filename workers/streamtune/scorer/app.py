"""Faust wiring of the scorer: agents read raw records in micro-batches and hand them to the
:class:`BatchProcessor`; the session table lives here because Faust owns it.

Delivery: a batch's events are acknowledged only after its Redis writes and output events are
flushed (Faust then commits acknowledged offsets). Each message is pinned with an extra
reference while its batch is in flight, so a batch that fails or is cancelled is never
acknowledged by ``take_events``' cleanup: its offsets stay uncommitted and are re-delivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import faust
import structlog

from streamtune.core.decode import Decoded, Source
from streamtune.core.events import ClickEvent
from streamtune.core.features import SessionState
from streamtune.core.settings import Settings
from streamtune.core.tasks import TASKS, TaskKind, TaskSpec
from streamtune.kafka.app import JSON_TABLE, worker_app
from streamtune.kafka.compat import attributed_to, committed_offset, leave_pending
from streamtune.kafka.guard import SkipGuard
from streamtune.kafka.handover import hand_over_cleanly
from streamtune.kafka.security import async_redis_client
from streamtune.model.runtime import ModelRuntime
from streamtune.ops.progress import ProgressWatch, stall_reason
from streamtune.ops.tasks_dump import install_task_dump
from streamtune.ops.telemetry import Readiness, ScorerMetrics
from streamtune.rollout.releases import ReleaseFollower
from streamtune.scorer.gate import BatchGate
from streamtune.scorer.overlap import BatchSteps, Overlap
from streamtune.scorer.pipeline import BatchProcessor, Started
from streamtune.scorer.sessions import SessionStore
from streamtune.scorer.sink import RedisSink

log = structlog.get_logger(__name__)


@dataclass
class ScorerResources:
    """Heavy, long-lived things, created by the lifecycle code before the app starts."""

    runtime: ModelRuntime
    metrics: ScorerMetrics
    model_executor: ThreadPoolExecutor
    follower: ReleaseFollower | None = None
    readiness: Readiness = field(default_factory=Readiness)
    gate: BatchGate = field(default_factory=BatchGate)


class FaustPublisher:
    """Output events through the app's producer. Each batch waits for its own deliveries: the
    producer is shared by every agent, and one batch's failure or timeout must neither cancel
    nor consume another batch's acknowledgements."""

    def __init__(self, app: faust.App) -> None:
        self.app = app

    async def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[Any]:
        fut = asyncio.ensure_future(await self.app.producer.send(topic, key, value, None, None, None))
        fut.add_done_callback(_retrieve)  # a batch raises its first failure; the rest are read here
        return fut

    async def flush(self, deliveries: Sequence[asyncio.Future[Any]]) -> None:
        """Wait for this batch's deliveries only. Not the producer's ``flush()``: that waits for
        every record in flight, other batches' too (an overlapping batch, a split batch's other
        part, another agent), a serial wait between batches that share nothing. aiokafka's
        flush only waits; it forces no send (its sender drains batches on its own), and Faust's
        ``send_soon`` buffer (the session table's changelog) is flushed by every commit."""
        if deliveries:
            await asyncio.wait(deliveries)  # a cancelled wait leaves them running
            for fut in deliveries:
                fut.result()  # the first failed send, in send order, fails the batch


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a delivery's error as seen (asyncio logs every unread one when it is collected)."""
    if not fut.cancelled():
        fut.exception()


def build_app(settings: Settings, res: ScorerResources) -> faust.App:
    app = worker_app(settings, settings.kafka.group_id)
    publisher = FaustPublisher(app)
    redis_client = async_redis_client(settings, socket_timeout=5, socket_connect_timeout=5)
    sink = RedisSink(
        redis_client,
        score_ttl_s=settings.redis.score_ttl_s,
        session_ttl_s=settings.redis.session_ttl_s,
        product_ttl_s=settings.redis.product_ttl_s,
        retry_max_s=settings.redis.retry_max_s,
        on_retry=res.metrics.redis_retries.inc,
        cluster=settings.redis.cluster,
    )
    processor = BatchProcessor(settings, res.runtime, res.model_executor, sink, publisher, res.metrics)
    sessions = app.Table(
        "sessions",
        default=None,
        partitions=settings.kafka.topic_partitions,
        schema=JSON_TABLE,
    )
    store = SessionStore(sessions)
    (click_spec,) = [spec for spec in TASKS.values() if spec.kind is TaskKind.SESSION]
    click_topic_name = settings.topic(click_spec.input_topic)
    within = settings.scorer.batch_max_ms / 1000.0

    def topic(spec: TaskSpec) -> faust.TopicT:
        return app.topic(settings.topic(spec.input_topic), key_serializer="raw", value_serializer="raw")

    skip_guard = SkipGuard(app, on_skip=res.metrics.offset_skips.inc, settings=settings, overlapping=True)
    hand_over_cleanly(app, res.gate, timeout_s=settings.kafka.session_timeout_s / 2)

    overlaps: dict[str, Overlap[Started]] = {}  # per task, the agent's current one (health timer)
    last_batch_at: dict[str, float] = {}  # per task, when its agent last took a batch (nudges)

    def overlap(spec: TaskSpec, events_by_pos: dict[tuple[int, int], Any] | None) -> Overlap[Started]:
        task = spec.name

        def failed(events: list[Any]) -> None:
            log.exception("batch_failed", task=task, first_offset=events[0].message.offset)
            res.metrics.batch_failures.labels(task).inc()

        def done(events: list[Any]) -> None:
            skip_guard.done(events)
            for ev in events:
                ev.message.decref()

        steps = BatchSteps(
            start=lambda events: start_batch(spec, events, events_by_pos),
            finish=processor.finish,
            abandon=processor.abandon,
            done=done,
            rewind=skip_guard.rewind,
            failed=failed,
        )
        # Clicks one batch at a time: a batch's session-table updates must not run ahead of a
        # batch before it that may still fail (its retry would see the later clicks applied).
        depth = 1 if spec.kind is TaskKind.SESSION else settings.scorer.pipeline_depth
        overlaps[task] = Overlap(depth, steps, res.gate, backoff_s=settings.redis.retry_max_s)
        return overlaps[task]

    async def run(
        spec: TaskSpec, stream: faust.StreamT, events_by_pos: dict[tuple[int, int], Any] | None
    ) -> None:
        """Take batches and keep up to ``pipeline_depth`` of them in progress (overlap.py)."""
        take = settings.batch_max_events_for(spec.name)
        batches = overlap(spec, events_by_pos)
        async for batch in stream.take_events(take, within=within):  # type: ignore[attr-defined]
            last_batch_at[spec.name] = time.monotonic()
            if res.gate.closed:  # handing over or stopping: leave these to the partition's next owner
                for ev in batch:
                    leave_pending(app, ev.message)
                continue
            events = await skip_guard.admit(batch)
            if not events:
                continue
            if res.gate.closed:  # closed while admit awaited a seek
                for ev in events:
                    skip_guard.retry_later(ev.message)
                continue
            for ev in events:
                ev.message.incref()  # pin until the batch is flushed (see module docstring)
            await batches.submit(events)

    async def start_batch(
        spec: TaskSpec, events: list[Any], events_by_pos: dict[tuple[int, int], Any] | None
    ) -> Started:
        task = spec.name
        records = [
            (
                ev.message.value,
                Source(ev.message.topic, ev.message.partition, ev.message.offset, ev.message.key),
            )
            for ev in events
        ]
        if events_by_pos is not None:
            events_by_pos.clear()
            events_by_pos.update({(ev.message.partition, ev.message.offset): ev for ev in events})
        if log.isEnabledFor(logging.DEBUG):
            spans: dict[int, list[int]] = {}
            for _, src in records:
                spans.setdefault(src.partition, []).append(src.offset)
            log.debug("batch", task=task, offsets={p: [min(o), max(o)] for p, o in spans.items()})
        return await processor.start(
            task, records, update_sessions if spec.kind is TaskKind.SESSION else None
        )

    click_events: dict[tuple[int, int], Any] = {}

    def attributed(src: Source) -> AbstractContextManager[None]:
        return attributed_to(click_events[(src.partition, src.offset)])

    async def update_sessions(decoded: list[Decoded[ClickEvent]]) -> list[SessionState]:
        """Apply clicks to the table in order; each table write is attributed to its own event,
        so its changelog record lands in that event's partition (Faust co-partitioning)."""
        states = store.apply(decoded, attribute=attributed)
        res.metrics.sessions_active.set(len(sessions.data))
        return states

    def scorer(
        spec: TaskSpec, events_by_pos: dict[tuple[int, int], Any] | None
    ) -> Callable[[faust.StreamT], Awaitable[None]]:
        """The agent of one task (a function per spec: each binds its own)."""

        async def score(stream: faust.StreamT) -> None:
            await run(spec, stream, events_by_pos)

        score.__name__ = score.__qualname__ = f"score_{spec.name}"
        return score

    for spec in TASKS.values():
        events_by_pos = click_events if spec.kind is TaskKind.SESSION else None
        app.agent(topic(spec), name=spec.scorer_agent)(scorer(spec, events_by_pos))

    @app.timer(settings.scorer.session_sweep_s)
    async def expire_sessions() -> None:
        """Drop expired sessions of the partitions we own: idle longer than
        ``session_inactivity_s`` in event time, or of a partition without a click for
        ``session_idle_partition_s`` (rules: scorer/sessions.py)."""
        owned = {tp.partition for tp in app.consumer.assignment() if tp.topic == click_topic_name}
        expired = store.expired(
            owned,
            time.time(),
            settings.scorer.session_inactivity_s,
            idle_partition_s=settings.scorer.session_idle_partition_s,
        )
        for key, partition in expired:
            sessions.data.pop(key, None)
            sessions.send_changelog(partition, key, None, value_serializer="raw")
        if expired:
            res.metrics.sessions_expired.inc(len(expired))
            log.info("sessions_expired", count=len(expired))
        res.metrics.sessions_active.set(len(sessions.data))

    task_of_topic = {settings.topic(spec.input_topic): name for name, spec in TASKS.items()}
    progress = ProgressWatch(settings.scorer.stall_after_s)

    @app.timer(2.0)
    async def health_and_lag() -> None:
        """Readiness flags for /readyz (stalled partitions included: ops/progress.py), consumer
        lag per task for autoscaling dashboards, and the age of each task's oldest batch."""
        res.readiness.beat()
        assignment = [tp for tp in app.consumer.assignment() if tp.topic in task_of_topic]
        res.readiness.partitions_assigned = bool(assignment)
        progress.keep_only(assignment)  # a revoked partition is its new owner's to report
        now = time.monotonic()
        for task in TASKS:
            started = overlaps[task].oldest_started_at() if task in overlaps else None
            res.metrics.oldest_in_progress.labels(task).set(0.0 if started is None else now - started)
        try:
            await redis_client.ping()
            res.readiness.redis_reachable = True
        except Exception:  # any failure means "not reachable now"; the sink retries on its own
            res.readiness.redis_reachable = False
        lag: dict[str, int] = dict.fromkeys(TASKS, 0)
        highs: dict[Any, int | None] = {}
        try:
            for tp in assignment:
                high = highs[tp] = app.consumer.highwater(tp)
                # bounded: position() waits while a partition is being reset, and this timer
                # also beats the readiness heartbeat
                pos = await asyncio.wait_for(app.consumer.position(tp), 5.0)
                if high is not None and pos is not None:
                    lag[task_of_topic[tp.topic]] += max(0, high - pos)
                    committed = committed_offset(app, tp)
                    progress.observe(tp, pos, high, time.monotonic(), committed=committed)
        except Exception as e:  # a rebalance revoked a partition meanwhile (aiokafka:
            # IllegalStateError "not assigned"), or no answer: an exception in a Faust timer
            # crashes the worker, so this round's lag is skipped instead.
            log.info("lag_skipped", error=str(e) or type(e).__name__)
            return
        finally:  # stalls age on a skipped round too (the watch keeps each partition's clock)
            res.readiness.problems["progress"] = stall_reason(progress.stalled(time.monotonic()))
        for task, n in lag.items():
            res.metrics.consumer_lag.labels(task).set(n)
        await nudge_idle(highs, now)

    async def nudge_idle(highs: dict[Any, int | None], now: float) -> None:
        """Partitions of an idle task (no batch taken for ``nudge_after_s``, none in progress)
        that still have records beyond the next expected offset are sought back to it
        (:meth:`SkipGuard.nudge`); a task that is busy or flowing is left alone."""
        idle_s = settings.scorer.nudge_after_s
        if res.gate.closed:
            return
        for tp, high in highs.items():
            task = task_of_topic[tp.topic]
            busy = task in overlaps and overlaps[task].oldest_started_at() is not None
            if busy or now - last_batch_at.get(task, 0.0) < idle_s:
                continue
            try:
                await skip_guard.nudge(tp, high, idle_s)
            except Exception as e:  # revoked meanwhile (aiokafka IllegalStateError): next round
                error = str(e) or type(e).__name__
                log.info("nudge_skipped", topic=tp.topic, partition=tp.partition, error=error)

    @app.task
    async def _dump_on_signal() -> None:
        install_task_dump(asyncio.get_running_loop())

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def _close(app: faust.App, **_: Any) -> None:
        await redis_client.aclose()

    return app

"""The Faust app configuration both workers share (scorer and trainer differ only in app id)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import faust
import structlog
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from streamtune.group_offsets import GroupStartOffsets
from streamtune.offsets import DONE, IN_PROGRESS, TAKE, OffsetGuard, disable_gap_filling
from streamtune.security import faust_credentials
from streamtune.settings import Settings

log = structlog.get_logger(__name__)

# Table keys and values as JSON (readable changelogs, no pickle).
JSON_TABLE: faust.Schema = faust.Schema(key_serializer="json", value_serializer="json")


class IdempotentProducer(faust_aiokafka.Producer):
    """Faust's aiokafka producer, idempotent always. Faust asks for idempotence only in
    exactly-once mode, so a send retried after a timeout or a leader change could land twice on
    an output topic; with idempotence the broker drops the repeat."""

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class IdempotentTransport(faust_aiokafka.Transport):
    """The aiokafka transport with :class:`IdempotentProducer`."""

    Producer = IdempotentProducer


def worker_app(settings: Settings, app_id: str) -> faust.App:
    """A Faust app with raw topics, in-memory tables recovered from changelogs, acks=all, the
    configured security, and a session timeout that bounds how long a crashed worker holds
    its partitions."""
    app = faust.App(
        app_id,
        broker=[f"kafka://{s.strip()}" for s in settings.bootstrap_servers.split(",")],
        store="memory://",
        datadir=str(Path(settings.state_dir) / app_id),
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        topic_disable_leader=True,
        table_standby_replicas=0,
        broker_commit_interval=settings.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        producer_acks=-1,
        broker_credentials=faust_credentials(settings),
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_rebalance_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=max(1.0, settings.kafka_session_timeout_s / 10),
    )
    # Faust's own producer (results, DLQ, changelogs) comes from the consumer transport.
    app.transport = IdempotentTransport(app.conf.broker_consumer, app)

    # Before any record is fetched (the first join revokes the empty assignment first).
    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _no_gap_on_revoke(app: faust.App, revoked: Any, **_: Any) -> None:
        disable_gap_filling(app.consumer)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _no_gap_on_assign(app: faust.App, assigned: Any, **_: Any) -> None:
        disable_gap_filling(app.consumer)

    return app


def leave_pending(app: faust.App, message: Any) -> None:
    """Neither process nor acknowledge ``message``: its offset is never committed, so it comes
    again (to us after a seek, or to the partition's next owner). Pinned so the stream's own
    clean-up cannot acknowledge it, and untracked so Faust's stop and rebalance, which wait
    for every tracked message to be acknowledged, do not wait for it."""
    message.incref()
    app.consumer._unacked_messages.discard(message)  # type: ignore[attr-defined]


class SkipGuard:
    """Keeps an agent's input contiguous and free of repeats (see offsets.py): a record that
    arrives after a skip is left unacknowledged and the consumer seeks back to the first
    missing offset; a record processed before is acknowledged again, not processed again."""

    RESEEK_AFTER_S = 0.2  # stale prefetched records can still arrive after a seek: seek again

    def __init__(
        self,
        app: faust.App,
        on_skip: Callable[[], None] | None = None,
        settings: Settings | None = None,
        overlapping: bool = False,
    ) -> None:
        """``overlapping``: batches overlap and every admitted record is reported back (done or
        rewound), so a second copy delivered meanwhile is held back, not processed twice."""
        self.app = app
        self.on_skip = on_skip
        # Without settings (unit tests) the guard relies on Faust's cached commits only.
        self.starts: GroupStartOffsets | None = None
        if settings is not None:
            # Bounded well inside a rebalance (it runs in one: see _install_start_lookup).
            timeout_s = max(1.0, settings.kafka_session_timeout_s / 4)
            self.starts = GroupStartOffsets(settings, app.conf.id, timeout_s=timeout_s)
        self.guard = OffsetGuard(
            committed=lambda tp: app.consumer._committed_offset.get(tp),  # type: ignore[attr-defined]
            track_in_progress=overlapping,
        )
        self._sought: dict[tuple[str, int], tuple[int, float]] = {}

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def _forget(app: faust.App, revoked: Any, **_: Any) -> None:
            self.guard.reset()
            self._sought.clear()
            self._install_start_lookup()

    def _install_start_lookup(self) -> None:
        """Learn where the group resumes each assigned input partition (all of them: eager
        rebalancing revokes everything first) before Faust's own assignment handler runs, i.e.
        before any record of the assignment is handed out, so the agents never wait on the
        broker (the rebalance does, bounded). Installed once, at the first (empty) revocation of
        the first join, like :func:`hand_over_cleanly`."""
        consumer: Any = self.app.consumer
        if self.starts is None or getattr(consumer, "_streamtune_starts", False):
            return
        original = consumer.on_partitions_assigned

        async def on_partitions_assigned(assigned: Any, generation_id: int = 0) -> None:
            try:
                if not self.app.should_stop:
                    await self._learn_starts(assigned)
            except Exception:  # Faust's own handler must run whatever happened here: without
                # it the assignment is never recovered nor fetched, silently (aiokafka only logs)
                log.exception("resume_offsets_failed")
            await original(assigned, generation_id)

        consumer.on_partitions_assigned = on_partitions_assigned
        consumer._streamtune_starts = True

    def _input_topics(self) -> set[str]:
        return {
            name for agent in self.app.agents.values() for name in getattr(agent.channel, "topics", ()) or ()
        }

    async def _learn_starts(self, assigned: Any) -> None:
        """Where the group resumes each assigned input partition, from the broker (see
        group_offsets.py). Without an answer the guard falls back to Faust's cached commit, else
        the first record delivered (a skip before that one then goes unseen: logged)."""
        if self.starts is None:
            return
        inputs = self._input_topics()
        tps = {(tp.topic, tp.partition) for tp in assigned if tp.topic in inputs}
        if not tps:
            return
        try:
            found = await self.starts.starts(tps)
        except Exception as e:  # GroupOffsetsError (no answer, timed out): fall back, keep going
            log.warning("resume_offsets_unknown", error=str(e) or type(e).__name__)
            return
        for tp, offset in found.items():
            self.guard.start(tp, offset)
        log.info("resume_offsets_learned", offsets={f"{t}:{p}": o for (t, p), o in sorted(found.items())})

    async def admit(self, events: Sequence[Any]) -> list[Any]:
        """The events to process, in order; the others stay pending and come again, or were
        processed already (the stream acknowledges those as usual)."""
        kept, skipping = [], set()
        for ev in events:
            m = ev.message
            tp = (m.topic, m.partition)
            if tp in skipping:
                leave_pending(self.app, m)
                continue
            verdict = self.guard.observe(tp, m.offset)
            if verdict == TAKE:
                kept.append(ev)
            elif verdict == IN_PROGRESS:  # a second copy: the first one's ack will cover it
                leave_pending(self.app, m)
            elif verdict != DONE:
                leave_pending(self.app, m)
                skipping.add(tp)
                await self._seek(m.topic, m.partition, int(verdict), m.offset)
        return kept

    def retry_later(self, message: Any) -> None:
        """Leave a record admitted but not started: unacknowledged, expected again."""
        self.guard.rewind((message.topic, message.partition), message.offset)
        leave_pending(self.app, message)

    async def rewind(self, events: Sequence[Any]) -> None:
        """Batches failed: their records stay unacknowledged, and each partition is read again
        from its first offset among them (the processed ones are recognised as done). Every
        expectation is lowered before the first seek awaits, so nothing admitted meanwhile can
        pass the rewound records."""
        first: dict[tuple[str, int], int] = {}
        for ev in events:
            m = ev.message
            tp = (m.topic, m.partition)
            first[tp] = min(first.get(tp, m.offset), m.offset)
            m.decref()  # the batch's own pin (see scorer/app.py)
            leave_pending(self.app, m)
        for tp, offset in first.items():
            self.guard.rewind(tp, offset)
        for (topic, partition), offset in first.items():
            if TP(topic, partition) in self.app.consumer.assignment():
                await self.app.consumer.seek(TP(topic, partition), offset)

    def done(self, events: Sequence[Any]) -> None:
        """Processed and flushed: acknowledge now (commits may include them from here on)."""
        for ev in events:
            m = ev.message
            self.guard.mark_done((m.topic, m.partition), m.offset)
            self.app.consumer.ack(m)

    async def _seek(self, topic: str, partition: int, back: int, got: int) -> None:
        last = self._sought.get((topic, partition))
        now = time.monotonic()
        if last is not None and last[0] == back and now - last[1] <= self.RESEEK_AFTER_S:
            return
        self._sought[(topic, partition)] = (back, now)
        log.warning("offsets_skipped", topic=topic, partition=partition, expected=back, got=got)
        if self.on_skip is not None:
            self.on_skip()
        await self.app.consumer.seek(TP(topic, partition), back)


class BatchGate:
    """Whether agents may start a batch, and which batches are in progress.

    Closed while partitions are being handed over (a rebalance) and for good on SIGTERM, so
    that what a scorer has started it finishes and commits before anyone else takes over the
    partition: nothing lost, nothing scored twice."""

    def __init__(self) -> None:
        self.closed = False
        self.stopping = False
        self._in_flight = 0
        self._idle: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._idle is None:  # created on the worker's loop, not at import or build time
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    def begin(self) -> None:
        """A batch starts (synchronously, so a close that follows waits for it)."""
        self._in_flight += 1
        self._event().clear()

    def end(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._event().set()

    async def close(self, timeout_s: float) -> bool:
        """Close and wait for the batches in progress; False when they outlasted ``timeout_s``."""
        self.closed = True
        try:
            await asyncio.wait_for(self._event().wait(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True

    def reopen(self) -> None:
        if not self.stopping:
            self.closed = False


async def commit_now(app: faust.App, timeout_s: float) -> bool:
    """Commit every acknowledged offset now, within ``timeout_s`` (False: it did not finish).
    ``Consumer.commit`` returns without committing when another commit is in flight (it waits
    for that one, which may predate our last acks), so wait for it first, then commit ours."""

    async def both() -> bool:
        first = await app.consumer.commit()
        return bool(await app.consumer.force_commit()) or first  # type: ignore[attr-defined]

    try:
        return await asyncio.wait_for(both(), timeout=timeout_s)
    except TimeoutError:
        log.warning("commit_timed_out", timeout_s=round(timeout_s, 1))
        return False


def hand_over_cleanly(app: faust.App, gate: BatchGate, timeout_s: float) -> None:
    """On a rebalance, finish the batches in progress and commit them before the partitions move.

    This has to run before Faust's own revocation handler, which first throws away the
    acknowledgements not yet committed (``Consumer.on_partitions_revoked`` drops ``_acked`` for
    every revoked partition; with the eager protocol that is all of them) and only then waits
    for streams, a wait that does not see batches taken with ``take_events`` anyway. So the
    consumer's handler is wrapped, once, when the first (empty) revocation of the first join
    comes by."""

    async def finish_then_commit(revoked: Any) -> None:
        if app.consumer.assignment():
            started = time.monotonic()
            finished = await gate.close(timeout_s)
            committed = await commit_now(app, max(1.0, timeout_s - (time.monotonic() - started)))
            log.info("handover", finished=finished, committed=committed, revoked=len(revoked))

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _wrap(app: faust.App, revoked: Any, **_: Any) -> None:
        consumer: Any = app.consumer
        if getattr(consumer, "_streamtune_handover", False):
            return
        original = consumer.on_partitions_revoked

        async def on_partitions_revoked(revoked: Any) -> None:
            try:
                await finish_then_commit(revoked)
            except Exception:  # Faust's own revocation must run whatever happened here
                log.exception("handover_failed")
            await original(revoked)

        consumer.on_partitions_revoked = on_partitions_revoked
        consumer._streamtune_handover = True

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _reopen(app: faust.App, assigned: Any, **_: Any) -> None:
        gate.reopen()


async def drain_app(app: faust.App, gate: BatchGate, grace_s: float) -> None:
    """SIGTERM, first half: stop handing out records, let the batches in progress finish
    (bounded by ``grace_s``), commit what they acknowledged. Faust's own stop then leaves the
    group and flushes the producer. Records taken but not started stay unacknowledged: the next
    owner of their partition scores them, nobody scores them twice."""
    started = time.monotonic()
    gate.stopping = True
    assignment = app.consumer.assignment()
    app.consumer.pause_partitions(assignment)
    finished = await gate.close(grace_s)
    await commit_now(app, max(1.0, grace_s - (time.monotonic() - started)))
    log.info(
        "drain_complete" if finished else "drain_timed_out",
        partitions=len(assignment),
        seconds=round(time.monotonic() - started, 3),
        grace_s=grace_s,
    )


class DrainingWorker(faust.Worker):
    """A Faust worker whose SIGTERM (and SIGINT) first runs ``before_stop`` (a drain), then stops."""

    def __init__(self, app: faust.App, before_stop: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._before_stop = before_stop

    async def _stop_on_signal(self, sig: signal.Signals) -> None:  # mode.Worker's signal path
        log.info("stop_requested", signal=sig.name)
        try:
            await self._before_stop()
        except Exception:  # a failed drain must not keep the process from stopping
            log.exception("drain_failed")
        await super()._stop_on_signal(sig)

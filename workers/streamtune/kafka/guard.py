"""The offset guard wired into Faust: an agent's input stays contiguous and free of repeats.

The bookkeeping itself is pure (:class:`streamtune.kafka.offsets.OffsetGuard`); this module
connects it to the consumer: where each partition resumes, seeking back after a skip, and
leaving records unacknowledged (:mod:`streamtune.kafka.compat`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import faust
import structlog
from faust.types import TP

from streamtune.core.settings import Settings
from streamtune.kafka import compat
from streamtune.kafka.compat import leave_pending
from streamtune.kafka.group_offsets import GroupStartOffsets
from streamtune.kafka.offsets import DONE, IN_PROGRESS, TAKE, OffsetGuard

log = structlog.get_logger(__name__)


class SkipGuard:
    """Keeps an agent's input contiguous and free of repeats (see
    :mod:`streamtune.kafka.offsets`): a record that arrives after a skip is left unacknowledged
    and the consumer seeks back to the first missing offset; a record processed before is
    acknowledged again, not processed again."""

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
            timeout_s = max(1.0, settings.kafka.session_timeout_s / 4)
            self.starts = GroupStartOffsets(settings, app.conf.id, timeout_s=timeout_s)
        self.guard = OffsetGuard(
            committed=lambda tp: compat.committed_offset(app, tp),
            track_in_progress=overlapping,
        )
        self._sought: dict[tuple[str, int], tuple[int, float]] = {}
        # When each partition last delivered a record, or was last nudged; and since when the
        # current assignment is held (a partition not seen yet counts from there).
        self._seen: dict[tuple[str, int], float] = {}
        self._assigned_at = time.monotonic()

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def _forget(app: faust.App, revoked: Any, **_: Any) -> None:
            self.guard.reset()
            self._sought.clear()
            self._seen.clear()
            self._assigned_at = time.monotonic()
            self._install_start_lookup()

    def _install_start_lookup(self) -> None:
        """Learn where the group resumes each assigned input partition (all of them: eager
        rebalancing revokes everything first) before Faust's own assignment handler runs, i.e.
        before any record of the assignment is handed out, so the agents never wait on the
        broker (the rebalance does, bounded). Installed once, at the first (empty) revocation of
        the first join, like :func:`hand_over_cleanly`."""
        if self.starts is None:
            return

        async def learn(assigned: Any) -> None:
            if not self.app.should_stop:
                await self._learn_starts(assigned)

        compat.run_before(self.app, "on_partitions_assigned", learn, marker="resume_offsets")

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
        now = time.monotonic()
        for ev in events:
            m = ev.message
            tp = (m.topic, m.partition)
            self._seen[tp] = now
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

    async def nudge(self, tp: Any, highwater: int | None, idle_s: float) -> bool:
        """Seek ``tp`` back to its next expected offset when records beyond it exist (the log
        ends at ``highwater``) and none of the partition's records has been delivered for
        ``idle_s`` seconds (the caller checks that the agent is idle, not busy with a batch).

        Faust drops records while its fetch position moves past them in several places (a
        record at or below its read offset after a seek, a getmany batch cut short by a
        rebalance or a paused partition: docs/faust-workarounds.md §2). A skip makes the guard
        seek back, but only a later record shows the skip: when the dropped records were the
        partition's last ones, nothing arrives and the partition would stall for good (the
        restart stall of stops 16 and 17's CI). The consumer's view of the partition is logged
        with the nudge, and a partition Faust left inactive outside a rebalance is resumed."""
        key = (tp.topic, tp.partition)
        expected = self.guard.expected(key)
        if expected is None or highwater is None or expected >= highwater:
            return False
        now = time.monotonic()
        if now - self._seen.get(key, self._assigned_at) < idle_s:  # cleared with each assignment
            return False
        if self.app.rebalancing or self.app.in_recovery or tp not in self.app.consumer.assignment():
            return False
        self._seen[key] = now  # next nudge after another idle_s at the earliest
        state = compat.fetch_state(self.app, tp)
        log.warning("partition_nudged", topic=tp.topic, partition=tp.partition, expected=expected,
                    highwater=highwater, **state)  # fmt: skip
        if self.on_skip is not None:
            self.on_skip()
        if state["paused"] or (state["active"] is False and not state["buffered"]):
            self.app.consumer.resume_partitions({tp})
        await self.app.consumer.seek(tp, expected)
        return True

    async def _seek(self, topic: str, partition: int, back: int, got: int) -> None:
        """Seek ``topic``/``partition`` back to ``back``. A second skip to the same offset within
        ``RESEEK_AFTER_S`` is a stale prefetched record of the first seek; it waits out the
        rest of that interval and seeks again, unless ``back`` arrived meanwhile. It must not
        just return: Faust raises its read offset to every record it hands out (``got`` here)
        and then drops the re-fetched records below it, so when ``got`` was the partition's last
        record nothing else would ever arrive to trigger the seek, and the partition stalled
        (stop 16's CI: 24 clicks never scored after a scorer restart)."""
        tp = (topic, partition)
        last = self._sought.get(tp)
        now = time.monotonic()
        if last is not None and last[0] == back and now - last[1] <= self.RESEEK_AFTER_S:
            await asyncio.sleep(self.RESEEK_AFTER_S - (now - last[1]))
            if self.guard.expected(tp) != back:  # arrived, rewound or reset meanwhile
                return
            now = time.monotonic()
        self._sought[tp] = (back, now)
        log.warning("offsets_skipped", topic=topic, partition=partition, expected=back, got=got)
        if self.on_skip is not None:
            self.on_skip()
        await self.app.consumer.seek(TP(topic, partition), back)

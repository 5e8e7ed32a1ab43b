"""Session state of the click task over a plain mapping: which clicks to apply, what to store,
which sessions have expired.

In production the mapping is the Faust table ``sessions`` (see :mod:`streamtune.scorer.app`);
in tests it is a dict. This module imports nothing from Faust or :mod:`streamtune.kafka`: the
Faust-specific parts stay in the app, reached through hooks. A table write must be attributed
to the event it comes from (so its changelog record lands in that event's partition), which the
app does with the ``attribute`` context of :meth:`SessionStore.apply`; and an expired session
is removed by the app (table data and changelog tombstone) from what :meth:`SessionStore.expired`
returns.

Each session is stored as ``SessionState.model_dump(mode="json")`` under its session id.

Expiry follows the stream's event time, not the wall clock. Comparing a session's last click
with the clock dropped live sessions whenever the scorer lagged by more than
``session_inactivity_s`` (a Redis outage, a backlog, a replay): their next click started them
again from one page view. The rules, per partition ``p`` of the click topic:

- **Watermark.** ``watermarks[p]`` is the highest click time applied on ``p``. A session of ``p``
  expires when ``watermarks[p] - last_seen > session_inactivity_s``: it has had no click for that
  long *in the stream*, however late the stream is read. A partition without a watermark expires
  nothing by this rule.
- **Click time.** The time a click counts at (its session's ``last_seen`` and the watermark) is
  its event time clamped to the wall clock when it is applied
  (:func:`~streamtune.core.features.click_time`). The decoder refuses events more than
  ``max_future_skew_s`` ahead; within that skew, a click dated a day ahead would otherwise keep
  its session for a day after its last click, and push the watermark a day ahead, expiring every
  live session of its partition. Clamped, it counts as a click made now for its own session, but
  (dated more than ``CLOCK_SKEW_S`` ahead: a producer clock a little fast still counts) it does
  **not** move the watermark: on a lagging partition (a backlog read hours late) the
  clamped time would be hours ahead of the stream and expire every live session there. Each
  stored session keeps ``stream_seen``, its latest click time that counted, so the watermark
  recomputed after a restart leaves clamped clicks out too.
- **Idle partition.** When no click at all has been seen on ``p`` (applied or re-delivered) for
  ``session_idle_partition_s`` of wall-clock time, every session of ``p`` expires: a stream that
  stops moves no watermark, so without this its last sessions would stay for ever. A stream that
  is merely late still delivers clicks, so this never fires during a backlog or a replay; a
  scorer that applies nothing for that long (an outage longer than the limit) does drop them,
  which is why the limit is hours, well above ``session_inactivity_s``.
- **Restart and rebalance.** Watermarks need no state of their own: on first use of a partition
  (the first sweep that finds it owned) its watermark is recomputed from the table, as the
  highest ``stream_seen`` of its stored sessions (equal to the watermark before the restart: the
  session that set it is never expired by it), and its idle clock starts then. A partition that
  is no longer owned is forgotten, so that when it comes back its state is recomputed from the
  table the other owner kept, never taken from stale memory.

Every function takes the wall clock as ``now`` (epoch seconds), so the rules are pure.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, MutableMapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from streamtune.core.decode import Decoded, Source
from streamtune.core.events import ClickEvent
from streamtune.core.features import SessionState, apply_click, click_time, is_expired

# A click dated at most this far ahead of the wall clock is a producer's clock running slightly
# fast, not a future date: it still moves the watermark (at its clamped time, now). Without this
# margin, producers a few milliseconds ahead of the scorer would freeze every watermark.
CLOCK_SKEW_S = 5.0

# The context one table write runs in, given the source of the click it comes from.
Attribute = Callable[[Source], AbstractContextManager[Any]]


def _unattributed(_: Source) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


class SessionStore:
    """The session-state logic over ``table``, a mapping of session id to stored JSON.

    ``watermarks`` (partition -> highest click time applied) and ``last_click_at`` (partition ->
    wall clock of the latest click seen) are plain data, recomputed after a restart (see the
    module docstring).
    """

    def __init__(self, table: MutableMapping[str, Any]) -> None:
        self.table = table
        self.watermarks: dict[int, float] = {}
        self.last_click_at: dict[int, float] = {}
        self._seeded: set[int] = set()  # partitions whose watermark includes the stored sessions

    def state(self, session_id: str) -> SessionState | None:
        """The stored state of a session, or None when it has none."""
        raw = self.table.get(session_id)
        return SessionState.model_validate(raw) if raw else None

    def apply(
        self,
        decoded: Sequence[Decoded[ClickEvent]],
        attribute: Attribute = _unattributed,
        now: float | None = None,
    ) -> list[SessionState]:
        """Apply clicks in order and return each click's session state after it.

        A click at or below its session's last applied offset (a re-delivery) is not applied and
        not written: its entry is the stored state, unchanged. Each write runs inside
        ``attribute(source of the click)``. An applied click's time, clamped to ``now`` (epoch
        seconds; default: the clock), is its session's ``last_seen``; it raises its partition's
        watermark unless it was clamped. Any click marks its partition as not idle at ``now``.
        """
        now = time.time() if now is None else now
        states = []
        for d in decoded:
            sid = d.event.session_id
            partition = d.source.partition
            self.last_click_at[partition] = now
            stored = self.state(sid)
            new, applied = apply_click(stored, d.event, partition, d.source.offset)
            if applied:
                t = click_time(d.event, now)
                # far ahead: counts as made now for its session, not for the watermark
                clamped = d.event.ts.timestamp() - t > CLOCK_SKEW_S
                seen = self._stream_seen(stored) if clamped else t
                if (new.last_seen, new.stream_seen) != (t, seen):
                    new = new.model_copy(update={"last_seen": t, "stream_seen": seen})
                with attribute(d.source):
                    self.table[sid] = new.model_dump(mode="json")
                if not clamped:
                    self.watermarks[partition] = max(self.watermarks.get(partition, t), t)
            states.append(new)
        return states

    @staticmethod
    def _stream_seen(state: SessionState | None) -> float:
        """What ``state`` adds to its partition's watermark (0.0: nothing)."""
        if state is None:
            return 0.0
        return state.last_seen if state.stream_seen is None else state.stream_seen

    def expired(
        self, owned: Collection[int], now: float, inactivity_s: float, *, idle_partition_s: float
    ) -> list[tuple[str, int]]:
        """Sessions of the partitions in ``owned`` that have expired at ``now`` (epoch seconds),
        as (session id, changelog partition): idle longer than ``inactivity_s`` by their
        partition's watermark, or of a partition without a click for longer than
        ``idle_partition_s`` (see the module docstring). Nothing is removed from the table here:
        the caller removes them. Partitions not owned are forgotten; an owned one used for the
        first time gets its watermark from the table."""
        mine = set(owned)
        for p in (set(self.watermarks) | set(self.last_click_at) | self._seeded) - mine:
            self.watermarks.pop(p, None)
            self.last_click_at.pop(p, None)
            self._seeded.discard(p)
        candidates: list[tuple[str, SessionState]] = []
        stored_max: dict[int, float] = {}
        for key, raw in list(self.table.items()):
            if not raw:
                continue
            state = SessionState.model_validate(raw)
            p = state.partition
            if p not in mine:
                continue
            candidates.append((key, state))
            seen = self._stream_seen(state)
            if p not in self._seeded and seen > 0:
                stored_max[p] = max(stored_max.get(p, seen), seen)
        for p in mine - self._seeded:
            if p in stored_max:
                self.watermarks[p] = max(self.watermarks.get(p, stored_max[p]), stored_max[p])
            self.last_click_at.setdefault(p, now)
            self._seeded.add(p)
        out = []
        for key, state in candidates:
            p = state.partition
            idle = now - self.last_click_at[p] > idle_partition_s
            watermark = self.watermarks.get(p)
            if idle or (watermark is not None and is_expired(state, watermark, inactivity_s)):
                out.append((key, p))
        return out

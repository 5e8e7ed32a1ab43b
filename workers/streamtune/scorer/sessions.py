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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, MutableMapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from streamtune.core.decode import Decoded, Source
from streamtune.core.events import ClickEvent
from streamtune.core.features import SessionState, apply_click, is_expired

# The context one table write runs in, given the source of the click it comes from.
Attribute = Callable[[Source], AbstractContextManager[Any]]


def _unattributed(_: Source) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


class SessionStore:
    """The session-state logic over ``table``, a mapping of session id to stored JSON."""

    def __init__(self, table: MutableMapping[str, Any]) -> None:
        self.table = table

    def state(self, session_id: str) -> SessionState | None:
        """The stored state of a session, or None when it has none."""
        raw = self.table.get(session_id)
        return SessionState.model_validate(raw) if raw else None

    def apply(
        self, decoded: Sequence[Decoded[ClickEvent]], attribute: Attribute = _unattributed
    ) -> list[SessionState]:
        """Apply clicks in order and return each click's session state after it.

        A click at or below its session's last applied offset (a re-delivery) is not applied and
        not written: its entry is the stored state, unchanged. Each write runs inside
        ``attribute(source of the click)``.
        """
        states = []
        for d in decoded:
            sid = d.event.session_id
            new, applied = apply_click(self.state(sid), d.event, d.source.partition, d.source.offset)
            if applied:
                with attribute(d.source):
                    self.table[sid] = new.model_dump(mode="json")
            states.append(new)
        return states

    def expired(self, owned: Collection[int], now: float, inactivity_s: float) -> list[tuple[str, int]]:
        """Sessions of the partitions in ``owned`` idle longer than ``inactivity_s`` at ``now``
        (epoch seconds; see :func:`~streamtune.core.features.is_expired`), as (session id,
        changelog partition). Nothing is removed here: the caller removes them."""
        out = []
        for key, raw in list(self.table.items()):
            state = SessionState.model_validate(raw)
            if state.partition in owned and is_expired(state, now, inactivity_s):
                out.append((key, state.partition))
        return out

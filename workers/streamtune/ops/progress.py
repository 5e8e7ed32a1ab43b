"""Which input partitions have stopped moving: the stall decision behind ``/readyz``.

A scorer can be alive and connected while one of its partitions makes no headway: a batch that
fails on every attempt, a step that never returns, a consumer that stopped fetching. Consumer
lag alone does not tell that apart from a scorer that is merely busy, so this watches progress:
a partition is *stalled* when it has had records waiting (lag > 0) at every observation, and
its done offset has not advanced, for ``after_s`` seconds.

The done offset is the group's committed offset (what Faust committed after the batch's
writes were flushed, i.e. where a new owner would resume) when it is known. Only for a partition
the group never committed does the consumer's position stand in; that one runs ahead of what is
done (prefetch) and goes back on every rewind of a failing batch, so progress is counted only
when the offset passes the highest one seen: a rewound batch read up to the same point again
is no progress.

Pure, no clock of its own and no Kafka: the scorer's health timer feeds it the positions and
high-water marks it reads anyway (``scorer/app.py``), and tests feed it plain numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

TopicPartition = tuple[str, int]  # Faust's TP is a named tuple of these two

SHOWN = 5  # partitions named in a readiness reason; the rest are counted


@dataclass
class _Watched:
    mark: int  # the highest done offset seen (position, until a committed offset is known)
    committed: bool  # whether ``mark`` is a committed offset
    since: float  # when the partition last progressed, caught up, or was first seen
    lag: int  # at the last observation


@dataclass(frozen=True)
class Stall:
    tp: TopicPartition
    for_s: float  # without progress, with lag throughout
    lag: int  # records waiting at the last observation


class ProgressWatch:
    """Progress per partition; ``observe`` each one now and then, ask ``stalled``."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._parts: dict[TopicPartition, _Watched] = {}

    def observe(
        self,
        tp: TopicPartition,
        position: int,
        highwater: int,
        now: float,
        *,
        committed: int | None = None,
    ) -> None:
        """One look at ``tp``: the consumer's ``position``, the partition's ``highwater`` (the
        offset the next record will get) and, when known, the group's ``committed`` offset,
        which is preferred (see the module docstring)."""
        mark = position if committed is None else committed
        lag = max(0, highwater - mark)
        seen = self._parts.get(tp)
        if seen is None:
            self._parts[tp] = _Watched(mark, committed is not None, now, lag)
            return
        first_commit = committed is not None and not seen.committed  # work was done meanwhile
        if first_commit or mark > seen.mark or lag == 0:
            seen.since = now  # progress, or nothing waiting: the clock starts again
        if first_commit or mark > seen.mark:
            seen.mark = mark
        seen.committed = seen.committed or committed is not None
        seen.lag = lag

    def keep_only(self, assigned: Iterable[TopicPartition]) -> None:
        """Forget every partition not in ``assigned`` (revoked from this worker): its stall,
        if any, is its new owner's to report, and a later assignment starts a fresh clock."""
        keep = set(assigned)
        for tp in [tp for tp in self._parts if tp not in keep]:
            del self._parts[tp]

    def stalled(self, now: float) -> list[Stall]:
        """Partitions with lag and no progress for at least ``after_s``, longest first."""
        found = [
            Stall(tp, now - w.since, w.lag)
            for tp, w in self._parts.items()
            if w.lag > 0 and now - w.since >= self.after_s
        ]
        return sorted(found, key=lambda s: (-s.for_s, s.tp))


def stall_reason(stalls: list[Stall]) -> str | None:
    """The readiness reason for ``stalls`` (None: none), e.g.
    ``stalled: events.click[1] for 130 s (lag 52)``."""
    if not stalls:
        return None
    named = ", ".join(f"{s.tp[0]}[{s.tp[1]}] for {s.for_s:.0f} s (lag {s.lag})" for s in stalls[:SHOWN])
    more = f" and {len(stalls) - SHOWN} more" if len(stalls) > SHOWN else ""
    return f"stalled: {named}{more}"

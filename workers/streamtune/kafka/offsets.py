"""Offset continuity: no input record is skipped, and no commit passes a record never processed.

Our input topics are written without transactions and never compacted, so the offsets of a
partition are contiguous: a record after offset ``n`` is ``n + 1``. faust-streaming can break
that around recovery and rebalances: records prefetched before a seek are still handed out
after it, the records re-fetched from the seek position are then dropped as "already read",
and Faust's gap bookkeeping (meant for compacted or transactional topics) marks the skipped
offsets as done, so the next commit moves past records nobody processed (seen here after a
SIGKILL and restart; upstream reports: faust-streaming/faust#216, #221, #606).

Two defences, both needed:

* :func:`streamtune.kafka.compat.disable_gap_filling` turns the gap bookkeeping off, so a
  commit never goes past the lowest offset not yet acknowledged. (Consequence, documented in
  docs/delivery.md: input topics must not be written by transactional producers, whose commit
  markers take offsets.)
* :class:`OffsetGuard` watches the offsets each agent receives; when one jumps forward it
  names the offset to seek back to, and the agent seeks there. A record delivered again
  after it was processed (Faust re-seeks to the committed offset around rebalances) is
  acknowledged without being processed twice.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

TopicPartition = tuple[str, int]


TAKE = "take"  # process it
DONE = "done"  # processed before in this assignment: acknowledge it again, do not redo it
# Delivered again while its first delivery is still being processed (batches overlap): neither
# process nor acknowledge this copy; the first one's acknowledgement covers the offset.
IN_PROGRESS = "in_progress"


class OffsetGuard:
    """Next expected offset per partition; says where to seek when records were skipped, and
    which redelivered records were already processed.

    ``committed`` gives the offset a partition resumes from after an assignment (or None when
    unknown); it is asked the first time a partition is seen after :meth:`reset`."""

    def __init__(
        self,
        committed: Callable[[TopicPartition], int | None] = lambda tp: None,
        track_in_progress: bool = False,
    ) -> None:
        """``track_in_progress``: the caller reports every taken record back (:meth:`mark_done`
        or :meth:`rewind`), so a copy delivered while the first is in progress can be told
        apart (:data:`IN_PROGRESS`); callers that do not report back leave it off."""
        self._committed = committed
        self._track = track_in_progress
        self._next: dict[TopicPartition, int] = {}
        self._done: dict[TopicPartition, list[tuple[int, int]]] = {}
        self._taken: dict[TopicPartition, set[int]] = {}  # taken, neither done nor rewound yet

    def reset(self) -> None:
        """Forget what was delivered (partitions were revoked: the next owner resumes from the
        commits). What was processed stays known: if a commit was lost in the rebalance and a
        processed record comes back to us, it is still not processed twice."""
        self._next.clear()

    def observe(self, tp: TopicPartition, offset: int) -> int | str:
        """Record one delivered offset: :data:`TAKE`, :data:`DONE`, or (records before this one
        were skipped) the offset to seek back to."""
        if tp not in self._next:
            start = self._committed(tp)
            if start is not None:
                self._next[tp] = start
        expected = self._next.get(tp)
        if expected is not None and offset > expected:
            return expected  # keep expecting it until it arrives
        if expected is None or offset == expected:
            self._next[tp] = offset + 1
        if self._processed(tp, offset):
            return DONE
        if self._track:
            taken = self._taken.setdefault(tp, set())
            if offset in taken:
                return IN_PROGRESS
            taken.add(offset)
        return TAKE

    def start(self, tp: TopicPartition, offset: int) -> None:
        """Where ``tp`` resumes after an assignment (the group's commit, else the log start), when
        known before its first record; takes precedence over ``committed``."""
        if tp not in self._next:
            self._next[tp] = offset

    def rewind(self, tp: TopicPartition, offset: int) -> None:
        """Expect ``offset`` next again (its batch failed and is taken again after a seek); the
        offsets from there on are no longer taken."""
        expected = self._next.get(tp)
        if expected is None or offset < expected:
            self._next[tp] = offset
        if taken := self._taken.get(tp):
            self._taken[tp] = {o for o in taken if o < offset}

    def mark_done(self, tp: TopicPartition, offset: int) -> None:
        """The record at ``offset`` was processed and its writes flushed. Kept as ranges
        ``[start, end)``: normally one per partition, more only around skips."""
        self._taken.get(tp, set()).discard(offset)
        ranges = self._done.setdefault(tp, [])
        i = bisect.bisect_right(ranges, (offset, offset + 1))
        if i > 0 and ranges[i - 1][0] <= offset < ranges[i - 1][1]:
            return
        start, end = offset, offset + 1
        if i > 0 and ranges[i - 1][1] == offset:
            i -= 1
            start = ranges[i][0]
            del ranges[i]
        if i < len(ranges) and ranges[i][0] == end:
            end = ranges[i][1]
            del ranges[i]
        ranges.insert(i, (start, end))

    def _processed(self, tp: TopicPartition, offset: int) -> bool:
        ranges = self._done.get(tp, [])
        i = bisect.bisect_right(ranges, (offset, float("inf")))
        return i > 0 and ranges[i - 1][0] <= offset < ranges[i - 1][1]

    def expected(self, tp: TopicPartition) -> int | None:
        return self._next.get(tp)

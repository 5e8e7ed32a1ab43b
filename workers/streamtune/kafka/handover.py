"""Clean hand-over on a rebalance and a draining stop on SIGTERM: what a scorer has started it
finishes and commits before anyone else takes the partition (nothing lost, nothing scored twice)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import faust
import structlog

from streamtune.kafka import compat
from streamtune.scorer.gate import BatchGate

log = structlog.get_logger(__name__)


async def commit_now(app: faust.App, timeout_s: float) -> bool:
    """Commit every acknowledged offset now, within ``timeout_s`` (False: it did not finish).
    ``Consumer.commit`` returns without committing when another commit is in flight (it waits
    for that one, which may predate our last acks), so wait for it first, then commit ours."""

    async def both() -> bool:
        first = await app.consumer.commit()
        return await compat.force_commit(app) or first

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
    comes by (:func:`streamtune.kafka.compat.run_before`)."""

    async def finish_then_commit(revoked: Any) -> None:
        if app.consumer.assignment():
            started = time.monotonic()
            finished = await gate.close(timeout_s)
            committed = await commit_now(app, max(1.0, timeout_s - (time.monotonic() - started)))
            log.info("handover", finished=finished, committed=committed, revoked=len(revoked))

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _wrap(app: faust.App, revoked: Any, **_: Any) -> None:
        compat.run_before(app, "on_partitions_revoked", finish_then_commit, marker="handover")

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

"""Every workaround for faust-streaming, mode and aiokafka, in one place.

This is the only module that touches a private member of those libraries (or replaces a method
on one of their instances). Each workaround is listed, with the upstream issue it answers and the
test that proves it, in ``docs/faust-workarounds.md``. ``tests/unit/test_faust_compat.py`` pins
the versions this was written for and checks that every member touched here still exists with
the expected kind, so an upgrade that renames one fails in seconds instead of silently turning
a workaround off.

Installed through one call, :func:`install`, from :func:`streamtune.kafka.app.worker_app`.
"""

from __future__ import annotations

import contextlib
import signal
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Literal

import faust
import structlog
from faust.streams import _current_event
from faust.transport.drivers import aiokafka as faust_aiokafka

log = structlog.get_logger(__name__)

# The versions this module was written against (checked by the contract test).
WRITTEN_FOR = {"faust-streaming": "0.15.3", "mode-streaming": "0.7.1", "aiokafka": "0.14.0"}

# What this module touches, by owner: (attribute, kind). Kinds: "method", "coroutine",
# "instance" (set in __init__), "contextvar". The contract test walks this table.
TOUCHED: dict[str, list[tuple[str, str]]] = {
    "faust.transport.drivers.aiokafka.Producer": [("_settings_extra", "method")],
    "faust.transport.consumer.Consumer": [
        ("_add_gap", "coroutine"),
        ("_unacked_messages", "instance"),
        ("_committed_offset", "instance"),
        ("on_partitions_assigned", "coroutine"),
        ("on_partitions_revoked", "coroutine"),
        ("force_commit", "coroutine"),
        ("_read_offset", "instance"),
        ("_paused_partitions", "instance"),
        ("_buffered_partitions", "instance"),
        ("_active_partitions", "instance"),
    ],
    "mode.worker.Worker": [("_stop_on_signal", "coroutine")],
    "faust.streams": [("_current_event", "contextvar")],
}


# --- 1. idempotent producer ------------------------------------------------------------------


class IdempotentProducer(faust_aiokafka.Producer):
    """Faust's aiokafka producer, idempotent always. Faust asks for idempotence only in
    exactly-once mode, so a send retried after a timeout or a leader change could land twice on
    an output topic; with idempotence the broker drops the repeat."""

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class IdempotentTransport(faust_aiokafka.Transport):
    """The aiokafka transport with :class:`IdempotentProducer`."""

    Producer = IdempotentProducer


# --- 2. no gap filling -----------------------------------------------------------------------


async def _no_gap(tp: Any, offset_from: int, offset_to: int) -> None:
    """Replacement for ``Consumer._add_gap``: a gap is never treated as processed."""


def disable_gap_filling(consumer: Any) -> None:
    """Stop Faust from committing past offsets it believes are missing (see
    :mod:`streamtune.kafka.offsets`). Set on the consumer instance, because Faust builds its
    consumer class itself."""
    consumer._add_gap = _no_gap


# --- 3. records left for later ---------------------------------------------------------------


def leave_pending(app: faust.App, message: Any) -> None:
    """Neither process nor acknowledge ``message``: its offset is never committed, so it comes
    again (to us after a seek, or to the partition's next owner). Pinned so the stream's own
    clean-up cannot acknowledge it, and untracked so Faust's stop and rebalance, which wait
    for every tracked message to be acknowledged, do not wait for it."""
    message.incref()
    app.consumer._unacked_messages.discard(message)  # type: ignore[attr-defined]


def committed_offset(app: faust.App, tp: Any) -> int | None:
    """The offset Faust last committed (or read as committed) for ``tp``, from its cache."""
    value = app.consumer._committed_offset.get(tp)  # type: ignore[attr-defined]
    return None if value is None else int(value)


async def force_commit(app: faust.App) -> bool:
    """``Consumer.force_commit``: commit now, even while another commit is in flight."""
    return bool(await app.consumer.force_commit())  # type: ignore[attr-defined]


def fetch_state(app: faust.App, tp: Any) -> dict[str, Any]:
    """What Faust's consumer holds about ``tp``'s fetching, for the log line of a stalled
    partition (:meth:`streamtune.kafka.guard.SkipGuard.nudge`): its read offset (records below
    it are dropped as already read), whether it is paused, buffered (its stream queue is full)
    or active (fetched), and whether the flow is on."""
    consumer: Any = app.consumer
    active = consumer._active_partitions
    return {
        "read_offset": consumer._read_offset.get(tp),
        "paused": tp in consumer._paused_partitions,
        "buffered": tp in consumer._buffered_partitions,
        "active": None if active is None else tp in active,
        "flow_active": bool(getattr(consumer, "flow_active", True)),
    }


# --- 4. our code before Faust's rebalance handlers -------------------------------------------


RebalanceHandler = Literal["on_partitions_assigned", "on_partitions_revoked"]


def run_before(
    app: faust.App, handler: RebalanceHandler, before: Callable[[Any], Awaitable[None]], marker: str
) -> None:
    """Run ``before(partitions)`` ahead of the consumer's own rebalance ``handler``, wrapped on
    the consumer instance (Faust builds its consumer class itself). Faust's handler always runs
    afterwards, with the arguments it was called with, also when ``before`` raises: the exception
    is logged as ``<marker>_failed``. Installed once per consumer (``marker`` names the workaround
    and the flag ``_streamtune_<marker>`` set on the consumer); call it from the first revocation
    signal, which comes before any record of the first join.

    Why each handler needs our code first:

    * ``on_partitions_assigned`` recovers the tables and starts fetching, so whatever must be
      known before a record of the assignment is handed out goes before it. It must run whatever
      ``before`` does: without it the assignment is never fetched, silently (aiokafka only logs).
    * ``on_partitions_revoked`` throws away the acknowledgements not yet committed
      (``Consumer.on_partitions_revoked`` drops ``_acked`` for every revoked partition; with the
      eager protocol that is all of them) before it waits for streams, so batches in progress
      must be finished and committed before it runs."""
    consumer: Any = app.consumer
    flag = f"_streamtune_{marker}"
    if getattr(consumer, flag, False):
        return
    original = getattr(consumer, handler)

    async def wrapped(partitions: Any, *rest: Any) -> None:
        try:
            await before(partitions)
        except Exception:  # Faust's own handler must run whatever happened here
            log.exception(f"{marker}_failed")
        await original(partitions, *rest)

    setattr(consumer, handler, wrapped)
    setattr(consumer, flag, True)


# --- 5. table writes attributed to an event --------------------------------------------------


@contextlib.contextmanager
def attributed_to(event: Any) -> Iterator[None]:
    """Table writes inside this block belong to ``event``: Faust sends their changelog records
    to that event's partition (co-partitioning). Faust finds "the current event" in a context
    variable that only its own stream iteration sets; batches taken with ``take_events`` are
    processed after that iteration moved on, so it is set here for each write."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


# --- 6. SIGTERM drains first -----------------------------------------------------------------


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


# --- installation ----------------------------------------------------------------------------


def install(app: faust.App) -> None:
    """Apply the workarounds every worker needs: the idempotent producer (Faust's own producer
    for results, dead letters and changelogs comes from the consumer transport) and no gap
    filling, re-applied on every rebalance signal (before any record is fetched: the first join
    revokes the empty assignment first). The scorer adds the rebalance hand-over
    (:mod:`streamtune.kafka.handover`) and the offset guard (:mod:`streamtune.kafka.guard`)."""
    app.transport = IdempotentTransport(app.conf.broker_consumer, app)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _no_gap_on_revoke(app: faust.App, revoked: Any, **_: Any) -> None:
        disable_gap_filling(app.consumer)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _no_gap_on_assign(app: faust.App, assigned: Any, **_: Any) -> None:
        disable_gap_filling(app.consumer)

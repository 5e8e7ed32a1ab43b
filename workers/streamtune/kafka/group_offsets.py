"""Where a consumer group resumes each partition, asked of the broker itself.

The offset guard (:mod:`streamtune.kafka.offsets`) needs, for every partition it sees first after an
assignment, the offset the group resumes from: the group's committed offset, or the log start
when the group never committed there. Faust's cached commits cannot say that: it maps a commit
of 0 to "none", and a partition it has no commit for may have been read past already (records
fetched before a rebalance are thrown away with the stream's buffer while the consumer's
position stays after them, so the first record delivered afterwards is not the first one).

The lookup uses its own kafka-python client on a thread of its own, never Faust's consumer
thread (a call queued there behind a rebalance can wait on the agent that is waiting for it).
It runs once per assignment, inside the rebalance and before Faust hands out any record of it
(:class:`streamtune.kafka.guard.SkipGuard`), never on an agent's path; the rebalance waits for
it, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import structlog
from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import OffsetSpec

from streamtune.core.errors import StreamtuneError
from streamtune.core.settings import Settings
from streamtune.kafka.security import kafka_client_kwargs

log = structlog.get_logger(__name__)

TP = tuple[str, int]


class GroupOffsetsError(StreamtuneError):
    """The broker did not say where the group resumes (unreachable, timed out)."""


class GroupStartOffsets:
    """``starts(tps)``: for each partition, the group's committed offset, else the log start.

    Every lookup is self-contained: its own client, on its own daemon thread, closed when it
    ends. A lookup that outlasts ``timeout_s`` is abandoned whole; nothing it holds is shared
    with the next one, and a thread stuck in the client never delays the process's exit."""

    def __init__(self, settings: Settings, group_id: str, timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.group_id = group_id
        self.timeout_s = timeout_s

    def starts_sync(self, tps: set[TP]) -> dict[TP, int]:
        admin: KafkaAdminClient | None = None
        try:
            ms = int(self.timeout_s * 1000)
            admin = KafkaAdminClient(
                **kafka_client_kwargs(self.settings),
                client_id="streamtune-group-offsets",
                request_timeout_ms=ms,
                bootstrap_timeout_ms=ms,
            )
            parts = [TopicPartition(t, p) for t, p in sorted(tps)]
            committed = admin.list_group_offsets({self.group_id: parts}).get(self.group_id, {})
            # The log start too: retention may have deleted records past an old commit, and the
            # consumer then resumes from the log start (seeking to the commit would loop).
            earliest = admin.list_partition_offsets(dict.fromkeys(parts, OffsetSpec.EARLIEST))
            out: dict[TP, int] = {}
            for tp in parts:
                start = earliest[tp].offset
                meta = committed.get(tp)
                if meta is not None and meta.offset >= 0:
                    start = max(start, meta.offset)
                out[(tp.topic, tp.partition)] = start
            return out
        except Exception as e:  # kafka-python raises more than KafkaError (RuntimeError, OSError...)
            raise GroupOffsetsError(f"group {self.group_id}: resume offsets of {sorted(tps)}: {e}") from e
        finally:
            if admin is not None:
                _close_quietly(admin)

    async def starts(self, tps: set[TP]) -> dict[TP, int]:
        """The lookup on a thread of its own, bounded by ``timeout_s``."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[dict[TP, int]] = loop.create_future()

        def settle(result: dict[TP, int] | None, error: BaseException | None) -> None:
            if answer.done():  # the caller gave up (timed out, cancelled)
                return
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(result or {})

        def run() -> None:
            try:
                result, error = self.starts_sync(tps), None
            except BaseException as e:  # handed to the awaiting side, whatever it is
                result, error = None, e
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=run, name="group-offsets", daemon=True).start()
        try:
            return await asyncio.wait_for(answer, self.timeout_s)
        except TimeoutError as e:
            raise GroupOffsetsError(
                f"group {self.group_id}: resume offsets of {sorted(tps)}: no answer in {self.timeout_s:g} s"
            ) from e


def _close_quietly(admin: KafkaAdminClient) -> None:
    try:
        admin.close()
    except Exception:  # closing a broken client must not mask the error being handled
        log.debug("group_offsets_close_failed", exc_info=True)

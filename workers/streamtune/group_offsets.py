"""Where a consumer group resumes each partition, asked of the broker itself.

The offset guard (:mod:`streamtune.offsets`) needs, for every partition it sees first after an
assignment, the offset the group resumes from: the group's committed offset, or the log start
when the group never committed there. Faust's cached commits cannot say that: it maps a commit
of 0 to "none", and a partition it has no commit for may have been read past already (records
fetched before a rebalance are thrown away with the stream's buffer while the consumer's
position stays after them, so the first record delivered afterwards is not the first one).

The lookup uses its own kafka-python clients on one dedicated thread, never Faust's consumer
thread: a call queued there behind a rebalance can wait on the agent that is waiting for it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import structlog
from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import OffsetSpec

from streamtune.errors import StreamtuneError
from streamtune.security import kafka_client_kwargs
from streamtune.settings import Settings

log = structlog.get_logger(__name__)

TP = tuple[str, int]


class GroupOffsetsError(StreamtuneError):
    """The broker did not say where the group resumes (unreachable, timed out)."""


class GroupStartOffsets:
    """``starts(tps)``: for each partition, the group's committed offset, else the log start."""

    def __init__(self, settings: Settings, group_id: str, timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.group_id = group_id
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="group-offsets")
        self._admin: KafkaAdminClient | None = None

    def _client(self) -> KafkaAdminClient:
        if self._admin is None:
            ms = int(self.timeout_s * 1000)
            self._admin = KafkaAdminClient(
                **kafka_client_kwargs(self.settings),
                client_id="streamtune-group-offsets",
                request_timeout_ms=ms,
                bootstrap_timeout_ms=ms,
            )
        return self._admin

    def starts_sync(self, tps: set[TP]) -> dict[TP, int]:
        try:
            admin = self._client()
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
            self._close_client()  # a fresh connection next time
            raise GroupOffsetsError(f"group {self.group_id}: resume offsets of {sorted(tps)}: {e}") from e

    async def starts(self, tps: set[TP]) -> dict[TP, int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.starts_sync, tps)

    def _close_client(self) -> None:
        if self._admin is not None:
            try:
                self._admin.close()
            except Exception:  # closing a broken client must not mask the error being handled
                log.debug("group_offsets_close_failed", exc_info=True)
        self._admin = None

    def close(self) -> None:
        """Close the client on its thread; a lookup still running is abandoned, not waited for."""
        try:
            self._pool.submit(self._close_client).result(timeout=self.timeout_s)
        except Exception:  # stopping must go on whatever happened here
            log.warning("group_offsets_close_failed", exc_info=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

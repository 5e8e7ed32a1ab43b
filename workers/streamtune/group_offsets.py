"""Where a consumer group resumes each partition, asked of the broker itself.

The offset guard (:mod:`streamtune.offsets`) needs, for every partition it sees first after an
assignment, the offset the group resumes from: the group's committed offset, or the log start
when the group never committed there. Faust's cached commits cannot say that: it maps a commit
of 0 to "none", and a partition it has no commit for may have been read past already (records
fetched before a rebalance are thrown away with the stream's buffer while the consumer's
position stays after them, so the first record delivered afterwards is not the first one).

The lookup uses its own kafka-python clients on one dedicated thread, never Faust's consumer
thread: a call queued there behind a rebalance can wait on the agent that is waiting for it.
It runs once per assignment, inside the rebalance and before Faust hands out any record of it
(:class:`streamtune.faust_app.SkipGuard`), never on an agent's path.
"""

from __future__ import annotations

import asyncio
import threading
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
        self._pool: ThreadPoolExecutor | None = None
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
        """The lookup on this object's own thread, bounded by ``timeout_s``. A lookup that
        outlasts it is abandoned with its thread and client (a wedged client must not hold up
        the next lookup); the next call starts afresh."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="group-offsets")
        pool = self._pool
        call = asyncio.get_running_loop().run_in_executor(pool, self.starts_sync, tps)
        try:
            return await asyncio.wait_for(call, self.timeout_s)
        except TimeoutError as e:
            if self._pool is pool:
                self._pool, admin, self._admin = None, self._admin, None
                pool.shutdown(wait=False, cancel_futures=True)
                if admin is not None:  # closed off the loop: close() joins the client's IO thread
                    threading.Thread(target=_close_quietly, args=(admin,), daemon=True).start()
            raise GroupOffsetsError(
                f"group {self.group_id}: resume offsets of {sorted(tps)}: no answer in {self.timeout_s:g} s"
            ) from e

    def _close_client(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            _close_quietly(admin)

    def close(self) -> None:
        """Close the client on its thread; a lookup still running is abandoned, not waited for."""
        pool, self._pool = self._pool, None
        if pool is None:
            self._close_client()
            return
        try:
            pool.submit(self._close_client).result(timeout=self.timeout_s)
        except Exception:  # stopping must go on whatever happened here
            log.warning("group_offsets_close_failed", exc_info=True)
        pool.shutdown(wait=False, cancel_futures=True)


def _close_quietly(admin: KafkaAdminClient) -> None:
    try:
        admin.close()
    except Exception:  # closing a broken client must not mask the error being handled
        log.debug("group_offsets_close_failed", exc_info=True)

"""Redis sink: one pipeline per batch, idempotent aggregates, retry with back-off.

Keys (``{}`` are placeholders)::

    streamtune:score:{task}:{event_id}   JSON score record, TTL ``score_ttl_s``
    streamtune:product:{<product_id>}    hash: reviews, reviews_<sentiment>, mean_positive_probability
    streamtune:product:{<product_id>}:scored  hash event_id -> "label|p": what each review contributed
    streamtune:session:{session_id}      hash: page_views, purchase_probability, adapter_version, ...

The product id sits in literal braces: a Redis Cluster hash tag, so a product's view and its
ledger, which one script updates together, live in one slot.

The product view is updated by a Lua script that first looks up what the event contributed
before; a re-scored event replaces its contribution instead of adding a second one, so a
replay after a crash never counts an event twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio as aioredis
import structlog
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamtune.core.encode import ProductUpdate, Result, SessionUpdate
from streamtune.core.errors import SinkError

# Transient: the server or cluster is away, loading, failing over or resharding.
RETRIABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    BusyLoadingError,
    ClusterDownError,
    TryAgainError,
    MasterDownError,
    ReadOnlyError,
    RedisClusterException,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")

PREFIX = "streamtune"

PRODUCT_SCRIPT = """
local prev = redis.call('HGET', KEYS[2], ARGV[1])
local new = ARGV[2] .. '|' .. ARGV[3]
if prev == new then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'reviews', 0, 'reviews_negative', 0, 'reviews_neutral', 0,
             'reviews_positive', 0, 'positive_probability_sum', 0)
end
if prev then
  local sep = string.find(prev, '|', 1, true)
  redis.call('HINCRBY', KEYS[1], 'reviews_' .. string.sub(prev, 1, sep - 1), -1)
  redis.call('HINCRBY', KEYS[1], 'reviews', -1)
  redis.call('HINCRBYFLOAT', KEYS[1], 'positive_probability_sum', -tonumber(string.sub(prev, sep + 1)))
end
redis.call('HSET', KEYS[2], ARGV[1], new)
redis.call('HINCRBY', KEYS[1], 'reviews_' .. ARGV[2], 1)
local n = redis.call('HINCRBY', KEYS[1], 'reviews', 1)
local s = tonumber(redis.call('HINCRBYFLOAT', KEYS[1], 'positive_probability_sum', ARGV[3]))
redis.call('HSET', KEYS[1], 'mean_positive_probability', string.format('%.6f', s / n), 'updated_at', ARGV[4])
if prev then return 2 end
return 1
"""


def score_key(task: str, event_id: str) -> str:
    return f"{PREFIX}:score:{task}:{event_id}"


def product_key(product_id: str) -> str:
    return f"{PREFIX}:product:{{{product_id}}}"


def product_ledger_key(product_id: str) -> str:
    return f"{PREFIX}:product:{{{product_id}}}:scored"


def session_key(session_id: str) -> str:
    return f"{PREFIX}:session:{session_id}"


class RedisSink:
    def __init__(
        self,
        client: aioredis.Redis,
        score_ttl_s: int,
        session_ttl_s: int,
        retry_max_s: float = 5.0,
        on_retry: Callable[[], None] | None = None,
        cluster: bool = False,
    ) -> None:
        self.client = client
        self.score_ttl_s = score_ttl_s
        self.session_ttl_s = session_ttl_s
        self.retry_max_s = retry_max_s
        self.on_retry = on_retry
        self._product = client.register_script(PRODUCT_SCRIPT)
        self.cluster = cluster

    async def write(self, results: Sequence[Result], now_iso: str) -> None:
        """Write a batch in one pipeline; returns only once Redis acknowledged all of it."""
        if not results:
            return
        await self._retry(lambda: self._write_once(results, now_iso))

    async def _write_once(self, results: Sequence[Result], now_iso: str) -> None:
        scripts: list[tuple[list[str], list[str]]] = []
        async with self.client.pipeline(transaction=False) as pipe:
            for r in results:
                pipe.set(score_key(r.task, r.event_id), r.payload(), ex=self.score_ttl_s)
                agg = r.aggregate
                if isinstance(agg, ProductUpdate):
                    keys = [product_key(agg.product_id), product_ledger_key(agg.product_id)]
                    args = [agg.event_id, agg.label, repr(agg.positive_probability), now_iso]
                    if self.cluster:  # cluster pipelines refuse scripts: run them beside it
                        scripts.append((keys, args))
                    else:
                        await self._product(keys=keys, args=args, client=pipe)
                elif isinstance(agg, SessionUpdate):
                    key = session_key(agg.session_id)
                    pipe.hset(
                        key,
                        mapping={
                            "page_views": agg.page_views,
                            "purchase_probability": agg.purchase_probability,
                            "last_event_id": agg.event_id,
                            "adapter_version": agg.version,
                            "updated_at": now_iso,
                        },
                    )
                    pipe.expire(key, self.session_ttl_s)
            await pipe.execute()
        if scripts:
            await asyncio.gather(*(self._product(keys=k, args=a) for k, a in scripts))

    async def _retry(self, op: Callable[[], Awaitable[T]]) -> T:
        """Retry connection-level failures forever with capped exponential back-off.

        The batch is not acknowledged meanwhile, so its offsets are not committed: the
        scorer pauses instead of skipping events. Other Redis errors are bugs: raise.
        """
        delay = 0.05
        while True:
            try:
                return await op()
            except RETRIABLE as e:
                if self.on_retry:
                    self.on_retry()
                log.warning("redis_unavailable", error=str(e), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
            except RedisError as e:
                raise SinkError(f"Redis write failed: {e}") from e

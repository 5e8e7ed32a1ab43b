"""Redis sink: one pipeline per batch, idempotent aggregates, retry with back-off.

Keys (``<...>`` are placeholders, the braces are literal)::

    streamtune:v2:score:<task>:{<tag(event_id)>}      JSON score record, TTL ``score_ttl_s``
    streamtune:v2:product:{<tag(product_id)>}         hash: product_id, reviews, reviews_<sentiment>,
                                                      mean_positive_probability, ...; TTL ``product_ttl_s``
    streamtune:v2:product:{<tag(product_id)>}:scored  hash event_id -> "label|p" or "label|p|terms":
                                                      what each review contributed (the ledger);
                                                      TTL ``product_ttl_s``
    streamtune:v2:product:{<tag(product_id)>}:negative_terms
                                                      hash term -> count over the product's negative
                                                      reviews' reasons; TTL ``product_ttl_s``
    streamtune:v2:session:{<tag(session_id)>}         hash: session_id, page_views, purchase_probability,
                                                      ...; TTL ``session_ttl_s``

``tag(id)`` is the first 32 hex digits of the SHA-256 of the id's UTF-8 bytes
(``product_key("1077") == "streamtune:v2:product:{bcce03f625c22998dcb812feb157db59}"``). Ids
are producers' data: a brace in one would move or empty the Redis Cluster hash tag (an id
starting with ``}`` gives the empty tag ``{}``, which Redis ignores), so a product's view and its
ledger, which one script updates together, would fall into two slots and the cluster client
would refuse the script. The digest has no braces, so the tag is always exactly it: view and
ledger share a slot on any id, keys are short printable ASCII whatever the id holds (newlines,
spaces, any script, 128 characters), and ids with a common ``{...}`` part cannot pile their
keys into one slot. The readable id is kept in the record itself: the ``product_id`` and
``session_id`` fields of the views, ``event_id`` in the score JSON. The ``v2`` segment keeps
these keys apart from the earlier ``streamtune:product:{<product_id>}`` ones, so old keys are
found by a pattern no new key matches (upgrading: docs/operations.md). Readers compute keys with
:func:`score_key`, :func:`product_key`, :func:`product_ledger_key`, :func:`product_terms_key`
and :func:`session_key`.

The product view is updated by a Lua script that first looks up what the event contributed
before; a re-scored event replaces its contribution instead of adding a second one, so a
replay after a crash never counts an event twice. The same script call sets the TTL of both the
view and its ledger to ``product_ttl_s``: they expire together, ``product_ttl_s`` after the
product's last scored review, so neither grows without bound and a view never outlives the
ledger that keeps it exact.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio as aioredis
import structlog
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    NoPermissionError,
    OutOfMemoryError,
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

# Refusing: Redis answers but refuses every write until an operator acts (memory full under
# noeviction, snapshots failing, a script running too long, ACLs or credentials). That is an
# outage too: pause and retry. Isolating records instead would dead-letter the whole stream.
REFUSING = (OutOfMemoryError, NoPermissionError, AuthenticationError, AuthorizationError)
REFUSING_PREFIXES = ("OOM", "MISCONF", "BUSY", "NOREPLICAS", "NOPERM", "LOADING")


def is_refusing(e: RedisError) -> bool:
    """A server-wide refusal (see ``REFUSING``), not something wrong with the batch."""
    return isinstance(e, REFUSING) or str(e).startswith(REFUSING_PREFIXES)


log = structlog.get_logger(__name__)
T = TypeVar("T")

PREFIX = "streamtune"
KEYSPACE = f"{PREFIX}:v2"  # the key format's version: see the module docstring
TAG_HEX_DIGITS = 32  # 128 bits of SHA-256: the tag alone names the entity, collisions are moot

# KEYS: view, ledger, terms. ARGV: event_id, label, positive probability, now, ttl_s, product_id,
# terms (tab-separated; the reasons of a negative review, else empty).
# Returns 0 (already counted as is), 1 (counted), 2 (replaced its earlier contribution).
# The ledger holds what each event contributed, "label|p" or "label|p|terms", so a re-scored
# event takes back exactly its earlier contribution, terms included, before adding its new one.
# Every key's type is checked before anything is written: a script that fails halfway keeps
# what it wrote, so a ledger entry written before a failing view update would make the retry
# see the event as counted and skip it (the view would silently miss it). Failing first makes
# the record fail the same way on every retry, and the scorer isolates it (stage ``sink``).
PRODUCT_SCRIPT = """
for i = 1, 3 do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= 'hash' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. t .. ', not a hash')
  end
end
local function terms(s, by)
  for term in string.gmatch(s, '[^\t]+') do
    if redis.call('HINCRBY', KEYS[3], term, by) <= 0 then redis.call('HDEL', KEYS[3], term) end
  end
end
local prev = redis.call('HGET', KEYS[2], ARGV[1])
local new = ARGV[2] .. '|' .. ARGV[3]
if ARGV[7] ~= '' then new = new .. '|' .. ARGV[7] end
if prev == new then
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'reviews', 0, 'reviews_negative', 0, 'reviews_neutral', 0,
             'reviews_positive', 0, 'positive_probability_sum', 0)
end
if prev then
  local sep = string.find(prev, '|', 1, true)
  local rest = string.sub(prev, sep + 1)
  local sep2 = string.find(rest, '|', 1, true)
  local p = rest
  if sep2 then
    p = string.sub(rest, 1, sep2 - 1)
    terms(string.sub(rest, sep2 + 1), -1)
  end
  redis.call('HINCRBY', KEYS[1], 'reviews_' .. string.sub(prev, 1, sep - 1), -1)
  redis.call('HINCRBY', KEYS[1], 'reviews', -1)
  redis.call('HINCRBYFLOAT', KEYS[1], 'positive_probability_sum', -tonumber(p))
end
redis.call('HSET', KEYS[2], ARGV[1], new)
terms(ARGV[7], 1)
redis.call('HINCRBY', KEYS[1], 'reviews_' .. ARGV[2], 1)
local n = redis.call('HINCRBY', KEYS[1], 'reviews', 1)
local s = tonumber(redis.call('HINCRBYFLOAT', KEYS[1], 'positive_probability_sum', ARGV[3]))
redis.call('HSET', KEYS[1], 'mean_positive_probability', string.format('%.6f', s / n), 'updated_at', ARGV[4],
           'product_id', ARGV[6])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
if prev then return 2 end
return 1
"""


def key_tag(entity_id: str) -> str:
    """The Redis Cluster hash tag of an id: a digest, so no brace in the id can reach the key."""
    return hashlib.sha256(entity_id.encode("utf-8")).hexdigest()[:TAG_HEX_DIGITS]


def score_key(task: str, event_id: str) -> str:
    return f"{KEYSPACE}:score:{task}:{{{key_tag(event_id)}}}"


def product_key(product_id: str) -> str:
    return f"{KEYSPACE}:product:{{{key_tag(product_id)}}}"


def product_ledger_key(product_id: str) -> str:
    """The product's ledger: the same hash tag as :func:`product_key`, so the same slot."""
    return f"{product_key(product_id)}:scored"


def product_terms_key(product_id: str) -> str:
    """Counts of the terms that explain the product's negative reviews (same slot as its view)."""
    return f"{product_key(product_id)}:negative_terms"


def session_key(session_id: str) -> str:
    return f"{KEYSPACE}:session:{{{key_tag(session_id)}}}"


class RedisSink:
    def __init__(
        self,
        client: aioredis.Redis,
        score_ttl_s: int,
        session_ttl_s: int,
        retry_max_s: float = 5.0,
        on_retry: Callable[[], None] | None = None,
        cluster: bool = False,
        product_ttl_s: int = 30 * 24 * 3600,
    ) -> None:
        self.client = client
        self.score_ttl_s = score_ttl_s
        self.session_ttl_s = session_ttl_s
        self.product_ttl_s = product_ttl_s
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
                    pid = agg.product_id
                    keys = [product_key(pid), product_ledger_key(pid), product_terms_key(pid)]
                    args = [
                        agg.event_id,
                        agg.label,
                        repr(agg.positive_probability),
                        now_iso,
                        str(self.product_ttl_s),
                        pid,
                        "\t".join(agg.terms),
                    ]
                    if self.cluster:  # cluster pipelines refuse scripts: run them beside it
                        scripts.append((keys, args))
                    else:
                        await self._product(keys=keys, args=args, client=pipe)
                elif isinstance(agg, SessionUpdate):
                    key = session_key(agg.session_id)
                    pipe.hset(
                        key,
                        mapping={
                            "session_id": agg.session_id,
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

    async def discard(self, task: str, event_id: str) -> None:
        """Delete a record's score key: a record isolated at the sink failed on its aggregate,
        but the same non-transactional pipeline may have written its score key, which would
        then be a result for a record that is in the dead-letter topic instead."""
        await self._retry(lambda: self.client.delete(score_key(task, event_id)))

    async def _retry(self, op: Callable[[], Awaitable[T]]) -> T:
        """Retry connection-level failures and server-wide refusals forever with capped
        exponential back-off.

        The batch is not acknowledged meanwhile, so its offsets are not committed: the
        scorer pauses instead of skipping events. Other Redis errors are about the batch
        (a key of the wrong type, a script error): raise, and the scorer isolates the record.
        """
        delay = 0.05
        while True:
            try:
                return await op()
            except RedisError as e:
                if not isinstance(e, RETRIABLE) and not is_refusing(e):
                    raise SinkError(f"Redis write failed: {e}") from e
                if self.on_retry:
                    self.on_retry()
                log.warning("redis_unavailable", error=str(e), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)

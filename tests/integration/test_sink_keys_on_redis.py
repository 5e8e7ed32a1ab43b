"""Hostile ids against the real Redis: the product script keeps exact aggregates for ids with
braces, colons, newlines, spaces, any script and 128 characters; the view and its ledger both
carry the product TTL, renewed by each review; a replayed or re-scored review is never counted
twice; and nothing the sink writes lives forever. Both write paths run: scripts inside the batch
pipeline (single Redis) and beside it (what the sink does on a Redis Cluster, where
tests/integration/test_redis_cluster.py runs it against three nodes)."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from streamtune.core.encode import Result
from streamtune.scorer.sink import RedisSink, product_key, product_ledger_key, score_key, session_key
from support.results import NOW, click, review

pytestmark = pytest.mark.integration

HOSTILE_IDS = [
    "}",  # the empty hash tag "{}" in the old keys: view and ledger in two slots
    "}{x}",
    "{}",
    "a{b}c",
    "p:1:scored",
    "with space",
    "new\nline",
    "ünïcødé 商品 🛒",
    "}{" * 64,  # 128 characters, the longest id a payload may carry
]
PRODUCT_TTL_S = 3000
Mode = Literal["pipeline", "beside", "cluster"]


async def write_async(
    url: str, results: list[Result], mode: Mode, product_ttl_s: int = PRODUCT_TTL_S
) -> None:
    """``pipeline``: scripts in the batch pipeline; ``beside``: scripts run beside it, as on a
    cluster, on a plain client; ``cluster``: a Redis Cluster client at ``url``."""
    client = RedisCluster.from_url(url) if mode == "cluster" else aioredis.from_url(url)
    try:
        sink = RedisSink(
            client,
            score_ttl_s=100,
            session_ttl_s=200,
            product_ttl_s=product_ttl_s,
            cluster=mode != "pipeline",
            retry_max_s=0.2,
        )
        # A refused script is retried for ever (the bug this guards against): bound the wait.
        await asyncio.wait_for(sink.write(results, NOW.isoformat()), 60)
    finally:
        await client.aclose()


def write(url: str, results: list[Result], mode: Mode, product_ttl_s: int = PRODUCT_TTL_S) -> None:
    asyncio.run(write_async(url, results, mode, product_ttl_s))


def two_reviews_each(ids: list[str]) -> list[Result]:
    batch = []
    for i, product_id in enumerate(ids):
        batch += [
            review(f"e{i}-a", product_id, "positive", 0.9),
            review(f"e{i}-b", product_id, "negative", 0.1),
        ]
    return batch


@pytest.mark.parametrize("mode", ["pipeline", "beside"])
def test_hostile_product_ids_count_each_review_once(redis_client: redis.Redis, stack, mode: Mode) -> None:  # type: ignore[no-untyped-def]
    batch = two_reviews_each(HOSTILE_IDS)
    write(stack.redis_url, batch, mode)
    write(stack.redis_url, batch, mode)  # a replay of the same batch
    rescored = [review(f"e{i}-a", p, "neutral", 0.4, version=2) for i, p in enumerate(HOSTILE_IDS)]
    write(stack.redis_url, rescored, mode)  # a re-scored review replaces its contribution

    for product_id in HOSTILE_IDS:
        view = redis_client.hgetall(product_key(product_id))
        assert view["product_id"] == product_id
        counts = {f: view[f] for f in ("reviews", "reviews_positive", "reviews_neutral", "reviews_negative")}
        assert counts == {
            "reviews": "2",
            "reviews_positive": "0",
            "reviews_neutral": "1",
            "reviews_negative": "1",
        }
        assert float(view["mean_positive_probability"]) == pytest.approx(0.25)
        assert redis_client.hlen(product_ledger_key(product_id)) == 2
        view_ttl = redis_client.ttl(product_key(product_id))
        ledger_ttl = redis_client.ttl(product_ledger_key(product_id))
        assert 0 < view_ttl <= PRODUCT_TTL_S and 0 < ledger_ttl <= PRODUCT_TTL_S, (view_ttl, ledger_ttl)
        assert abs(view_ttl - ledger_ttl) <= 1


def test_each_review_renews_the_ttl_of_view_and_ledger(redis_client: redis.Redis, stack) -> None:  # type: ignore[no-untyped-def]
    product_id = HOSTILE_IDS[0]
    write(stack.redis_url, [review("r1", product_id, "positive", 0.9)], "pipeline", product_ttl_s=1000)
    assert 0 < redis_client.ttl(product_ledger_key(product_id)) <= 1000
    write(stack.redis_url, [review("r2", product_id, "positive", 0.7)], "pipeline", product_ttl_s=50_000)
    assert redis_client.ttl(product_key(product_id)) > 1000
    assert redis_client.ttl(product_ledger_key(product_id)) > 1000


@pytest.mark.parametrize("mode", ["pipeline", "beside"])
def test_hostile_session_and_event_ids(redis_client: redis.Redis, stack, mode: Mode) -> None:  # type: ignore[no-untyped-def]
    clicks = [click(f"}}{i}{{", session_id, 3, 0.2) for i, session_id in enumerate(HOSTILE_IDS)]
    write(stack.redis_url, clicks, mode)
    for i, session_id in enumerate(HOSTILE_IDS):
        view = redis_client.hgetall(session_key(session_id))
        assert view["session_id"] == session_id and view["page_views"] == "3"
        assert 0 < redis_client.ttl(session_key(session_id)) <= 200
        record = json.loads(redis_client.get(score_key("purchase_intent", f"}}{i}{{")) or "null")
        assert record["session_id"] == session_id


def test_every_key_written_is_a_documented_one_with_a_ttl(redis_client: redis.Redis, stack) -> None:  # type: ignore[no-untyped-def]
    """No key outside the key functions, none without a TTL: nothing grows without bound."""
    reviews = two_reviews_each(HOSTILE_IDS)
    clicks = [click(f"c{i}", session_id, 1, 0.5) for i, session_id in enumerate(HOSTILE_IDS)]
    write(stack.redis_url, reviews + clicks, "pipeline")
    expected = {score_key(r.task, r.event_id) for r in reviews + clicks}
    expected |= {product_key(p) for p in HOSTILE_IDS} | {product_ledger_key(p) for p in HOSTILE_IDS}
    expected |= {session_key(s) for s in HOSTILE_IDS}
    written = set(redis_client.scan_iter("*"))
    assert written == expected
    assert all(redis_client.ttl(key) > 0 for key in written)

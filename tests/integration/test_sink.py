"""Redis sink against the real Redis: pipelined, idempotent aggregates."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis

from streamtune.core.encode import Result
from streamtune.scorer.isolation import is_transient
from streamtune.scorer.sink import (
    RedisSink,
    product_key,
    product_ledger_key,
    product_terms_key,
    score_key,
    session_key,
)
from support.results import NOW, click, review


def _write(url: str, results: list[Result]) -> None:
    async def go() -> None:
        client = aioredis.from_url(url)
        try:
            await RedisSink(client, score_ttl_s=100, session_ttl_s=100).write(results, NOW.isoformat())
        finally:
            await client.aclose()

    asyncio.run(go())


def test_product_view_counts_each_event_once(redis_client: redis.Redis, stack) -> None:  # type: ignore[no-untyped-def]
    batch = [review("e1", "p1", "positive", 0.9), review("e2", "p1", "negative", 0.1)]
    _write(stack.redis_url, batch)
    _write(stack.redis_url, batch)  # a replay of the same batch
    view = redis_client.hgetall(product_key("p1"))
    assert view["reviews"] == "2" and view["reviews_positive"] == "1" and view["reviews_negative"] == "1"
    assert float(view["mean_positive_probability"]) == 0.5
    assert redis_client.ttl(score_key("review_sentiment", "e1")) > 0


def test_rescoring_replaces_a_contribution(redis_client: redis.Redis, stack) -> None:  # type: ignore[no-untyped-def]
    _write(stack.redis_url, [review("e1", "p2", "positive", 0.8)])
    _write(stack.redis_url, [review("e1", "p2", "neutral", 0.4, version=2)])
    view = redis_client.hgetall(product_key("p2"))
    assert (view["reviews"], view["reviews_positive"], view["reviews_neutral"]) == ("1", "0", "1")
    assert float(view["mean_positive_probability"]) == 0.4


def _terms(r: redis.Redis, product: str) -> dict[str, int]:
    return {k: int(v) for k, v in r.hgetall(product_terms_key(product)).items()}


def test_negative_terms_are_counted_once_and_replaced_with_their_review(
    redis_client: redis.Redis, stack
) -> None:  # type: ignore[no-untyped-def]
    bad = [review("n1", "p3", "negative", 0.1, terms=("too small", "cheap")),
           review("n2", "p3", "negative", 0.2, terms=("cheap", "itchy"))]  # fmt: skip
    _write(stack.redis_url, bad)
    _write(stack.redis_url, bad)  # a replay counts nothing twice
    assert _terms(redis_client, "p3") == {"too small": 1, "cheap": 2, "itchy": 1}
    # n1 re-scored by another version: its old terms are taken back, its new ones counted
    _write(stack.redis_url, [review("n1", "p3", "negative", 0.15, version=2, terms=("seams",))])
    assert _terms(redis_client, "p3") == {"cheap": 1, "itchy": 1, "seams": 1}
    # n2 re-scored as neutral: a non-negative review adds no terms; counts at zero are removed
    _write(stack.redis_url, [review("n2", "p3", "neutral", 0.5, version=2)])
    assert _terms(redis_client, "p3") == {"seams": 1}
    assert redis_client.hgetall(product_key("p3"))["reviews_negative"] == "1"
    assert 0 < redis_client.ttl(product_terms_key("p3")) <= 30 * 24 * 3600


def test_a_ledger_entry_written_before_terms_existed_is_replaced_cleanly(
    redis_client: redis.Redis, stack
) -> None:  # type: ignore[no-untyped-def]
    _write(stack.redis_url, [review("o1", "p4", "negative", 0.1)])
    assert redis_client.hget(product_ledger_key("p4"), "o1") == "negative|0.1"  # the old format
    _write(stack.redis_url, [review("o1", "p4", "negative", 0.1, version=2, terms=("faded",))])
    assert _terms(redis_client, "p4") == {"faded": 1}
    view = redis_client.hgetall(product_key("p4"))
    assert view["reviews"] == "1" and float(view["mean_positive_probability"]) == 0.1


def test_session_view_holds_latest_values(redis_client: redis.Redis, stack) -> None:  # type: ignore[no-untyped-def]
    _write(stack.redis_url, [click("c1", "s1", 1, 0.1), click("c2", "s1", 2, 0.3)])
    _write(stack.redis_url, [click("c2", "s1", 2, 0.3)])
    view = redis_client.hgetall(session_key("s1"))
    assert view["page_views"] == "2" and float(view["purchase_probability"]) == 0.3
    assert 0 < redis_client.ttl(session_key("s1")) <= 100


def test_a_product_view_of_the_wrong_type_fails_every_time_and_writes_no_ledger_entry(
    redis_client: redis.Redis,
    stack,  # type: ignore[no-untyped-def]
) -> None:
    """Someone (or something) left a string where a product view belongs: the write must fail
    the same way on every retry (so the scorer isolates the record), never half-succeed and
    then pass on the retry with the event missing from the view."""
    redis_client.set(product_key("p-wrong"), "not a hash")
    for _ in range(2):
        try:
            _write(stack.redis_url, [review("e-wrong", "p-wrong", "positive", 0.9)])
        except Exception as e:  # the type is what the scorer classifies, checked below
            assert not is_transient(e), e
            assert "WRONGTYPE" in str(e)
        else:
            raise AssertionError("a write onto a product view that is not a hash succeeded")
    assert redis_client.hlen(product_ledger_key("p-wrong")) == 0
    assert redis_client.get(product_key("p-wrong")) == "not a hash"
    # the same pipeline wrote the score key; isolating the record deletes it
    key = score_key("review_sentiment", "e-wrong")
    assert redis_client.exists(key)

    async def discard() -> None:
        client = aioredis.from_url(stack.redis_url)
        try:
            await RedisSink(client, score_ttl_s=100, session_ttl_s=100).discard("review_sentiment", "e-wrong")
        finally:
            await client.aclose()

    asyncio.run(discard())
    assert not redis_client.exists(key)

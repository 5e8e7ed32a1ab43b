"""Poison mixed into a normal stream of all three tasks, on the real broker, Redis and model.

Each kind of hostile record a user found is in the mix: a click worth ``1e39`` and one worth the
JSON literal ``Infinity``, a review dated ``0001-01-01`` and one dated ten days ahead, an invalid
record of about 900 kB, and reviews of products whose ids would break a Redis Cluster hash tag.
Every valid event must be scored once, every poison record must be in the dead-letter topic
exactly once with its stage, and the product views must be exact."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis
from kafka import KafkaProducer

from streamtune.core.settings import Settings
from streamtune.devtools.demo.replay import Outgoing, plan, replay
from streamtune.kafka.topics import ensure_topics
from streamtune.scorer.sink import product_key, score_key
from support import ScorerProcess, read_topic, wait_until

pytestmark = pytest.mark.integration

TASKS = ["review_sentiment", "query_class", "purchase_intent"]
HOSTILE_PRODUCTS = ["}evil{", "{}", "a:b\nc", "产品-42", "{tag}-1"]


def event_id(out: Outgoing) -> str:
    return str(json.loads(out.value)["event_id"])


def poison(outs: list[Outgoing]) -> tuple[list[tuple[str, bytes | None, bytes, str]], list[dict]]:  # type: ignore[type-arg]
    """(topic, key, value, expected stage) of each poison record, and the valid hostile reviews."""
    click = json.loads(next(o for o in outs if o.task == "purchase_intent").value)
    review = json.loads(next(o for o in outs if o.task == "review_sentiment").value)
    now = datetime.now(UTC)
    records: list[tuple[str, bytes | None, bytes, str]] = []
    big = dict(click, event_id="poison-big", page_value=1e39)
    records.append(("events.click", click["session_id"].encode(), json.dumps(big).encode(), "validate"))
    inf = json.dumps(dict(click, event_id="poison-inf", page_value=0.0)).replace(
        '"page_value": 0.0', '"page_value": Infinity'
    )
    records.append(("events.click", click["session_id"].encode(), inf.encode(), "validate"))
    old = dict(review, event_id="poison-old", ts="0001-01-01T00:00:00")
    records.append(("events.review", b"p", json.dumps(old).encode(), "validate"))
    ahead = dict(review, event_id="poison-ahead", ts=(now + timedelta(days=10)).isoformat())
    records.append(("events.review", b"p", json.dumps(ahead).encode(), "validate"))
    huge = b'{"event_id": "poison-huge", "query": "' + b"x" * 900_000  # not even JSON
    records.append(("events.search", b"s", huge, "decode"))
    hostile = [
        dict(review, event_id=f"hostile-{i}-{n}", product_id=pid, ts=now.isoformat())
        for i, pid in enumerate(HOSTILE_PRODUCTS)
        for n in range(2)
    ]
    return records, hostile


def test_poison_in_a_normal_stream_is_dead_lettered_once_and_the_rest_flows(
    settings: Settings, redis_client: redis.Redis, scorer_factory: Callable[[Settings], ScorerProcess]
) -> None:
    ensure_topics(settings)
    outs = list(plan(settings.data_dir, TASKS, 60, 0.0, 11))
    bad, hostile = poison(outs)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, max_request_size=2_000_000)
    try:
        for topic, key, value, _ in bad:
            producer.send(settings.topic(topic), key=key, value=value)
        for rev in hostile:
            producer.send(
                settings.topic("events.review"),
                key=rev["product_id"].encode(),
                value=json.dumps(rev).encode(),
            )
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)
    replay(settings, TASKS, limit=60, malformed_share=0.0, seed=11)

    scorer = scorer_factory(settings).start()
    valid = [score_key(o.task, event_id(o)) for o in outs if o.valid]
    valid += [score_key("review_sentiment", rev["event_id"]) for rev in hostile]

    def all_scored() -> bool:
        return sum(redis_client.exists(*valid[i : i + 500]) for i in range(0, len(valid), 500)) == len(valid)

    wait_until(all_scored, 300, "a score for every valid event behind the poison", 0.5, scorer.assert_alive,
               scorer.log_tail)  # fmt: skip

    letters = [json.loads(m.value) for m in read_topic(settings, "events.dlq")]
    assert len(letters) == len(bad), [d["error"][:80] for d in letters]
    by_stage = Counter(d["stage"] for d in letters)
    assert by_stage == Counter(stage for *_, stage in bad)
    for d in letters:
        assert d["source_topic"].endswith(("events.click", "events.review", "events.search"))
        assert d["partition"] >= 0 and d["offset"] >= 0 and d["error"]
    (huge,) = [d for d in letters if d["source_topic"].endswith("events.search")]
    assert huge["raw_truncated"] and huge["raw_size"] > 900_000 and len(huge["raw"]) <= 70_000

    # Output topics: no result twice; every hostile product's view counts its reviews exactly.
    for topic in ("scores.review", "scores.search", "scores.click"):
        ids = Counter(json.loads(m.value)["event_id"] for m in read_topic(settings, topic))
        assert not [i for i, n in ids.items() if n > 1], topic
    for pid in HOSTILE_PRODUCTS:
        view = redis_client.hgetall(product_key(pid))
        assert int(view["reviews"]) == 2, pid
    scorer.assert_alive()

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

import pytest
import redis
from kafka import KafkaProducer

from streamtune.core.settings import Settings
from streamtune.devtools.demo.replay import Outgoing, plan, replay
from streamtune.devtools.poison import HOSTILE_PRODUCTS, hostile_reviews, poison_records
from streamtune.kafka.topics import ensure_topics
from streamtune.scorer.sink import product_key, score_key
from support import ScorerProcess, read_topic, wait_until

pytestmark = pytest.mark.integration

TASKS = ["review_sentiment", "query_class", "purchase_intent"]


def event_id(out: Outgoing) -> str:
    return str(json.loads(out.value)["event_id"])


def test_poison_in_a_normal_stream_is_dead_lettered_once_and_the_rest_flows(
    settings: Settings, redis_client: redis.Redis, scorer_factory: Callable[[Settings], ScorerProcess]
) -> None:
    ensure_topics(settings)
    outs = list(plan(settings.model.data_dir, TASKS, 60, 0.0, 11))
    bad, hostile = poison_records(outs), hostile_reviews(outs)
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, max_request_size=2_000_000)
    try:
        for p in bad:
            producer.send(settings.topic(p.topic), key=p.key, value=p.value)
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
    assert by_stage == Counter(p.stage for p in bad)
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

"""Graceful lifecycle on the real broker, Redis and model: SIGTERM drains, a rolling restart of
two scorers in one group loses nothing and redoes nothing."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable

import pytest
import redis
from test_e2e import TASKS, all_scored, check_aggregates, event_id, expected

from streamtune.core.settings import Settings
from streamtune.devtools.demo.replay import replay
from streamtune.devtools.stack import find_free_port
from streamtune.kafka.topics import ensure_topics
from streamtune.scorer.sink import score_key
from support import ScorerProcess, read_topic, wait_until

pytestmark = pytest.mark.integration

TASKS_IN = {
    "review_sentiment": "events.review",
    "query_class": "events.search",
    "purchase_intent": "events.click",
}
OUT_TOPICS = {
    "review_sentiment": "scores.review",
    "query_class": "scores.search",
    "purchase_intent": "scores.click",
}


def scored_count(r: redis.Redis, keys: list[str]) -> int:
    return int(sum(r.exists(*keys[i : i + 500]) for i in range(0, len(keys), 500)))


def test_rolling_restart_of_two_scorers_loses_nothing_and_redoes_nothing(
    settings: Settings, redis_client: redis.Redis, scorer_factory: Callable[[Settings], ScorerProcess]
) -> None:
    """Scorers A and B share the group; events flow at a steady rate while A is stopped with
    SIGTERM and replaced, then B. Every event is scored, and every event's result is published
    exactly once: a drained scorer finishes and commits what it took, so nobody redoes it."""
    ensure_topics(settings)
    per_task = 60
    outs = expected(settings, limit=per_task, malformed=0.0, seed=21)
    keys = [score_key(o.task, event_id(o)) for o in outs]

    def own_port() -> Settings:
        # DEBUG: each batch's offsets are in the logs a failure prints
        return settings.replace(metrics_port=find_free_port(), log_level="DEBUG")

    a = scorer_factory(own_port()).start()
    b = scorer_factory(own_port()).start()
    producer = threading.Thread(
        target=replay,
        kwargs={"settings": settings, "tasks": TASKS, "limit": per_task, "rate": 3.0, "seed": 21},
        daemon=True,
    )
    producer.start()

    def progressed(at_least: int, guard: ScorerProcess) -> None:
        wait_until(
            lambda: scored_count(redis_client, keys) >= at_least,
            180,
            f"{at_least} events scored",
            0.2,
            guard.assert_alive,
            context=lambda: "\n".join(
                w.stacks() + "\n" + w.log_tail(3000) for w in dict.fromkeys((a, b, guard))
            ),
        )

    progressed(15, b)
    assert a.stop() == 0, a.log_tail()
    assert "drain_complete" in a.log(), a.log_tail()
    a2 = scorer_factory(own_port()).start()
    progressed(scored_count(redis_client, keys) + 15, a2)
    assert b.stop() == 0, b.log_tail()
    assert "drain_complete" in b.log(), b.log_tail()
    b2 = scorer_factory(own_port()).start()
    producer.join(timeout=180)
    assert not producer.is_alive()

    def missing() -> str:
        gone = {event_id(o) for o, k in zip(outs, keys, strict=True) if not redis_client.exists(k)}
        where = sorted(
            (m.topic, m.partition, m.offset, json.loads(m.value)["event_id"])
            for t in TASKS_IN.values()
            for m in read_topic(settings, t)
            if json.loads(m.value)["event_id"] in gone
        )
        # Who owns what, and what each live scorer is doing (its threads and asyncio tasks).
        workers = "\n".join(w.stacks() + "\n" + w.log_tail(6000) for w in (a2, b2))
        return f"not scored: {where}\n{workers}"

    wait_until(
        all_scored(redis_client, outs),
        300,
        "every event scored across the rolling restart",
        0.5,
        b2.assert_alive,
        context=missing,
    )
    check_aggregates(redis_client, outs)
    # Nothing redone: each input record's result was published once.
    redone_report = []
    for task in TASKS:
        msgs = read_topic(settings, OUT_TOPICS[task])
        counts = Counter(json.loads(m.value)["event_id"] for m in msgs)
        missing = {event_id(o) for o in outs if o.task == task} - set(counts)
        assert not missing, f"{task}: scored in Redis but never published: {sorted(missing)}"
        sources = read_topic(settings, TASKS_IN[task])
        inputs = Counter(json.loads(m.value)["event_id"] for m in sources)
        redone = {e: c for e, c in counts.items() if c > inputs[e]}
        if redone:
            where = {
                json.loads(m.value)["event_id"]: (m.partition, m.offset)
                for m in sources
                if json.loads(m.value)["event_id"] in redone
            }
            redone_report.append(f"{task}: published more often than received: {redone} at {where}")
    stopped = (a2.stop(), b2.stop())
    assert stopped == (0, 0), stopped
    assert not redone_report, "; ".join(redone_report)

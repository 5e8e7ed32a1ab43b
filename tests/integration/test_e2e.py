"""End to end on the real broker, Redis and model: a real scorer process, replayed real data."""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import redis

from streamtune.core import schemas
from streamtune.core.settings import Settings
from streamtune.devtools.demo.replay import Outgoing, plan, replay
from streamtune.kafka.topics import ensure_topics
from streamtune.scorer.sink import product_key, product_terms_key, score_key, session_key
from support import ScorerProcess, consume_all, wait_until

pytestmark = pytest.mark.integration

TASKS = ["review_sentiment", "query_class", "purchase_intent"]
OUT_SCHEMA = {
    "scores.review": "score.review.v1",
    "scores.search": "score.search.v1",
    "scores.click": "score.click.v1",
}


def expected(settings: Settings, limit: int, malformed: float, seed: int) -> list[Outgoing]:
    return list(plan(settings.model.data_dir, TASKS, limit, malformed, seed))


def event_id(out: Outgoing) -> str:
    return str(json.loads(out.value)["event_id"])


def all_scored(r: redis.Redis, outs: list[Outgoing]) -> Callable[[], bool]:
    keys = [score_key(o.task, event_id(o)) for o in outs if o.valid]

    def check() -> bool:
        return sum(r.exists(*keys[i : i + 500]) for i in range(0, len(keys), 500)) == len(keys)

    return check


def check_aggregates(r: redis.Redis, outs: list[Outgoing]) -> None:
    """Product and session views equal a direct computation over the scored events."""
    by_product: dict[str, list[dict]] = defaultdict(list)  # type: ignore[type-arg]
    clicks: dict[str, list[str]] = defaultdict(list)
    for o in outs:
        if not o.valid:
            continue
        if o.task == "review_sentiment":
            rec = json.loads(r.get(score_key(o.task, event_id(o))) or "null")
            by_product[rec["product_id"]].append(rec)
        elif o.task == "purchase_intent":
            clicks[o.key].append(event_id(o))
    assert by_product or clicks, "nothing to check"
    for product, recs in by_product.items():
        view = r.hgetall(product_key(product))
        counts = Counter(rec["label"] for rec in recs)
        assert int(view["reviews"]) == len(recs), product
        for label in ("negative", "neutral", "positive"):
            assert int(view[f"reviews_{label}"]) == counts.get(label, 0), (product, label)
        mean = sum(rec["probabilities"]["positive"] for rec in recs) / len(recs)
        assert float(view["mean_positive_probability"]) == pytest.approx(mean, abs=1e-5)
        # the reasons of the product's negative reviews, counted once each (versions with a
        # linear stage give reasons; the others none, and the hash stays empty)
        terms = Counter(
            t["term"] for rec in recs if rec["label"] == "negative" for t in (rec.get("reasons") or [])
        )
        assert {k: int(v) for k, v in r.hgetall(product_terms_key(product)).items()} == dict(terms), product
    for session, ids in clicks.items():
        view = r.hgetall(session_key(session))
        assert int(view["page_views"]) == len(ids), session
        last = json.loads(r.get(score_key("purchase_intent", ids[-1])) or "null")
        assert view["last_event_id"] == ids[-1]
        assert float(view["purchase_probability"]) == pytest.approx(last["purchase_probability"])


def test_replay_scores_everything_and_dead_letters_the_rest(
    settings: Settings, redis_client: redis.Redis, scorer_factory: Callable[[Settings], ScorerProcess]
) -> None:
    ensure_topics(settings)
    outs = expected(settings, limit=120, malformed=0.08, seed=3)
    n_valid = Counter(o.task for o in outs if o.valid)
    n_bad = sum(not o.valid for o in outs)
    assert n_bad > 5 and all(n_valid[t] > 50 for t in TASKS)
    report = replay(settings, TASKS, limit=120, malformed_share=0.08, seed=3)
    assert report.sent == dict(n_valid)

    scorer = scorer_factory(settings).start()
    wait_until(
        all_scored(redis_client, outs), 300, "a Redis score for every valid event", 0.5, scorer.assert_alive
    )

    # Output topics: one result per valid event, valid against the published schema, keyed by entity.
    for topic, task in (
        ("scores.review", "review_sentiment"),
        ("scores.search", "query_class"),
        ("scores.click", "purchase_intent"),
    ):
        msgs = consume_all(settings, topic, n_valid[task])
        assert len(msgs) == n_valid[task]
        validator = jsonschema.Draft202012Validator(schemas.load(OUT_SCHEMA[topic]))
        for m in msgs:
            value = json.loads(m.value)
            validator.validate(value)
            entity = value["product_id"] if task == "review_sentiment" else value["session_id"]
            assert m.key.decode() == entity
            assert value["adapter"] == {"task": task, "version": 1}
    # Dead letters: every malformed record, with the reason and where it came from.
    dlq = consume_all(settings, "events.dlq", n_bad)
    assert len(dlq) == n_bad
    validator = jsonschema.Draft202012Validator(schemas.load("dlq.v1"))
    for m in dlq:
        dl = json.loads(m.value)
        validator.validate(dl)
        assert dl["error"] and dl["source_topic"].startswith(settings.kafka.topic_prefix + "events.")
        assert dl["raw"] is not None or dl["raw_b64"] is not None
    check_aggregates(redis_client, outs)

    metrics = scorer.metrics()
    assert 'streamtune_dead_letters_total{task="review_sentiment"}' in metrics
    # Micro-batches never exceed the configured bound.
    for task in TASKS:
        le = f'streamtune_batch_size_bucket{{le="{float(settings.scorer.batch_max_events)}",task="{task}"}}'
        count = f'streamtune_batch_size_count{{task="{task}"}}'
        values = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in metrics.splitlines()
            if line.startswith("streamtune_batch_size")
        }
        assert values[le] == values[count] > 0
    assert scorer.stop() == 0


def test_sigkill_mid_stream_loses_nothing_and_counts_nothing_twice(
    settings: Settings, redis_client: redis.Redis, scorer_factory: Callable[[Settings], ScorerProcess]
) -> None:
    ensure_topics(settings)
    outs = expected(settings, limit=200, malformed=0.0, seed=5)
    review_keys = [score_key(o.task, event_id(o)) for o in outs if o.task == "review_sentiment"]
    replay(settings, TASKS, limit=200, seed=5)
    first = scorer_factory(settings).start()

    def some_but_not_all() -> bool:
        done = redis_client.exists(*review_keys)
        return 20 <= done < len(review_keys)

    wait_until(some_but_not_all, 180, "the scorer to be mid-stream", 0.05, first.assert_alive)
    first.kill()
    assert not all_scored(redis_client, outs)(), "the scorer finished before it was killed"
    second = scorer_factory(settings).start()
    wait_until(
        all_scored(redis_client, outs),
        300,
        "every event scored after the restart",
        0.5,
        second.assert_alive,
        context=lambda: second.stacks() + "\n" + first.log_tail(3000) + "\n" + second.log_tail(),
    )
    check_aggregates(redis_client, outs)
    # The restarted scorer learned where the group resumes from the broker, in the assignment.
    assert "resume_offsets_learned" in second.log()
    # Replays happened (at-least-once) but the aggregates above counted nothing twice.
    assert second.stop() == 0


def test_events_keep_flowing_while_producing(
    settings: Settings, redis_client: redis.Redis, scorer_factory: Callable[[Settings], ScorerProcess]
) -> None:
    """Events produced while the scorer runs (paced) are all scored; one entity's results in order."""
    ensure_topics(settings)
    scorer = scorer_factory(settings).start()
    outs = expected(settings, limit=40, malformed=0.0, seed=9)
    t = threading.Thread(
        target=replay, kwargs={"settings": settings, "tasks": TASKS, "limit": 40, "rate": 200.0, "seed": 9}
    )
    t.start()
    t.join(timeout=120)
    wait_until(all_scored(redis_client, outs), 180, "every paced event scored", 0.3, scorer.assert_alive)
    msgs = consume_all(settings, "scores.click", sum(o.task == "purchase_intent" for o in outs))
    views: dict[str, list[int]] = defaultdict(list)
    for m in msgs:
        v = json.loads(m.value)
        views[v["session_id"]].append(v["page_views"])
    assert views and all(seq == sorted(seq) for seq in views.values())
    # A stalled test's message starts with this dump (SIGUSR2): it names the agents' frames.
    assert "streamtune/scorer/app.py" in scorer.stacks()
    scorer.stop()


def test_idle_sessions_expire_from_the_table(
    settings: Settings, redis_client: redis.Redis, scorer_factory: Callable[[Settings], ScorerProcess]
) -> None:
    # The replay stops after its clicks, so no later click moves the event-time watermark: the
    # last sessions expire by the partition-idle rule (scorer/sessions.py), set small here too.
    s = settings.replace(session_inactivity_s=2.0, session_sweep_s=0.5, session_idle_partition_s=2.0)
    ensure_topics(s)
    outs = [o for o in expected(s, limit=30, malformed=0.0, seed=11) if o.task == "purchase_intent"]
    sessions = {o.key for o in outs}
    scorer = scorer_factory(s).start()
    replay(s, ["purchase_intent"], limit=30, seed=11)
    wait_until(all_scored(redis_client, outs), 180, "every click scored", 0.3, scorer.assert_alive)

    def metric(name: str) -> float:
        for line in scorer.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.split(" ")[1])
        return 0.0

    wait_until(lambda: metric("streamtune_sessions_expired_total") >= len(sessions), 60,
               "idle sessions to expire", 0.3, scorer.assert_alive)  # fmt: skip
    assert metric("streamtune_sessions_active") == 0
    # The Redis session views stay readable (they expire on their own TTL).
    assert all(redis_client.exists(session_key(sid)) for sid in sessions)
    scorer.stop()


def test_onnx_backends_score_end_to_end_with_per_task_batch_bounds(
    settings: Settings,
    redis_client: redis.Redis,
    scorer_factory: Callable[[Settings], ScorerProcess],
    tmp_path: Path,
) -> None:
    """A scorer on ONNX Runtime (reviews int8, queries fp32): it exports the artifacts it lacks at
    start (gate included), scores every event, and honours a per-task batch bound."""
    registry = tmp_path / "adapters"
    shutil.copytree(settings.model.adapter_dir, registry, ignore=shutil.ignore_patterns("artifacts"))
    s = settings.replace(
        adapter_dir=registry,
        backend="onnx-int8",
        task_backends={"query_class": "onnx-fp32"},
        task_batch_max_events={"query_class": 4},
        export_eval_rows=80,
        onnx_min_agreement=0.9,  # 80 rows: the gate's resolution is 1.25 %
    )
    ensure_topics(s)
    outs = expected(s, limit=40, malformed=0.0, seed=21)
    replay(s, TASKS, limit=40, seed=21)
    scorer = scorer_factory(s).start()
    wait_until(
        all_scored(redis_client, outs), 300, "every event scored on ONNX Runtime", 0.5, scorer.assert_alive
    )
    for task, backend in (("review_sentiment", "onnx-int8"), ("query_class", "onnx-fp32")):
        art = json.loads((registry / task / "1" / "artifacts" / backend / "artifact.json").read_text())
        assert art["passed"] and art["agreement"] >= 0.9 and art["eval_rows"] == 80
    msgs = consume_all(s, "scores.search", sum(o.task == "query_class" for o in outs))
    assert {json.loads(m.value)["adapter"]["version"] for m in msgs} == {1}
    check_aggregates(redis_client, outs)
    metrics = scorer.metrics()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("streamtune_batch_size")
    }
    assert (
        values['streamtune_batch_size_bucket{le="4.0",task="query_class"}']
        == values['streamtune_batch_size_count{task="query_class"}']
    )
    assert scorer.stop() == 0

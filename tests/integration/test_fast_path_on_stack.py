"""The fast path on the real stack: a scorer serves the shipped review_sentiment v2 (a cascade)
while labels arrive; the labels drift, the trainer's error-rate detector fires, the fast path
updates the linear stage at once and releases it, and the scorer swaps to it between batches.
Nothing is lost or counted twice, and the new version shares the transformer files with its
parent instead of copying them.

The gate is permissive here (margin -1): what this test checks is that a detected drift, and
nothing else, makes the fast path release, and what the release looks like on the stack; the
gate's own decisions (shuffled labels refused) are tested in ``tests/integration/test_fast_path.py``."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from kafka import KafkaProducer
from test_e2e import all_scored, check_aggregates, event_id
from test_trainer import metric

from streamtune.core.events import LabelEvent
from streamtune.core.settings import Settings
from streamtune.devtools.demo.replay import Outgoing, plan
from streamtune.devtools.stack import find_free_port
from streamtune.kafka.topics import ensure_topics
from streamtune.model.linear import LINEAR_FILES
from streamtune.rollout.registry import LocalRegistry
from streamtune.rollout.releases import ReleaseLog
from support import ScorerProcess, read_topic, wait_until

pytestmark = pytest.mark.integration
TASK = "review_sentiment"
LIVE = 2


@pytest.fixture
def fsettings(settings: Settings) -> Settings:
    shipped = Settings().model.adapter_dir / TASK / str(LIVE)
    shutil.copytree(
        shipped, settings.model.adapter_dir / TASK / str(LIVE), ignore=shutil.ignore_patterns("artifacts")
    )
    s = settings.replace(
        trainer_group_id=f"trainer-{settings.kafka.group_id}",
        trainer_min_labels=100_000,  # the slow path never runs here
        trainer_interval_s=3600.0,
        drift_min_labels=0,
        drift_grace=30,
        trainer_fast_interval_s=3600.0,  # nor the fast path's cadence: only a drift starts it
        trainer_fast_min_labels=40,
        trainer_margin=-1.0,
        trainer_reference_tolerance=1.0,
        trainer_reference_rows=30,
        trainer_label_wait_s=20.0,
        trainer_check_s=0.5,
        trainer_release_stage="live",
        max_seq_len=64,
    )
    ensure_topics(s)
    return s


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[ScorerProcess]]:
    started: list[ScorerProcess] = []
    yield started
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.stop()


def _send(s: Settings, outs: list[Outgoing], label: Callable[[LabelEvent], int] | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=s.kafka.bootstrap_servers, acks="all")
    try:
        for o in outs:
            if label is None:
                producer.send(s.topic("events.review"), key=o.key.encode(), value=o.value)
            else:
                assert o.label is not None
                lab = o.label.model_copy(update={"label": label(o.label), "ts": datetime.now(UTC)})
                producer.send(
                    s.topic("labels"), key=(lab.event_id or "").encode(), value=lab.model_dump_json().encode()
                )
        producer.flush(30)
    finally:
        producer.close(5)


def test_a_drift_makes_the_fast_path_release_and_the_scorer_serve_it(
    fsettings: Settings, redis_client: redis.Redis, processes: list[ScorerProcess], tmp_path: Path
) -> None:
    s = fsettings
    outs = [o for o in plan(s.model.data_dir, [TASK], 330, seed=31) if o.valid]
    natural, drifted, after = outs[:120], outs[120:270], outs[270:330]
    scorer = ScorerProcess(s, tmp_path / "scorer.log")
    processes.append(scorer)
    scorer.start()
    trainer = ScorerProcess(s.replace(metrics_port=find_free_port()), tmp_path / "trainer.log",
                            command="trainer")  # fmt: skip
    processes.append(trainer)
    trainer.start()

    def guard() -> None:
        scorer.assert_alive()
        trainer.assert_alive()

    # Labels follow their scored events (the trainer judges each against what was served).
    _send(s, natural)
    wait_until(all_scored(redis_client, natural), 300, "the natural reviews scored", 0.5, guard)
    _send(s, natural, label=lambda lab: lab.label)  # the true ratings: v2 is mostly right
    judged = "streamtune_trainer_served_judged_total"
    wait_until(
        lambda: metric(trainer, judged) >= 100, 120, "labels judged", 0.5, guard, context=trainer.log_tail
    )
    assert metric(trainer, "streamtune_trainer_drift_detected_total") == 0
    assert LocalRegistry(s.model.adapter_dir).versions(TASK) == [1, 2]  # nothing but a drift starts it

    _send(s, drifted)
    wait_until(all_scored(redis_client, drifted), 300, "the drifted reviews scored", 0.5, guard)
    _send(s, drifted, label=lambda lab: 1)  # the drift: every review is now labelled 1 star
    wait_until(lambda: metric(trainer, "streamtune_trainer_drift_detected_total") >= 1, 120,
               "the trainer's error-rate detector to fire", 0.5, guard, context=trainer.log_tail)  # fmt: skip
    released = 'streamtune_trainer_fast_updates_total{outcome="released",task="review_sentiment"}'
    wait_until(
        lambda: metric(trainer, released) == 1, 180, "a fast release", 0.5, guard, context=trainer.log_tail
    )
    registry = LocalRegistry(s.model.adapter_dir)
    assert registry.versions(TASK) == [1, 2, 3]
    m = registry.verify(TASK, 3)
    assert m.training["path"] == "fast" and m.parent_version == LIVE
    assert m.changed == sorted(LINEAR_FILES) and set(m.shared) == set(m.files) - set(LINEAR_FILES)
    for name in m.shared:  # the transformer's files are the parent's, not copies
        assert (
            os.stat(registry.fetch(TASK, 3) / name).st_ino
            == os.stat(registry.fetch(TASK, LIVE) / name).st_ino
        )
    assert "recheck" in m.cascade  # a drift re-checks the threshold
    records = [json.loads(line) for line in trainer.log().splitlines() if line.startswith("{")]
    triggered = [r for r in records if r.get("event") == "fast_update_triggered"]
    assert [r["reason"] for r in triggered] == ["drift"]
    state = ReleaseLog(s).states()[TASK]
    assert (state.stage, state.live_version) == ("live", 3)

    # The scorer swaps between batches: what it scores from then on carries the new version.
    wait_until(
        lambda: _route_is(scorer, 3), 120, "the scorer's swap to v3", 0.5, guard, context=scorer.log_tail
    )
    _send(s, after)
    wait_until(all_scored(redis_client, after), 300, "the reviews after the release scored", 0.5, guard)
    results = {r["event_id"]: r for r in (json.loads(msg.value) for msg in read_topic(s, "scores.review"))}
    every = natural + drifted + after
    assert set(results) == {event_id(o) for o in every}  # nothing lost
    assert {results[event_id(o)]["adapter"]["version"] for o in after} == {3}
    assert {results[event_id(o)]["adapter"]["version"] for o in natural} == {LIVE}
    check_aggregates(redis_client, every)  # product views: each review counted once
    assert scorer.stop() == 0
    assert trainer.stop() == 0


def _route_is(scorer: ScorerProcess, version: int) -> bool:
    for line in scorer.log().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("event") == "adapter_route" and rec.get("task") == TASK and rec.get("live") == version:
                return True
    return False

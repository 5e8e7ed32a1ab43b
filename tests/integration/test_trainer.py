"""The online trainer end to end: real broker, real model, real `streamtune trainer` processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path

import pytest
from kafka import KafkaProducer

from streamtune.core.events import LabelEvent, ReviewEvent
from streamtune.core.settings import Settings
from streamtune.datasets import loaders as data
from streamtune.devtools.demo.replay import review_events
from streamtune.kafka.topics import ensure_topics
from streamtune.rollout.registry import LocalRegistry
from streamtune.rollout.releases import ReleaseLog
from support import ScorerProcess, wait_until
from support.registry import pinned_registry

pytestmark = pytest.mark.integration
TASK = "review_sentiment"


@pytest.fixture
def tsettings(settings: Settings, tmp_path: Path) -> Settings:
    pinned_registry(tmp_path / "adapters")
    s = settings.replace(
        adapter_dir=tmp_path / "adapters",
        trainer_group_id=f"trainer-{settings.kafka.group_id}",
        trainer_min_labels=40,
        trainer_interval_s=3600.0,
        trainer_label_wait_s=20.0,
        trainer_budget_s=30.0,
        trainer_epochs=1,
        trainer_reference_rows=30,
        trainer_check_s=0.5,
        trainer_release_stage="canary",
        trainer_canary_fraction=0.25,
        max_seq_len=64,
    )
    ensure_topics(s)
    return s


def reviews(skip: int, n: int) -> list[ReviewEvent]:
    """Training-split reviews (the reference set is drawn from the held-out split)."""
    rows = (
        ev
        for ev, _ in review_events(Settings().model.data_dir)
        if not data.is_held_out(ev.event_id.removeprefix("review-"), data.HELD_OUT_PERCENT[TASK])
    )
    return list(islice(rows, skip, skip + n))


def rating_of(event_id: str) -> int:
    return {f"review-{r.review_id}": r.rating for r in data.load_reviews(Settings().model.data_dir)}[event_id]


class Producer:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.p = KafkaProducer(bootstrap_servers=s.kafka.bootstrap_servers, acks="all")

    def events(self, evs: list[ReviewEvent]) -> None:
        for ev in evs:
            self.p.send(
                self.s.topic("events.review"), key=ev.product_id.encode(), value=ev.model_dump_json().encode()
            )
        self.p.flush(30)

    def events_ahead(self, evs: list[ReviewEvent], ahead_s: float) -> None:
        """Unlabelled reviews, one on each partition, dated ``ahead_s`` from now: the review
        stream's clock (the trainer's orphan timing: event time on every partition) moves that
        far past the labels sent so far, and the trainer caps it at its own clock, so a waiting
        label is an orphan once it is ``trainer_label_wait_s`` old by both."""
        ts = datetime.now(UTC) + timedelta(seconds=ahead_s)
        for partition, ev in enumerate(evs):
            self.p.send(
                self.s.topic("events.review"),
                key=ev.product_id.encode(),
                value=ev.model_copy(update={"ts": ts}).model_dump_json().encode(),
                partition=partition,
            )
        self.p.flush(30)

    def labels(self, event_ids: list[str], rating: int | None = None) -> None:
        for eid in event_ids:
            lab = LabelEvent(event_id=eid, task=TASK, label=rating or rating_of(eid), ts=datetime.now(UTC))
            self.p.send(self.s.topic("labels"), key=eid.encode(), value=lab.model_dump_json().encode())
        self.p.flush(30)

    def raw_label(self, value: bytes) -> None:
        self.p.send(self.s.topic("labels"), key=b"bad", value=value)
        self.p.flush(30)

    def close(self) -> None:
        self.p.close(5)


@pytest.fixture
def producer(tsettings: Settings) -> Iterator[Producer]:
    p = Producer(tsettings)
    yield p
    p.close()


@pytest.fixture
def trainers(tmp_path: Path) -> Iterator[list[ScorerProcess]]:
    started: list[ScorerProcess] = []
    yield started
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.stop()


def start_trainer(s: Settings, started: list[ScorerProcess], tmp_path: Path) -> ScorerProcess:
    p = ScorerProcess(s, tmp_path / f"trainer-{len(started)}.log", command="trainer")
    started.append(p)
    return p.start()


def metric(proc: ScorerProcess, name: str) -> float:
    total = 0.0
    for line in proc.metrics().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def versions(s: Settings) -> list[int]:
    return LocalRegistry(s.model.adapter_dir).versions(TASK)


def test_trainer_joins_late_duplicate_and_orphan_labels_gates_and_releases(
    tsettings: Settings, producer: Producer, trainers: list[ScorerProcess], tmp_path: Path
) -> None:
    # Round 1, an impossible margin: the candidate is trained and published, never released.
    s1 = tsettings.replace(trainer_margin=1.0, trainer_min_labels=50)
    first = reviews(0, 50)
    ids = [e.event_id for e in first]
    producer.labels(ids[:3])  # labels that arrive before their input wait for it...
    trainer = start_trainer(s1, trainers, tmp_path)
    wait_until(lambda: metric(trainer, "streamtune_trainer_labels_pending") == 3, 60, "3 waiting labels",
               guard=trainer.assert_alive)  # fmt: skip
    producer.events(first)  # ...and join when it comes
    producer.labels(ids[3:])  # late labels
    producer.labels(ids[10:20])  # duplicates
    producer.labels(["review-no-such-event-1", "review-no-such-event-2"], rating=5)  # orphans, once
    producer.events_ahead(
        reviews(95, s1.kafka.topic_partitions), s1.trainer.label_wait_s + 5
    )  # reviews move on
    producer.raw_label(b'{"task": "review_sentiment", "label": 9}')  # invalid: dead-lettered

    wait_until(lambda: 2 in versions(s1), 240, "the first candidate", guard=trainer.assert_alive)
    m2 = LocalRegistry(s1.model.adapter_dir).manifest(TASK, 2)
    assert m2.gate["passed"] is False and "margin" in m2.gate["reason"]
    assert m2.parent_version == 1
    assert m2.training["fresh_labels"] + m2.training["holdout_labels"] == 50
    assert m2.training["replay_labels"] == 0
    wait_until(lambda: metric(trainer, "streamtune_trainer_labels_orphan_total") == 2, 90, "orphans counted")
    assert metric(trainer, "streamtune_trainer_labels_pending") == 0
    assert metric(trainer, "streamtune_trainer_labels_joined_total") == 50
    assert metric(trainer, "streamtune_trainer_labels_duplicate_total") == 10
    assert metric(trainer, "streamtune_trainer_labels_invalid_total") == 1
    rejected = 'streamtune_trainer_runs_total{outcome="rejected",task="review_sentiment"}'
    wait_until(lambda: metric(trainer, rejected) == 1, 60, "the run to be counted as rejected")
    assert TASK not in ReleaseLog(s1).states()  # nothing announced
    assert trainer.stop() == 0

    # Round 2, a restarted trainer with a permissive gate: it recovers its tables (the round-1
    # labels come back as replay), trains only on the new labels, and releases a canary.
    s2 = tsettings.replace(trainer_margin=-1.0, trainer_reference_tolerance=1.0, trainer_min_labels=45)
    second = reviews(50, 45)
    producer.events(second)
    producer.labels([e.event_id for e in second])
    trainer = start_trainer(s2, trainers, tmp_path)
    wait_until(lambda: 3 in versions(s2), 240, "the second candidate", guard=trainer.assert_alive)
    m3 = LocalRegistry(s2.model.adapter_dir).manifest(TASK, 3)
    assert m3.gate["passed"] is True and m3.parent_version == 1  # warm start from live, not from v2
    assert m3.training["fresh_labels"] + m3.training["holdout_labels"] == 45
    assert m3.training["replay_labels"] > 0  # recovered from the changelog
    assert set(m3.gate) >= {"metric", "holdout", "reference", "margin", "passed", "reason"}
    state = wait_until(lambda: ReleaseLog(s2).states().get(TASK), 60, "the canary release")
    assert (state.stage, state.canary_version, state.live_version) == ("canary", 3, 1)
    assert state.canary_fraction == 0.25 and state.by == "trainer"
    assert metric(trainer, "streamtune_trainer_labels_joined_total") == 45


def test_trainer_killed_mid_training_publishes_nothing_and_recovers(
    tsettings: Settings, producer: Producer, trainers: list[ScorerProcess], tmp_path: Path
) -> None:
    slow = tsettings.replace(trainer_budget_s=600.0, trainer_epochs=50, trainer_min_labels=48)
    evs = reviews(100, 48)
    producer.events(evs)
    producer.labels([e.event_id for e in evs])
    trainer = start_trainer(slow, trainers, tmp_path)
    wait_until(
        lambda: "training_started" in trainer.log(), 240, "training to start", guard=trainer.assert_alive
    )
    trainer.kill()  # SIGKILL, mid-training
    assert versions(slow) == [1]
    assert not [p for p in (slow.model.adapter_dir / TASK).iterdir() if p.name != "1"]  # no partial version
    assert TASK not in ReleaseLog(slow).states()

    fast = slow.replace(
        trainer_margin=-1.0,
        trainer_reference_tolerance=1.0,
        trainer_epochs=1,
        trainer_budget_s=30.0,
    )
    trainer = start_trainer(fast, trainers, tmp_path)
    wait_until(lambda: 2 in versions(fast), 240, "the candidate after restart", guard=trainer.assert_alive)
    m = LocalRegistry(fast.model.adapter_dir).manifest(TASK, 2)
    assert m.training["fresh_labels"] + m.training["holdout_labels"] == 48  # every label, once
    state = wait_until(lambda: ReleaseLog(fast).states().get(TASK), 60, "the release")
    assert state.canary_version == 2
    log_lines = [json.loads(line) for line in trainer.log().splitlines() if line.startswith("{")]
    assert any(rec.get("event") == "candidate_published" for rec in log_lines)

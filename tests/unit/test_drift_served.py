"""Judging labels against what was served (``streamtune.drift.served``) and the trigger a
detected drift pulls (``training.online.should_train``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from streamtune.core.events import LabelEvent
from streamtune.core.tasks import TASKS
from streamtune.drift.served import Served, ServedBook, served_of
from streamtune.training.online import Trigger, should_train

TS = datetime(2026, 1, 1, tzinfo=UTC)


def _result(task: str, version: int, label: str, **ids: str) -> bytes:
    return json.dumps({"task": task, "adapter": {"version": version}, "label": label, **ids}).encode()


def test_results_name_what_their_labels_name() -> None:
    review = served_of(TASKS["review_sentiment"], _result("review_sentiment", 2, "positive", event_id="r-1"))
    assert review == Served("review_sentiment", "r-1", 2, "positive")
    click = served_of(
        TASKS["purchase_intent"], _result("purchase_intent", 2, "purchase", event_id="c-9", session_id="s-1")
    )
    assert click == Served("purchase_intent", "s-1", 2, "purchase")  # a session's label names the session
    assert LabelEvent(session_id="s-1", task="purchase_intent", label=1, ts=TS).target == "s-1"
    assert LabelEvent(event_id="r-1", task="review_sentiment", label=5, ts=TS).target == "r-1"


def test_records_that_are_not_results_of_the_task_are_ignored() -> None:
    spec = TASKS["review_sentiment"]
    for value in (b"not json", b"[1]", _result("query_class", 1, "x", event_id="q"),
                  json.dumps({"task": "review_sentiment", "event_id": "r"}).encode()):  # fmt: skip
        assert served_of(spec, value) is None


def test_a_label_is_judged_once_against_the_latest_answer() -> None:
    book = ServedBook(limit=10)
    book.add(Served("purchase_intent", "s-1", 2, "no_purchase"))
    book.add(Served("purchase_intent", "s-1", 2, "purchase"))  # the session's later click
    assert len(book) == 1
    assert book.judge("purchase_intent", "s-1", "purchase") == (2, False)
    assert book.judge("purchase_intent", "s-1", "purchase") is None  # one label, one judgement
    book.add(Served("review_sentiment", "r-1", 3, "positive"))
    assert book.judge("review_sentiment", "r-1", "negative") == (3, True)
    assert book.judge("review_sentiment", "unknown", "negative") is None


def test_an_event_label_read_before_its_answer_waits_for_it() -> None:
    book = ServedBook(limit=2)
    assert book.judge("review_sentiment", "r-1", "negative", wait=True) is None
    assert book.waiting == 1
    assert book.add(Served("review_sentiment", "r-1", 3, "positive")) == (3, True)  # judged on arrival
    assert book.waiting == 0 and len(book) == 0  # one label, one judgement
    assert book.add(Served("review_sentiment", "r-1", 3, "positive")) is None  # a redelivery is kept
    assert book.judge("review_sentiment", "r-2", "negative") is None  # without wait, not kept
    assert book.waiting == 0
    for i in range(4):  # waiting labels are bounded like the answers, oldest first
        book.judge("review_sentiment", f"w-{i}", "negative", wait=True)
    assert book.waiting == 2
    assert book.add(Served("review_sentiment", "w-0", 3, "negative")) is None
    assert book.add(Served("review_sentiment", "w-3", 3, "negative")) == (3, False)


def test_the_book_is_bounded_oldest_first() -> None:
    book = ServedBook(limit=3)
    for i in range(5):
        book.add(Served("review_sentiment", f"r-{i}", 2, "positive"))
    assert len(book) == 3
    assert book.judge("review_sentiment", "r-0", "positive") is None
    assert book.judge("review_sentiment", "r-4", "positive") == (2, False)


def test_a_drift_starts_a_run_on_fewer_labels_only_when_detected() -> None:
    trigger = Trigger(min_labels=300, interval_s=3600, interval_min_labels=50, drift_min_labels=100)
    assert should_train(120, 10.0, trigger) is None
    assert should_train(120, 10.0, trigger, drifted=True) == "drift"
    assert should_train(99, 10.0, trigger, drifted=True) is None
    assert should_train(300, 10.0, trigger, drifted=True) == "count"
    assert should_train(120, 10.0, Trigger(300, 3600, 50), drifted=True) is None  # 0: drift never triggers

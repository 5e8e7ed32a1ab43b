"""The trainer's label-to-input join over plain dicts: no Kafka, no Redis, no model, no clock."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from streamtune.core.events import ClickEvent, LabelEvent, ReviewEvent, SearchEvent
from streamtune.core.features import SessionState, apply_click, session_row, vectorize
from streamtune.core.tasks import TASKS
from streamtune.trainer.joiner import (
    Eviction,
    InputAdded,
    JoinedLabel,
    Joiner,
    JoinLimits,
    Label,
    LabelStatus,
    PendingLabel,
    SessionInput,
    TextInput,
)
from streamtune.training.online import CLICK_LABELS, GATE_METRIC, Example, known_labels

T0 = datetime(2026, 11, 29, 12, tzinfo=UTC)
NOW = 2_000_000_000.0  # wall clock of the tests (epoch seconds)
REVIEW, QUERY, CLICK = TASKS["review_sentiment"], TASKS["query_class"], TASKS["purchase_intent"]
LIMITS = JoinLimits(input_window_s=3600.0, max_inputs=100, label_wait_s=60.0, replay_max=100)


class Tables:
    """Three plain dicts, a joiner over them, and every tombstone it asked for."""

    def __init__(
        self,
        limits: JoinLimits = LIMITS,
        watermarks: dict[str, int] | None = None,
        joined: dict[str, Any] | None = None,
    ) -> None:
        self.inputs: dict[str, Any] = {}
        self.joined: dict[str, Any] = joined or {}
        self.pending: dict[str, Any] = {}
        self.watermarks = watermarks if watermarks is not None else {}
        self.sent: list[Eviction] = []
        self.joiner = Joiner(self.inputs, self.joined, self.pending, limits, self.watermarks, self.evict)

    def evict(self, e: Eviction) -> None:  # what trainer/app.py does with a Faust table
        {"inputs": self.inputs, "joined": self.joined, "pending": self.pending}[e.table].pop(e.key, None)
        self.sent.append(e)


def review(i: int, ts: datetime = T0, title: str | None = None) -> ReviewEvent:
    return ReviewEvent(event_id=f"r{i}", ts=ts, product_id="p1", text=f"text {i}", title=title)


def search(i: int, ts: datetime = T0) -> SearchEvent:
    return SearchEvent(event_id=f"q{i}", ts=ts, session_id="s9", query=f"query {i}")


def click(session: str, i: int, ts: datetime = T0, page_type: str = "product") -> ClickEvent:
    return ClickEvent.model_validate(
        {
            "event_id": f"{session}-c{i}", "ts": ts, "session_id": session, "page_type": page_type,
            "duration_s": 10.0 + i, "page_value": 2.5, "bounce_rate": 0.1, "exit_rate": 0.2, "month": 11,
            "visitor_type": "returning", "weekend": True, "special_day": 0.0, "traffic_type": 2,
            "region": 3, "browser": 4, "operating_system": 1,
        }
    )  # fmt: skip


def review_label(i: int, rating: int | str = 5, ts: datetime = T0) -> LabelEvent:
    return LabelEvent(event_id=f"r{i}", task="review_sentiment", label=rating, ts=ts)


def query_label(i: int, name: str = "Desks", ts: datetime = T0) -> LabelEvent:
    return LabelEvent(event_id=f"q{i}", task="query_class", label=name, ts=ts)


def click_label(session: str, bought: int = 1, ts: datetime = T0) -> LabelEvent:
    return LabelEvent(session_id=session, task="purchase_intent", label=bought, ts=ts)


# --- joins -----------------------------------------------------------------------------------


def test_input_then_label_joins() -> None:
    t = Tables()
    added = t.joiner.add_input(REVIEW, review(1, title="Great"), partition=2, offset=40)
    assert added == InputAdded("review_sentiment", "review_sentiment:r1")
    assert t.inputs == {"review_sentiment:r1": {"x": "Great. text 1", "t": T0.timestamp(), "cp": 2, "a": 0}}

    out = t.joiner.add_label(review_label(1, rating=2), partition=0, offset=7, now=NOW)
    assert out.status is LabelStatus.JOINED and out.task == "review_sentiment"
    ex = Example("review_sentiment:r1", "Great. text 1", "negative", 0, 7, T0.timestamp(), 0)
    assert out.key == "review_sentiment:r1" and out.joined == ex
    assert t.joined == {"review_sentiment:r1": {"ex": ex.to_json(), "cp": 0}}  # the label's partition
    assert t.pending == {} and t.sent == []
    assert t.inputs  # the input stays (until the sweep): later labels of it are duplicates
    assert t.joiner.examples("review_sentiment") == [ex]


def test_label_then_input_joins_and_tombstones_the_pending_label() -> None:
    t = Tables()
    out = t.joiner.add_label(query_label(3, "Lamps"), partition=1, offset=11, now=NOW)
    assert out.status is LabelStatus.PENDING and out.joined is None
    assert t.pending == {
        "query_class:q3": {
            "label": {"y": "Lamps", "p": 1, "o": 11, "t": T0.timestamp()},
            "arrived": NOW,
            "cp": 1,
            "a": 0,  # the trainer's arrival counter
        }
    }
    assert t.joined == {}

    added = t.joiner.add_input(QUERY, search(3), partition=4, offset=90)
    ex = Example("query_class:q3", "query 3", "Lamps", 1, 11, T0.timestamp(), 0)
    assert added == InputAdded(
        "query_class", "query_class:q3", joined=ex, evicted=Eviction("pending", "query_class:q3", 1)
    )
    assert t.sent == [Eviction("pending", "query_class:q3", 1)]  # where the pending entry was written
    assert t.pending == {}
    assert t.joined == {"query_class:q3": {"ex": ex.to_json(), "cp": 4}}  # the input's partition


def test_pending_label_of_an_already_joined_input_is_dropped_without_joining() -> None:
    t = Tables()
    t.joiner.add_input(QUERY, search(1), partition=0, offset=1)
    t.joiner.add_label(query_label(1, "Desks"), partition=0, offset=5, now=NOW)
    before = dict(t.joined)
    # Both tables hold the key (e.g. recovered from changelogs written around a crash).
    t.pending["query_class:q1"] = PendingLabel(Label("Lamps", 2, 9, 1.0), NOW, 2).to_json()
    added = t.joiner.add_input(QUERY, search(1), partition=0, offset=2)
    assert added == InputAdded(
        "query_class", "query_class:q1", evicted=Eviction("pending", "query_class:q1", 2)
    )
    assert t.pending == {} and t.joined == before


def test_first_label_wins_over_a_joined_one() -> None:
    t = Tables()
    t.joiner.add_input(REVIEW, review(1), partition=0, offset=1)
    first = t.joiner.add_label(review_label(1, 5), partition=0, offset=1, now=NOW)
    before = json.dumps(t.joined)
    again = t.joiner.add_label(review_label(1, 1), partition=1, offset=2, now=NOW + 1)
    assert first.status is LabelStatus.JOINED
    assert again.status is LabelStatus.DUPLICATE and again.task == "review_sentiment" and again.joined is None
    assert json.dumps(t.joined) == before and t.pending == {}
    assert [e.y for e in t.joiner.examples("review_sentiment")] == ["positive"]


def test_first_label_wins_over_a_pending_one() -> None:
    t = Tables()
    t.joiner.add_label(query_label(2, "Desks"), partition=0, offset=1, now=NOW)
    before = json.dumps(t.pending)
    again = t.joiner.add_label(query_label(2, "Lamps"), partition=0, offset=2, now=NOW + 1)
    assert again.status is LabelStatus.DUPLICATE
    assert json.dumps(t.pending) == before
    added = t.joiner.add_input(QUERY, search(2), partition=0, offset=3)
    assert added is not None and added.joined is not None and added.joined.y == "Desks"


def test_label_names_come_from_the_task_spec() -> None:
    t = Tables()
    for i, rating in enumerate([1, 3, 5, "neutral"]):
        t.joiner.add_input(REVIEW, review(i), partition=0, offset=i)
        t.joiner.add_label(review_label(i, rating), partition=0, offset=i, now=NOW)
    assert [e.y for e in t.joiner.examples("review_sentiment")] == [
        "negative",
        "neutral",
        "positive",
        "neutral",
    ]


def test_examples_are_per_task() -> None:
    t = Tables()
    t.joiner.add_input(REVIEW, review(1), partition=0, offset=1)
    t.joiner.add_input(QUERY, search(1), partition=0, offset=1)
    t.joiner.add_label(review_label(1), partition=0, offset=1, now=NOW)
    t.joiner.add_label(query_label(1), partition=0, offset=2, now=NOW)
    assert [e.key for e in t.joiner.examples("review_sentiment")] == ["review_sentiment:r1"]
    assert [e.key for e in t.joiner.examples("query_class")] == ["query_class:q1"]
    assert t.joiner.examples("purchase_intent") == []


# --- sequence numbers ------------------------------------------------------------------------


def _join_reviews(t: Tables, ids: range, offset0: int = 0) -> list[int]:
    seqs = []
    for i in ids:
        t.joiner.add_input(REVIEW, review(i), partition=0, offset=i)
        out = t.joiner.add_label(review_label(i), partition=0, offset=offset0 + i, now=NOW)
        assert out.joined is not None
        seqs.append(out.joined.seq)
    return seqs


def test_sequence_numbers_start_at_zero_and_count_joins_not_offsets() -> None:
    t = Tables()
    assert _join_reviews(t, range(3), offset0=500) == [0, 1, 2]
    t.joiner.add_label(query_label(1), partition=0, offset=1, now=NOW)  # pending: no number
    added = t.joiner.add_input(QUERY, search(1), partition=0, offset=1)
    assert added is not None and added.joined is not None and added.joined.seq == 3


def test_sequence_continues_after_the_recovered_table() -> None:
    old = Example("query_class:q0", "q", "Desks", 0, 0, 1.0, 7)
    legacy = {"ex": {k: v for k, v in old.to_json().items() if k != "s"}, "cp": 0}  # no seq: counts as 0
    t = Tables(joined={"query_class:q0": JoinedLabel(old, 0).to_json(), "query_class:qx": legacy})
    assert _join_reviews(t, range(2)) == [8, 9]


def test_sequence_continues_after_the_watermarks() -> None:
    old = Example("query_class:q0", "q", "Desks", 0, 0, 1.0, 7)
    t = Tables(
        watermarks={"purchase_intent": 20, "query_class": 3},
        joined={"query_class:q0": JoinedLabel(old, 0).to_json()},
    )
    assert _join_reviews(t, range(2)) == [21, 22]


def test_sequence_is_read_once_at_the_first_join() -> None:
    t = Tables()
    assert _join_reviews(t, range(1)) == [0]
    t.watermarks["review_sentiment"] = 50  # a run finished: numbering does not jump
    assert _join_reviews(t, range(1, 2)) == [1]
    assert t.joiner.next_seq() == 2


# --- sessions --------------------------------------------------------------------------------


def test_clicks_update_the_session_and_a_label_joins_the_vectorized_session() -> None:
    t = Tables()
    key = "purchase_intent:s1"
    a = t.joiner.add_input(CLICK, click("s1", 0, page_type="administrative"), partition=3, offset=10)
    b = t.joiner.add_input(CLICK, click("s1", 1, ts=T0 + timedelta(seconds=30)), partition=3, offset=12)
    assert a == InputAdded("purchase_intent", key) and b == InputAdded("purchase_intent", key)
    expected, _ = apply_click(None, click("s1", 0, page_type="administrative"), 3, 10)
    expected, _ = apply_click(expected, click("s1", 1, ts=T0 + timedelta(seconds=30)), 3, 12)
    assert t.inputs == {
        key: {
            "s": expected.model_dump(mode="json"),
            "t": (T0 + timedelta(seconds=30)).timestamp(),
            "cp": 3,
            "a": 1,  # the latest click's arrival
        }
    }
    assert SessionState.model_validate(t.inputs[key]["s"]).page_views == 2

    out = t.joiner.add_label(click_label("s1", 1), partition=0, offset=4, now=NOW)
    x = vectorize(session_row(expected))
    assert out.status is LabelStatus.JOINED
    assert out.joined == Example(key, x, "purchase", 0, 4, T0.timestamp(), 0)
    assert t.joined[key]["ex"]["x"] == x and t.joined[key]["cp"] == 0


def test_a_session_label_waits_for_the_first_click() -> None:
    t = Tables()
    out = t.joiner.add_label(click_label("s2", 0), partition=1, offset=3, now=NOW)
    assert out.status is LabelStatus.PENDING
    added = t.joiner.add_input(CLICK, click("s2", 0), partition=2, offset=8)
    state, _ = apply_click(None, click("s2", 0), 2, 8)
    assert added is not None and added.joined is not None
    assert added.joined.y == "no_purchase" and added.joined.x == vectorize(session_row(state))
    assert added.evicted == Eviction("pending", "purchase_intent:s2", 1)
    assert t.joined["purchase_intent:s2"]["cp"] == 2


def test_a_redelivered_click_changes_nothing() -> None:
    t = Tables()
    t.joiner.add_input(CLICK, click("s1", 0), partition=0, offset=5)
    t.joiner.add_label(click_label("s9"), partition=0, offset=1, now=NOW)
    t.pending["purchase_intent:s1"] = PendingLabel(Label("purchase", 0, 2, 1.0), NOW, 0).to_json()
    before = json.dumps([t.inputs, t.joined, t.pending])
    assert t.joiner.add_input(CLICK, click("s1", 1), partition=0, offset=5) is None  # same offset
    assert t.joiner.add_input(CLICK, click("s1", 1), partition=0, offset=4) is None  # older
    assert json.dumps([t.inputs, t.joined, t.pending]) == before and t.sent == []


# --- sweep: stream time, not the wall clock ----------------------------------------------------

FAR = NOW + 7 * 24 * 3600.0  # a week later on the wall clock: it must not matter


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_label_is_orphaned_once_its_tasks_inputs_are_past_it_by_the_wait() -> None:
    t = Tables()
    t.joiner.add_label(query_label(1, ts=at(0)), partition=2, offset=1, now=NOW)
    t.joiner.add_label(query_label(2, ts=at(30)), partition=0, offset=2, now=NOW)
    t.joiner.add_label(click_label("s1", ts=at(0)), partition=1, offset=3, now=NOW)
    assert t.joiner.sweep(FAR).orphans == {}  # no input seen: no stream time has passed for them

    wait = LIMITS.label_wait_s
    t.joiner.add_input(QUERY, search(10, ts=at(wait)), partition=0, offset=1)
    t.joiner.add_input(CLICK, click("s9", 0, ts=at(wait)), partition=0, offset=1)
    at_limit = t.joiner.sweep(FAR)  # the inputs are exactly the wait past the labels: still waiting
    assert at_limit.orphans == {} and at_limit.evictions == [] and at_limit.labels_pending == 3

    t.joiner.add_input(QUERY, search(11, ts=at(wait + 0.5)), partition=0, offset=2)
    t.joiner.add_input(CLICK, click("s9", 1, ts=at(wait + 0.5)), partition=0, offset=2)
    swept = t.joiner.sweep(FAR)
    assert swept.orphans == {"query_class": 1, "purchase_intent": 1}
    assert (
        swept.evictions
        == t.sent
        == [
            Eviction("pending", "query_class:q1", 2),
            Eviction("pending", "purchase_intent:s1", 1),
        ]
    )
    assert list(t.pending) == ["query_class:q2"] and swept.labels_pending == 1
    assert swept.inputs_evicted == 0 and swept.replay_evicted == {} and swept.dropped == {}


def test_labels_read_ahead_of_their_inputs_after_downtime_all_join() -> None:
    """A trainer that was down reads its backlog: the labels first, their inputs long after on
    the wall clock, with sweeps in between; every label joins its input."""
    t = Tables()
    for p in (0, 1):  # before the downtime the input stream had reached at(0) on both partitions
        t.joiner.add_input(REVIEW, review(100 + p, ts=at(0)), partition=p, offset=0)
    for i in range(10):  # each review labelled 5 s after it was written; reviews 10 s apart
        out = t.joiner.add_label(review_label(i, ts=at(10 * i + 5)), partition=i % 2, offset=i, now=NOW)
        assert out.status is LabelStatus.PENDING
    assert t.joiner.sweep(FAR).orphans == {}
    joined = []
    for i in range(10):  # the inputs' backlog, in stream order
        added = t.joiner.add_input(REVIEW, review(i, ts=at(10 * i)), partition=i % 2, offset=1 + i)
        assert added is not None and added.joined is not None
        joined.append(added.joined.key)
        swept = t.joiner.sweep(FAR + i)
        assert swept.orphans == {} and swept.inputs_evicted == 0
    assert joined == [f"review_sentiment:r{i}" for i in range(10)] and t.pending == {}


def test_a_partition_still_in_its_backlog_holds_orphans_back() -> None:
    t = Tables()
    t.joiner.add_label(query_label(1, ts=at(0)), partition=0, offset=1, now=NOW)
    t.joiner.add_input(QUERY, search(5, ts=at(-100)), partition=1, offset=1)  # partition 1: behind
    t.joiner.add_input(QUERY, search(6, ts=at(1000)), partition=0, offset=1)  # partition 0: caught up
    assert t.joiner.sweep(FAR).orphans == {}
    added = t.joiner.add_input(QUERY, search(1, ts=at(-5)), partition=1, offset=2)  # there it is
    assert added is not None and added.joined is not None and t.pending == {}


def test_only_the_labels_own_task_moves_its_clock() -> None:
    t = Tables()
    t.joiner.add_label(query_label(1, ts=at(0)), partition=0, offset=1, now=NOW)
    t.joiner.add_input(REVIEW, review(1, ts=at(1e5)), partition=0, offset=1)
    assert t.joiner.sweep(FAR).orphans == {} and list(t.pending) == ["query_class:q1"]


def test_stream_clocks_do_not_run_ahead_of_the_wall_clock() -> None:
    t = Tables()
    t.joiner.add_label(query_label(1, ts=at(0)), partition=0, offset=1, now=NOW)
    t.joiner.add_input(QUERY, search(5, ts=at(1e5)), partition=0, offset=1)  # a producer clock far ahead
    assert t.joiner.sweep(at(LIMITS.label_wait_s).timestamp()).orphans == {}
    assert t.joiner.sweep(at(LIMITS.label_wait_s + 1).timestamp()).orphans == {"query_class": 1}


def test_inputs_go_once_the_labels_stream_is_a_window_past_them() -> None:
    t = Tables()
    window = LIMITS.input_window_s
    t.joiner.add_input(REVIEW, review(1, ts=at(-1)), partition=1, offset=1)
    t.joiner.add_input(REVIEW, review(2, ts=at(0)), partition=2, offset=2)  # exactly at the cutoff: kept
    t.joiner.add_input(CLICK, click("s1", 0, ts=at(-7200)), partition=3, offset=3)
    assert t.joiner.sweep(FAR).evictions == []  # no label seen: the window has not moved
    t.joiner.add_label(query_label(8, ts=at(-3 * window)), partition=1, offset=1, now=NOW)  # behind
    t.joiner.add_label(query_label(9, ts=at(window)), partition=0, offset=1, now=NOW)
    assert t.joiner.sweep(FAR).inputs_evicted == 0
    t.joiner.add_label(query_label(10, ts=at(window)), partition=1, offset=2, now=NOW)
    swept = t.joiner.sweep(FAR)
    assert swept.evictions == [  # in arrival order
        Eviction("inputs", "review_sentiment:r1", 1),
        Eviction("inputs", "purchase_intent:s1", 3),
    ]
    assert swept.inputs_evicted == 2 and swept.inputs_held == 1 and list(t.inputs) == ["review_sentiment:r2"]


def test_inputs_read_ahead_of_their_labels_after_downtime_wait_for_them() -> None:
    t = Tables()
    t.joiner.add_input(REVIEW, review(100, ts=at(0)), partition=0, offset=0)
    t.joiner.add_label(review_label(100, ts=at(0)), partition=0, offset=0, now=NOW)  # labels were at(0)
    for i in range(5):  # the inputs' backlog first (made while the trainer was down), read a week late
        t.joiner.add_input(REVIEW, review(i, ts=at(1 + i)), partition=0, offset=1 + i)
    assert t.joiner.sweep(FAR).inputs_evicted == 0
    for i in range(5):
        out = t.joiner.add_label(review_label(i, ts=at(10)), partition=0, offset=1 + i, now=FAR)
        assert out.status is LabelStatus.JOINED


# --- sweep: arrival order, bounds ------------------------------------------------------------


def test_inputs_beyond_the_count_go_in_arrival_order_not_by_their_timestamps() -> None:
    t = Tables(JoinLimits(input_window_s=1e9, max_inputs=2, label_wait_s=60.0, replay_max=100))
    t.inputs["query_class:old"] = {"x": "q", "t": at(999).timestamp(), "cp": 0}  # a previous trainer's
    for i, age in enumerate([5, 1, 9]):  # event times out of order: seconds before T0
        t.joiner.add_input(QUERY, search(i, ts=T0 - timedelta(seconds=age)), partition=i, offset=i)
    swept = t.joiner.sweep(NOW)
    assert swept.evictions == [
        Eviction("inputs", "query_class:old", 0),  # no arrival recorded: the oldest
        Eviction("inputs", "query_class:q0", 0),
    ]
    assert sorted(t.inputs) == ["query_class:q1", "query_class:q2"] and swept.inputs_evicted == 2
    assert t.joiner.sweep(NOW).evictions == []


def test_a_session_clicked_again_is_a_new_arrival() -> None:
    t = Tables(JoinLimits(input_window_s=1e9, max_inputs=2, label_wait_s=60.0, replay_max=100))
    t.joiner.add_input(CLICK, click("s1", 0), partition=0, offset=1)
    t.joiner.add_input(CLICK, click("s2", 0), partition=0, offset=2)
    t.joiner.add_input(CLICK, click("s1", 1), partition=0, offset=3)
    t.joiner.add_input(CLICK, click("s3", 0), partition=0, offset=4)
    assert t.joiner.sweep(NOW).evictions == [Eviction("inputs", "purchase_intent:s2", 0)]


def test_the_arrival_counter_continues_after_the_recovered_tables() -> None:
    t = Tables()
    t.pending["query_class:q7"] = PendingLabel(Label("Desks", 0, 1, 1.0), NOW, 0, arrival=41).to_json()
    t.joiner.add_input(QUERY, search(1), partition=0, offset=0)
    assert t.inputs["query_class:q1"]["a"] == 42


def test_pending_labels_beyond_the_bound_are_dropped_oldest_arrival_first() -> None:
    t = Tables(
        JoinLimits(input_window_s=1e9, max_inputs=100, label_wait_s=60.0, replay_max=100, max_pending=2)
    )
    for i, dt in enumerate([30, 10, 20]):  # label times out of order: arrival decides
        t.joiner.add_label(query_label(i, ts=at(dt)), partition=i, offset=i, now=NOW)
    t.joiner.add_label(click_label("s1", ts=at(0)), partition=3, offset=9, now=NOW)
    swept = t.joiner.sweep(NOW)
    assert swept.dropped == {"query_class": 2} and swept.orphans == {}
    assert swept.evictions == [
        Eviction("pending", "query_class:q0", 0),
        Eviction("pending", "query_class:q1", 1),
    ]
    assert sorted(t.pending) == ["purchase_intent:s1", "query_class:q2"] and swept.labels_pending == 2
    assert t.joiner.sweep(NOW).evictions == []


def test_replay_pool_keeps_the_latest_joined_used_labels_and_every_fresh_one() -> None:
    t = Tables(JoinLimits(input_window_s=1e9, max_inputs=100, label_wait_s=60.0, replay_max=2))
    # label times (seconds after T0) in join order: seq 0..5; the label times do not matter
    for i, dt in enumerate([50, 10, 40, 20, 30, 0]):
        t.joiner.add_input(REVIEW, review(i), partition=0, offset=i)
        t.joiner.add_label(review_label(i, ts=at(dt)), partition=i % 2, offset=i, now=NOW)
    for i in range(4):  # another task: its pool is separate
        t.joiner.add_input(QUERY, search(i), partition=0, offset=i)
        t.joiner.add_label(query_label(i), partition=0, offset=10 + i, now=NOW)
    assert t.joiner.sweep(NOW).replay_evicted == {}  # no watermark: every label is fresh

    t.watermarks["review_sentiment"] = 3  # seqs 0..3 used; 4, 5 fresh
    swept = t.joiner.sweep(NOW)
    assert swept.evictions == [
        Eviction("joined", "review_sentiment:r0", 0),
        Eviction("joined", "review_sentiment:r1", 1),
    ]
    assert swept.replay_evicted == {"review_sentiment": 2}
    assert sorted(e.seq for e in t.joiner.examples("review_sentiment")) == [2, 3, 4, 5]
    assert len(t.joiner.examples("query_class")) == 4
    assert t.joiner.sweep(NOW).evictions == []


# --- sweep: bytes ----------------------------------------------------------------------------

ROOMY = JoinLimits(input_window_s=1e9, max_inputs=100, label_wait_s=60.0, replay_max=100)


def size(value: Any) -> int:
    """What an entry weighs for the byte bounds: its compact JSON in UTF-8 (computed here)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def test_inputs_over_the_bytes_go_oldest_arrival_first() -> None:
    t = Tables()
    for i, title in enumerate(["A much longer title than the others", None, "Short", None]):
        t.joiner.add_input(REVIEW, review(i, title=title), partition=i, offset=i)
    keys = [f"review_sentiment:r{i}" for i in range(4)]
    newest = size(t.inputs[keys[2]]) + size(t.inputs[keys[3]])
    t.joiner.limits = replace(ROOMY, max_input_bytes=newest + size(t.inputs[keys[1]]) - 1)
    swept = t.joiner.sweep(NOW)
    assert swept.evictions == t.sent == [Eviction("inputs", keys[0], 0), Eviction("inputs", keys[1], 1)]
    assert swept.inputs_evicted == 2 and list(t.inputs) == keys[2:]  # the newest stay, under the count
    assert swept.inputs_bytes == newest == t.joiner.bytes_held()["inputs"]
    assert t.joiner.sweep(NOW).evictions == []


def test_pending_labels_over_the_bytes_are_dropped_oldest_arrival_first() -> None:
    t = Tables()
    t.joiner.add_label(query_label(0, ts=at(30)), partition=0, offset=0, now=NOW)
    t.joiner.add_label(click_label("s1", ts=at(20)), partition=1, offset=1, now=NOW)
    t.joiner.add_label(query_label(2, ts=at(0)), partition=2, offset=2, now=NOW)
    t.joiner.add_label(query_label(3, ts=at(10)), partition=3, offset=3, now=NOW)
    kept = size(t.pending["query_class:q2"]) + size(t.pending["query_class:q3"])
    t.joiner.limits = replace(ROOMY, max_pending_bytes=kept)  # exactly at the bound: kept
    swept = t.joiner.sweep(NOW)
    assert swept.evictions == [
        Eviction("pending", "query_class:q0", 0),
        Eviction("pending", "purchase_intent:s1", 1),
    ]
    assert swept.dropped == {"query_class": 1, "purchase_intent": 1} and swept.orphans == {}
    assert sorted(t.pending) == ["query_class:q2", "query_class:q3"] and swept.labels_pending == 2
    assert swept.pending_bytes == kept
    assert t.joiner.sweep(NOW).evictions == []


def test_replay_pool_over_the_bytes_evicts_the_oldest_trained_on_and_never_a_fresh_label() -> None:
    t = Tables(ROOMY)
    keys = []
    for i in range(3):  # seqs: r0 0, q0 1, r1 2, q1 3, r2 4, q2 5
        t.joiner.add_input(REVIEW, review(i), partition=0, offset=i)
        t.joiner.add_label(review_label(i), partition=0, offset=2 * i, now=NOW)
        t.joiner.add_input(QUERY, search(i), partition=0, offset=i)
        t.joiner.add_label(query_label(i), partition=1, offset=2 * i + 1, now=NOW)
        keys += [f"review_sentiment:r{i}", f"query_class:q{i}"]
    total = sum(size(v) for v in t.joined.values())
    oldest = size(t.joined[keys[0]]) + size(t.joined[keys[1]])
    t.watermarks.update({"review_sentiment": 2, "query_class": 1})  # trained on: r0, q0, r1
    t.joiner.limits = replace(ROOMY, max_replay_bytes=total - oldest)
    swept = t.joiner.sweep(NOW)  # the count keeps all: the bytes evict the two oldest joins
    assert swept.evictions == [Eviction("joined", keys[0], 0), Eviction("joined", keys[1], 1)]
    assert swept.replay_evicted == {"review_sentiment": 1, "query_class": 1}
    assert swept.joined_bytes == total - oldest == t.joiner.bytes_held()["joined"]

    t.joiner.limits = replace(ROOMY, max_replay_bytes=1)  # the fresh labels alone are over it
    swept = t.joiner.sweep(NOW)
    assert swept.evictions == [Eviction("joined", keys[2], 0)]  # the last one trained on
    assert swept.replay_evicted == {"review_sentiment": 1}
    assert sorted(t.joined) == sorted(keys[3:])  # every fresh label stays
    assert swept.joined_bytes == sum(size(v) for v in t.joined.values()) > 1
    assert t.joiner.sweep(NOW).evictions == []


def test_the_tally_of_recovered_tables_is_their_fresh_computation() -> None:
    t = Tables()
    t.inputs["review_sentiment:old"] = {"x": "écrit avant", "t": T0.timestamp(), "cp": 1}  # no "a"
    t.joiner.add_input(REVIEW, review(1, title="Très bien"), partition=0, offset=0)  # not ASCII
    t.joiner.add_input(CLICK, click("s1", 0), partition=1, offset=0)
    t.joiner.add_input(CLICK, click("s1", 1), partition=1, offset=1)
    t.joiner.add_label(review_label(1), partition=0, offset=0, now=NOW)
    t.joiner.add_label(query_label(4), partition=2, offset=1, now=NOW)
    again = Joiner(t.inputs, t.joined, t.pending, ROOMY, {})  # the same tables, after a restart
    tables = {"inputs": t.inputs, "joined": t.joined, "pending": t.pending}
    expected = {name: {k: size(v) for k, v in table.items()} for name, table in tables.items()}
    assert again.sizes() == expected == t.joiner.sizes()
    assert again.bytes_held() == {name: sum(sizes.values()) for name, sizes in expected.items()}
    compact = f'{{"x":"Très bien. text 1","t":{T0.timestamp()},"cp":0,"a":0}}'
    assert expected["inputs"]["review_sentiment:r1"] == len(compact.encode()) == len(compact) + 1  # UTF-8

    total = sum(expected["inputs"].values())
    again.limits = replace(ROOMY, max_input_bytes=total - 1)  # one byte over: the oldest arrival goes
    swept = again.sweep(NOW)
    assert swept.evictions == [Eviction("inputs", "review_sentiment:old", 1)]  # no arrival: the oldest
    assert swept.inputs_bytes == total - expected["inputs"]["review_sentiment:old"]


def test_a_sweep_sizes_entries_written_or_removed_outside_the_joiner() -> None:
    t = Tables()
    for i in range(3):
        t.joiner.add_input(QUERY, search(i), partition=0, offset=i)
    del t.inputs["query_class:q1"]  # e.g. partitions moving in a rebalance
    t.inputs["query_class:q9"] = {"x": "query 9", "t": T0.timestamp(), "cp": 2, "a": 99}
    fresh = {k: size(v) for k, v in t.inputs.items()}
    t.joiner.limits = replace(ROOMY, max_input_bytes=sum(fresh.values()) - 1)
    swept = t.joiner.sweep(NOW)
    assert swept.evictions == [Eviction("inputs", "query_class:q0", 0)]
    assert t.joiner.sizes()["inputs"] == {k: n for k, n in fresh.items() if k != "query_class:q0"}
    assert swept.inputs_bytes == sum(fresh.values()) - fresh["query_class:q0"]


def test_a_session_rewritten_by_later_clicks_is_counted_once_at_its_latest_size() -> None:
    t = Tables(ROOMY)
    key = "purchase_intent:s1"
    t.joiner.add_input(CLICK, click("s1", 0), partition=0, offset=0)
    first = size(t.inputs[key])
    t.joiner.add_input(CLICK, click("s2", 0), partition=0, offset=1)
    t.joiner.add_input(CLICK, click("s1", 1), partition=0, offset=2)
    t.joiner.add_input(CLICK, click("s1", 2), partition=0, offset=3)  # s1: the newest arrival now
    latest = size(t.inputs[key])
    assert latest != first  # the session grew
    assert t.joiner.sizes()["inputs"] == {
        key: latest,
        "purchase_intent:s2": size(t.inputs["purchase_intent:s2"]),
    }
    both = latest + size(t.inputs["purchase_intent:s2"])
    t.joiner.limits = replace(ROOMY, max_input_bytes=both)
    assert t.joiner.sweep(NOW).evictions == [] and t.joiner.bytes_held()["inputs"] == both

    t.joiner.add_input(CLICK, click("s3", 0), partition=2, offset=4)
    swept = t.joiner.sweep(NOW)
    assert swept.evictions == [Eviction("inputs", "purchase_intent:s2", 0)]  # the oldest arrival
    assert swept.inputs_bytes == latest + size(t.inputs["purchase_intent:s3"]) <= both
    assert sorted(t.inputs) == [key, "purchase_intent:s3"]


def test_sweep_evicts_in_order_inputs_orphans_dropped_replay() -> None:
    t = Tables(JoinLimits(input_window_s=10.0, max_inputs=100, label_wait_s=5.0, replay_max=0, max_pending=1))
    t.joiner.add_input(QUERY, search(0, ts=at(0)), partition=0, offset=0)
    t.joiner.add_label(query_label(0, ts=at(0)), partition=1, offset=0, now=NOW)  # joins
    t.joiner.add_label(query_label(1, ts=at(0)), partition=2, offset=1, now=NOW)  # will be an orphan
    t.joiner.add_label(click_label("s1", ts=at(20)), partition=1, offset=2, now=NOW)  # beyond the bound
    t.joiner.add_label(click_label("s2", ts=at(20)), partition=2, offset=3, now=NOW)
    t.joiner.add_input(QUERY, search(5, ts=at(6)), partition=0, offset=1)  # 6 s past q1
    t.watermarks["query_class"] = 0  # the joined label was trained on
    swept = t.joiner.sweep(NOW)
    assert [(e.table, e.key) for e in swept.evictions] == [
        ("inputs", "query_class:q0"),  # the labels stream is at(20): both inputs out of the window
        ("inputs", "query_class:q5"),
        ("pending", "query_class:q1"),
        ("pending", "purchase_intent:s1"),
        ("joined", "query_class:q0"),
    ]
    assert swept.orphans == {"query_class": 1} and swept.dropped == {"purchase_intent": 1}
    assert t.inputs == t.joined == {} and list(t.pending) == ["purchase_intent:s2"]


def test_a_restarted_joiner_starts_its_clocks_from_the_recovered_tables() -> None:
    t = Tables()
    t.joiner.add_input(QUERY, search(1, ts=at(100)), partition=0, offset=0)
    t.joiner.add_label(query_label(2, ts=at(0)), partition=0, offset=0, now=NOW)
    t.joiner.add_input(REVIEW, review(1, ts=at(-2 * LIMITS.input_window_s)), partition=0, offset=0)
    again = Joiner(t.inputs, t.joined, t.pending, LIMITS, {})  # the same tables, after a restart
    assert again.next_arrival() == 3
    swept = again.sweep(FAR)
    assert swept.orphans == {"query_class": 1}  # the recovered query input is 100 s past the label
    # ... and the recovered label at(0) is over the window past the review
    assert [e.key for e in swept.evictions if e.table == "inputs"] == ["review_sentiment:r1"]


def test_default_eviction_removes_from_plain_dicts() -> None:
    inputs: dict[str, Any] = {}
    joined: dict[str, Any] = {}
    pending: dict[str, Any] = {}
    joiner = Joiner(inputs, joined, pending, LIMITS, {})
    joiner.add_label(query_label(1), partition=0, offset=0, now=NOW)
    joiner.add_input(QUERY, search(1), partition=0, offset=0)
    assert pending == {} and list(joined) == ["query_class:q1"]


# --- stored format ---------------------------------------------------------------------------


def test_table_json_keeps_the_one_letter_keys() -> None:
    t = Tables()
    t.joiner.add_input(QUERY, search(1), partition=1, offset=0)
    t.joiner.add_input(CLICK, click("s1", 0), partition=2, offset=0)
    t.joiner.add_label(query_label(1), partition=3, offset=5, now=NOW)
    t.joiner.add_label(query_label(2), partition=4, offset=6, now=NOW)
    ts = T0.timestamp()
    assert json.dumps(t.inputs["query_class:q1"]) == json.dumps({"x": "query 1", "t": ts, "cp": 1, "a": 0})
    assert list(t.inputs["purchase_intent:s1"]) == ["s", "t", "cp", "a"]
    assert json.dumps(t.pending["query_class:q2"]) == json.dumps(
        {"label": {"y": "Desks", "p": 4, "o": 6, "t": ts}, "arrived": NOW, "cp": 4, "a": 2}
    )
    ex = {"key": "query_class:q1", "x": "query 1", "y": "Desks", "p": 3, "o": 5, "t": ts, "s": 0}
    assert json.dumps(t.joined["query_class:q1"]) == json.dumps({"ex": ex, "cp": 3})


def test_records_round_trip_and_read_tables_written_by_the_previous_trainer() -> None:
    state, _ = apply_click(None, click("s1", 0), 0, 1)
    assert SessionInput.from_json(SessionInput(state, 1.5, 2, 7).to_json()) == SessionInput(state, 1.5, 2, 7)
    assert TextInput.from_json(TextInput("a", 1.5, 2, 3).to_json()) == TextInput("a", 1.5, 2, 3)
    # written before the arrival counter ("a"): the oldest arrivals
    assert TextInput.from_json({"x": "a", "t": 1.5, "cp": 2}) == TextInput("a", 1.5, 2, -1)
    raw = {"label": {"y": "Desks", "p": 1, "o": 2, "t": 3.0}, "arrived": 4.0, "cp": 1}
    assert PendingLabel.from_json(raw).to_json() == {**raw, "a": -1}
    assert PendingLabel.from_json({**raw, "a": 5}).arrival == 5
    ex = Example("purchase_intent:s1", [0.5, 1.0], "purchase", 1, 42, 3.5, 7)
    assert JoinedLabel.from_json({"ex": ex.to_json(), "cp": 1}) == JoinedLabel(ex, 1)
    # a pending label written by the previous trainer joins the same way
    t = Tables()
    t.pending["query_class:q5"] = raw
    added = t.joiner.add_input(QUERY, search(5), partition=0, offset=0)
    assert added is not None and added.joined == Example("query_class:q5", "query 5", "Desks", 1, 2, 3.0, 0)


# --- task specs in training.online -----------------------------------------------------------


def test_online_names_derive_from_the_task_specs() -> None:
    assert GATE_METRIC == {
        "review_sentiment": "macro_f1",
        "query_class": "top1",
        "purchase_intent": "roc_auc",
    }
    assert CLICK_LABELS == ["no_purchase", "purchase"]
    assert known_labels("review_sentiment", []) == {"negative", "neutral", "positive"}
    assert known_labels("purchase_intent", []) == {"no_purchase", "purchase"}
    assert known_labels("query_class", ["Desks", "Lamps"]) == {"Desks", "Lamps"}


@pytest.mark.parametrize("spec", list(TASKS.values()), ids=list(TASKS))
def test_every_task_joins(spec: Any) -> None:
    t = Tables()
    event = {"review_sentiment": review(1), "query_class": search(1), "purchase_intent": click("s1", 0)}[
        spec.name
    ]
    label = {
        "review_sentiment": review_label(1),
        "query_class": query_label(1),
        "purchase_intent": click_label("s1"),
    }[spec.name]
    assert t.joiner.add_input(spec, event, partition=0, offset=0) is not None
    assert t.joiner.add_label(label, partition=0, offset=0, now=NOW).status is LabelStatus.JOINED

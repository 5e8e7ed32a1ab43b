"""Pure decisions of the online trainer: labels, triggers, selection and the release gate."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from streamtune.core.events import LabelEvent
from streamtune.core.tasks import TASKS, MetricFamily
from streamtune.training.metrics import METRICS
from streamtune.training.online import (
    Example,
    PairedHoldout,
    Trigger,
    advance,
    gate,
    is_fresh,
    label_key,
    label_name,
    select,
    should_train,
)

TS = datetime(2026, 11, 29, tzinfo=UTC)


def ex(
    i: int, partition: int = 0, y: str = "positive", x: str | None = None, seq: int | None = None
) -> Example:
    return Example(
        f"review_sentiment:r{i}", x or f"text {i}", y, partition, i, 1000.0 + i, i if seq is None else seq
    )


@pytest.mark.parametrize(
    ("label", "name"),
    [
        (LabelEvent(event_id="e", task="review_sentiment", label=1, ts=TS), "negative"),
        (LabelEvent(event_id="e", task="review_sentiment", label=3, ts=TS), "neutral"),
        (LabelEvent(event_id="e", task="review_sentiment", label=5, ts=TS), "positive"),
        (LabelEvent(event_id="e", task="review_sentiment", label="neutral", ts=TS), "neutral"),
        (LabelEvent(event_id="e", task="query_class", label="Desks", ts=TS), "Desks"),
        (LabelEvent(session_id="s", task="purchase_intent", label=1, ts=TS), "purchase"),
        (LabelEvent(session_id="s", task="purchase_intent", label=0, ts=TS), "no_purchase"),
    ],
)
def test_label_names(label: LabelEvent, name: str) -> None:
    assert label_name(label) == name


def test_label_keys_join_events_and_sessions_per_task() -> None:
    assert label_key(LabelEvent(event_id="e1", task="query_class", label="x", ts=TS)) == "query_class:e1"
    assert (
        label_key(LabelEvent(session_id="s1", task="purchase_intent", label=0, ts=TS)) == "purchase_intent:s1"
    )


def test_example_round_trips_through_json() -> None:
    e = Example("purchase_intent:s", [0.5, 1.0], "purchase", 1, 42, 3.5, 7)
    assert Example.from_json(e.to_json()) == e


def test_freshness_follows_join_order_not_label_offsets() -> None:
    # A label (offset 3) that waited for its input joins after one with offset 9: it was not
    # trained on by a run that covered joins up to sequence 1, whatever its offset.
    early_joined = ex(9, seq=1)
    waited = ex(3, seq=2)
    wm = advance(-1, [ex(5, seq=0), early_joined])
    assert wm == 1
    assert not is_fresh(early_joined, wm) and is_fresh(waited, wm)


@pytest.mark.parametrize(
    ("fresh", "since", "expected"),
    [
        (99, 10.0, None),
        (100, 0.0, "count"),
        (20, 600.0, "interval"),
        (19, 600.0, None),
        (150, 601.0, "count"),
    ],
)
def test_trigger_count_or_interval_with_minimum(fresh: int, since: float, expected: str | None) -> None:
    assert (
        should_train(fresh, since, Trigger(min_labels=100, interval_s=600.0, interval_min_labels=20))
        == expected
    )


def test_select_holds_out_the_newest_fresh_labels_and_replays_older_ones() -> None:
    old = [ex(i) for i in range(0, 50)]
    fresh = [ex(i) for i in range(50, 60)]
    ts = select(old + fresh, 49, holdout_fraction=0.2, replay_ratio=1.0, seed=1)
    assert [e.offset for e in ts.holdout] == [58, 59]
    assert [e.offset for e in ts.fresh] == list(range(50, 58))
    assert len(ts.replay) == 8 and all(e.offset <= 49 for e in ts.replay)
    assert ts.watermark == 59
    # Same seed, same sample.
    assert select(old + fresh, 49, 0.2, 1.0, seed=1).replay == ts.replay


def test_select_never_trains_on_reference_inputs() -> None:
    labelled = [ex(i) for i in range(10)] + [ex(10, x="a reference review")]
    ts = select(labelled, -1, 0.2, 0.0, seed=1, exclude_inputs=frozenset({"a reference review"}))
    assert all(e.x != "a reference review" for e in ts.fresh + ts.holdout + ts.replay)
    assert len(ts.fresh) + len(ts.holdout) == 10 and ts.excluded == 1
    assert ts.watermark == 10  # the excluded label counts as used: it is not retried


def test_select_excludes_reference_sessions_by_their_features() -> None:
    from streamtune.training.online import input_key

    session = [0.1234567, 2.0, 0.0]
    replayed = Example("purchase_intent:s-1", [0.1234561, 2.0, 0.0], "purchase", 0, 1, 1.0, 1)
    ts = select([replayed], -1, 0.5, 0.0, seed=1, exclude_inputs=frozenset({input_key(session)}))
    assert ts.fresh == [] and ts.holdout == [] and ts.excluded == 1


def test_select_with_nothing_fresh() -> None:
    ts = select([ex(1)], 1, 0.2, 1.0, seed=1)
    assert ts.fresh == [] and ts.holdout == [] and ts.replay == []


GATE_ARGS = {"margin": 0.02, "tolerance": 0.01, "holdout_rows": 50, "reference_rows": 300}


def holdout(
    task: str, live_right: int, cand_right: int, n: int = 50
) -> tuple[dict[str, float], dict[str, float], PairedHoldout]:
    """Live's and the candidate's holdout metrics and per-row predictions on ``n`` rows: each
    model is right on its first ``*_right`` rows (binary: those rows are ranked correctly)."""
    spec = TASKS[task]
    if spec.metric_family is MetricFamily.BINARY:
        y = np.arange(n) % 4 == 0
        probs = [np.where(np.arange(n) < k, np.where(y, 0.9, 0.1), 0.5) for k in (live_right, cand_right)]
        pl, pc = (np.stack([1 - p, p], axis=1) for p in probs)
        y = y.astype(int)
    else:
        y = np.arange(n) % 3
        hits = [np.where(np.arange(n) < k, y, (y + 1) % 3) for k in (live_right, cand_right)]
        pl, pc = (np.eye(5)[h] * 0.7 + 0.06 for h in hits)  # 5 classes: top-3 is not trivially right

    def metrics(p: np.ndarray) -> dict[str, float]:
        return METRICS[spec.metric_family](
            list(y), p[:, -1] if spec.metric_family is MetricFamily.BINARY else p
        )

    return metrics(pl), metrics(pc), PairedHoldout(list(y), pl, pc)


def test_gate_releases_a_better_candidate_and_records_the_comparison() -> None:
    hl, hc, paired = holdout("review_sentiment", 25, 50)
    v = gate("review_sentiment", hl, hc, {"macro_f1": 0.6}, {"macro_f1": 0.6}, **GATE_ARGS, paired=paired)
    assert v.passed
    assert v.details["metric"] == "macro_f1"
    assert v.details["holdout_gain"] == pytest.approx(hc["macro_f1"] - hl["macro_f1"])
    assert v.details["holdout"]["live"] == hl
    assert v.details["holdout_test"]["lower"] > GATE_ARGS["margin"]


def test_gate_rejects_a_gain_below_the_margin() -> None:
    hl, hc, paired = holdout("query_class", 25, 26)  # +0.02 on 50 rows: one row, chance
    v = gate("query_class", hl, hc, {"top1": 0.5}, {"top1": 0.5}, **GATE_ARGS, paired=paired)
    assert not v.passed and "not above 0" in v.reason
    # 15 rows better of 1,000, none worse: surely better, but by 0.015, below the margin 0.02
    hl, hc, paired = holdout("query_class", 500, 515, n=1000)
    v = gate("query_class", hl, hc, {"top1": 0.5}, {"top1": 0.5}, **GATE_ARGS, paired=paired)
    assert v.details["holdout_test"]["p_value"] < 0.01
    assert not v.passed and "below the margin 0.02" in v.reason
    # a gain of exactly the margin is not refused for float noise (0.57 - 0.55 < 0.02 in floats)
    hl, hc, paired = holdout("query_class", 550, 570, n=1000)
    v = gate("query_class", hl, hc, {"top1": 0.5}, {"top1": 0.5}, **GATE_ARGS, paired=paired)
    assert hc["top1"] - hl["top1"] < 0.02 and v.passed, v.reason


def test_gate_rejects_a_candidate_that_forgets_the_reference_set() -> None:
    hl, hc, paired = holdout("purchase_intent", 10, 50)
    v = gate("purchase_intent", hl, hc, {"roc_auc": 0.9}, {"roc_auc": 0.85}, **GATE_ARGS, paired=paired)
    assert not v.passed and "reference" in v.reason
    assert v.details["holdout_test"]["lower"] > GATE_ARGS["margin"]  # refused for the reference only


def test_gate_rejects_when_the_metric_is_undefined() -> None:
    nan = {"roc_auc": math.nan}
    v = gate("purchase_intent", nan, nan, {"roc_auc": 0.9}, {"roc_auc": 0.9}, **GATE_ARGS)
    assert not v.passed and "undefined" in v.reason


def test_select_caps_the_holdout() -> None:
    ts = select([ex(i) for i in range(100)], -1, 0.5, 0.0, seed=1, holdout_max=10)
    assert len(ts.holdout) == 10 and len(ts.fresh) == 90
    assert [e.offset for e in ts.holdout] == list(range(90, 100))


def test_canary_judge_waits_promotes_and_rolls_back() -> None:
    from streamtune.devtools.demo.view import judge_canary

    assert judge_canary((70, 100), (10, 20), min_judged=50, margin=0.02)[0] == "wait"
    assert judge_canary((700, 1000), (72, 100), min_judged=50, margin=0.02)[0] == "promote"
    assert judge_canary((700, 1000), (50, 100), min_judged=50, margin=0.02)[0] == "rollback"
    # Slightly worse, within noise: wait, then give up on the conservative side.
    assert judge_canary((700, 1000), (66, 100), min_judged=50, margin=0.02)[0] == "wait"
    assert judge_canary((700, 1000), (165, 250), min_judged=50, margin=0.02)[0] == "rollback"


def test_accuracy_book_compares_versions_on_the_same_window() -> None:
    from streamtune.devtools.demo.view import AccuracyBook

    book = AccuracyBook()
    book.result("a", 1, "positive", at=1.0)
    book.result("b", 1, "negative", at=5.0)
    book.result("c", 2, "neutral", at=6.0)
    for eid, label in (("a", "positive"), ("b", "positive"), ("c", "neutral")):
        book.label(eid, label, drifted=True)
    assert book.by_version() == {1: (1, 2), 2: (1, 1)}
    assert book.by_version(since=4.0) == {1: (0, 1), 2: (1, 1)}

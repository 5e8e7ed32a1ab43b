"""`streamtune demo` end to end: embedded stack, scorer, trainer, drift, canary, operator."""

from __future__ import annotations

import pytest

from streamtune.core.settings import Settings
from streamtune.devtools.demo.main import DemoOptions, DemoState, run_demo
from streamtune.rollout.registry import LocalRegistry

pytestmark = pytest.mark.integration


def operator_acted(st: DemoState) -> bool:
    return any("operator:" in line and "review_sentiment" in line for line in st.timeline.all)


def scorer_detections(st: DemoState) -> list[str]:
    """The scorer's detections of the review stream (class shares, confidence), not the trainer's
    error-rate one."""
    return [
        line
        for line in st.timeline.all
        if "detector: review_sentiment drift in" in line and "error_rate" not in line
    ]


def drift_detected(st: DemoState) -> bool:
    return bool(scorer_detections(st))


def both_speeds(st: DemoState) -> bool:
    lines = st.timeline.all
    fast = any("trainer (fast): review_sentiment v" in line and "gate PASSED" in line for line in lines)
    return fast and any("trainer (slow): review_sentiment v" in line for line in lines)


def done(st: DemoState) -> bool:
    return operator_acted(st) and drift_detected(st) and both_speeds(st)


def test_demo_goes_from_drift_to_a_trained_canary_and_an_operator_decision(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A permissive gate: this test is about the loop, not about whether 100 labels help. Every
    # candidate passes, so a release could come every fast interval; a new version starts with
    # fresh detectors (its answers differ by design), so none comes before the scorer's
    # detectors have seen v2 before the drift (250 reviews, ~90 s at ~3 reviews/s) and after it
    # (~30 s): the first fast run after 180 s, the first slow one after 500 labels (~170 s).
    base = Settings(trainer_margin=-1.0, trainer_reference_tolerance=1.0)
    opts = DemoOptions(
        duration=900, rate=20, drift_after=8, label_delay=2, train_after=500, train_budget=30, judge_min=15,
        fast_interval=180, live_view=False, until=done,
    )  # fmt: skip
    live = LocalRegistry(base.model.adapter_dir).latest("review_sentiment")  # the demo starts from it
    assert live is not None
    st = run_demo(base, opts)
    lines = "\n".join(st.timeline.all)
    assert "the review stream drifts" in lines
    # both speeds ran: the fast path (the linear stage, on its interval) and the slow one (after 500 labels)
    assert both_speeds(st), lines
    fast = st.speeds[("review_sentiment", "fast")]
    assert fast.passed and fast.version > live and fast.cost.endswith("s CPU"), lines
    slow = st.speeds[("review_sentiment", "slow")]
    assert slow.version > live and slow.labels > 0, lines
    canaries = [
        line
        for line in st.timeline.all
        if "scorer: review_sentiment v" in line and "in canary for 50%" in line
    ]
    assert canaries and ("(fast update)" in canaries[0] or "(slow update)" in canaries[0]), lines
    assert operator_acted(st), lines
    assert "canary" in "".join(st.story) and st.story["drift"] < min(
        v for k, v in st.story.items() if k != "drift"
    )
    # the scorer's detectors saw the review stream change (river ADWIN on what v2 answers)
    detected = scorer_detections(st)
    assert detected and "s after the drift began" in detected[0], lines
    judged = st.book.by_version(drifted_only=False)
    assert judged[live][1] >= 15 and sum(n for v, (_, n) in judged.items() if v > live) >= 15  # both served
    # Without the live view: progress lines and each timeline event as it happens, not only at the end.
    out = capsys.readouterr().out
    during, _, summary = out.partition("\ntimeline\n")
    assert summary, out[-2000:]
    assert "labels joined" in during and "query_class v" in during
    assert "the review stream drifts" in during and "in canary for 50%" in during
    assert "story: drift at" in summary

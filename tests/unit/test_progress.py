"""The stall decision behind /readyz (ops/progress.py), fed plain offsets and times the way the
scorer's health timer feeds it, and the readiness answer that carries its reason."""

from __future__ import annotations

from streamtune.core.settings import Settings
from streamtune.ops.progress import ProgressWatch, Stall, stall_reason
from streamtune.ops.telemetry import Readiness

CLICK_1 = ("events.click", 1)
CLICK_2 = ("events.click", 2)
REVIEW_0 = ("events.review", 0)


def test_the_default_limit_is_two_minutes() -> None:
    assert Settings().scorer.stall_after_s == 120.0


def test_lag_without_progress_beyond_the_limit_is_stalled() -> None:
    watch = ProgressWatch(after_s=120)
    for now in (0.0, 2.0, 60.0, 119.0):
        watch.observe(CLICK_1, position=60, highwater=70, now=now, committed=50)
    assert watch.stalled(119.0) == []  # not yet
    watch.observe(CLICK_1, position=60, highwater=75, now=130.0, committed=50)  # more arrive: still none done
    assert watch.stalled(130.0) == [Stall(CLICK_1, 130.0, 25)]


def test_progress_resets_the_clock() -> None:
    watch = ProgressWatch(after_s=120)
    watch.observe(CLICK_1, position=60, highwater=70, now=0.0, committed=50)
    watch.observe(CLICK_1, position=70, highwater=90, now=100.0, committed=51)  # one record done
    assert watch.stalled(200.0) == []  # 100 s since that commit
    watch.observe(CLICK_1, position=70, highwater=90, now=210.0, committed=51)
    assert watch.stalled(220.0) == [Stall(CLICK_1, 120.0, 39)]
    watch.observe(CLICK_1, position=90, highwater=90, now=222.0, committed=60)
    assert watch.stalled(222.0) == []


def test_no_lag_is_never_stalled() -> None:
    watch = ProgressWatch(after_s=120)
    for now in range(0, 1000, 2):  # idle: everything done, nothing new, for a long time
        watch.observe(CLICK_1, position=70, highwater=70, now=float(now), committed=70)
    assert watch.stalled(1000.0) == []
    # a record arrives after the long idle spell: its clock starts when it was last caught up
    watch.observe(CLICK_1, position=70, highwater=71, now=1000.0, committed=70)
    assert watch.stalled(1010.0) == []
    assert watch.stalled(998.0 + 120) == [Stall(CLICK_1, 120.0, 1)]


def test_a_rewound_batch_read_up_to_the_same_point_again_is_no_progress() -> None:
    """Without a committed offset the position stands in; a failing batch's rewind moves it back
    and re-reading moves it forward again, which must not count (the incident of issue 11)."""
    watch = ProgressWatch(after_s=120)
    watch.observe(CLICK_1, position=10, highwater=100, now=0.0)
    watch.observe(CLICK_1, position=50, highwater=100, now=10.0)  # read further: progress
    for now, pos in ((20.0, 20), (40.0, 50), (60.0, 20), (80.0, 50), (100.0, 20), (130.0, 50)):
        watch.observe(CLICK_1, position=pos, highwater=100, now=now)
    assert watch.stalled(130.0) == [Stall(CLICK_1, 120.0, 50)]


def test_the_first_commit_counts_as_progress_though_the_position_ran_ahead() -> None:
    watch = ProgressWatch(after_s=120)
    watch.observe(CLICK_1, position=900, highwater=1000, now=0.0)  # prefetched far ahead
    watch.observe(CLICK_1, position=900, highwater=1000, now=100.0, committed=10)  # first batch done
    watch.observe(CLICK_1, position=900, highwater=1000, now=150.0, committed=300)
    assert watch.stalled(200.0) == []
    watch.observe(CLICK_1, position=900, highwater=1000, now=250.0, committed=300)
    assert watch.stalled(270.0) == [Stall(CLICK_1, 120.0, 700)]


def test_one_stalled_partition_is_named_while_the_others_progress() -> None:
    watch = ProgressWatch(after_s=120)
    for i, now in enumerate(range(0, 200, 2)):
        watch.observe(CLICK_1, position=60, highwater=70, now=float(now), committed=50)
        watch.observe(CLICK_2, position=100 + i, highwater=200 + i, now=float(now), committed=100 + i)
        watch.observe(REVIEW_0, position=0, highwater=0, now=float(now), committed=None)
    assert [s.tp for s in watch.stalled(200.0)] == [CLICK_1]


def test_revoked_partitions_are_forgotten() -> None:
    watch = ProgressWatch(after_s=120)
    watch.observe(CLICK_1, position=60, highwater=70, now=0.0, committed=50)
    watch.observe(CLICK_2, position=60, highwater=70, now=0.0, committed=50)
    assert len(watch.stalled(200.0)) == 2
    watch.keep_only([CLICK_2])  # CLICK_1 moved to another scorer
    assert [s.tp for s in watch.stalled(200.0)] == [CLICK_2]
    watch.observe(CLICK_1, position=60, highwater=70, now=300.0, committed=50)  # assigned again
    assert [s.tp for s in watch.stalled(400.0)] == [CLICK_2]  # a fresh clock for CLICK_1
    assert [s.tp for s in watch.stalled(420.0)] == [CLICK_2, CLICK_1]  # longest first


def test_the_reason_names_each_partition_and_counts_the_rest() -> None:
    assert stall_reason([]) is None
    assert stall_reason([Stall(CLICK_1, 130.4, 52)]) == "stalled: events.click[1] for 130 s (lag 52)"
    many = [Stall(("events.click", p), 200.0 - p, 1) for p in range(8)]
    reason = stall_reason(many)
    assert reason is not None
    assert reason.startswith("stalled: events.click[0] for 200 s (lag 1), events.click[1] for 199 s")
    assert "events.click[5]" not in reason
    assert reason.endswith(" and 3 more")


def test_the_readiness_answer_carries_the_reason() -> None:
    ready = Readiness(adapters_loaded=True, partitions_assigned=True, redis_reachable=True)
    ready.beat()
    ready.problems["progress"] = stall_reason([])
    assert ready.check() == (True, "ready")
    watch = ProgressWatch(after_s=120)
    watch.observe(CLICK_1, position=60, highwater=70, now=0.0, committed=50)
    ready.problems["progress"] = stall_reason(watch.stalled(130.0))
    ready.problems["fallback"] = None  # another concern's key, resolved
    assert ready.check() == (False, "stalled: events.click[1] for 130 s (lag 20)")
    ready.redis_reachable = False
    assert ready.check() == (False, "redis unreachable; stalled: events.click[1] for 130 s (lag 20)")

"""The demo's pure helpers: cycled queries, start-up export lines, progress lines, and the
signals that stop it (no stack: ``tests/integration/test_demo*.py`` run the demo itself)."""

from __future__ import annotations

import json
import signal

import pytest

from streamtune.core.settings import Settings
from streamtune.core.tasks import TASK_NAMES
from streamtune.devtools.demo import replay
from streamtune.devtools.demo.main import stop_signals
from streamtune.devtools.demo.view import export_progress, progress_line

DATA = Settings().model.data_dir


def test_cycled_queries_repeat_the_data_set_with_fresh_ids() -> None:
    once = [ev for ev, _ in replay.search_events(DATA)]
    cycled = replay.search_events(DATA, cycle=True)
    rounds = [[next(cycled) for _ in once] for _ in range(3)]
    assert [ev.event_id for ev, _ in rounds[0]] == [ev.event_id for ev in once]  # round 0 unchanged
    ids = [ev.event_id for r in rounds for ev, _ in r]
    assert len(set(ids)) == len(ids)  # no repeat reads as a duplicate
    assert len({ev.session_id for r in rounds for ev, _ in r}) == len(ids)
    for r in rounds[1:]:
        assert [ev.query for ev, _ in r] == [ev.query for ev in once]
        assert all(lab is None or lab.event_id == ev.event_id for ev, lab in r)  # labels follow their ids


def test_a_plan_with_cycled_queries_runs_to_its_limit() -> None:
    n_queries = sum(1 for _ in replay.search_events(DATA))
    limit = n_queries + 37
    plain = [o for o in replay.plan(DATA, ["query_class"], limit) if o.valid]
    cycled = [o for o in replay.plan(DATA, ["query_class"], limit, cycle_queries=True) if o.valid]
    assert len(plain) == n_queries and len(cycled) == limit


def _line(**event: object) -> dict[str, object]:
    return event


def test_export_progress_names_each_export_and_counts_them() -> None:
    started = _line(event="export_started", task="review_sentiment", version=2, backend="onnx-fp32")
    line, done = export_progress(started, 0, 3)
    assert line is not None and "review_sentiment v2 (onnx-fp32)" in line and "export 1 of 3" in line
    assert done == 0
    finished = _line(event="export_done", task="review_sentiment", version=2, backend="onnx-fp32",
                     passed=True, agreement=0.998, seconds=61.2)  # fmt: skip
    line, done = export_progress(finished, 0, 3)
    assert line is not None and "61.2 s" in line and "0.998" in line and "passed" in line and done == 1
    refused = _line(event="export_done", task="query_class", version=1, backend="onnx-int8", passed=False)
    line, _ = export_progress(refused, 1, 3)
    assert line is not None and "REFUSED" in line
    line, _ = export_progress(started, 3, 3)  # more exports than planned: never "4 of 3"
    assert line is not None and "export 4 of 4" in line
    assert export_progress(_line(event="scorer_starting"), 2, 3) == (None, 2)


def test_progress_line_shows_every_task_even_before_its_first_result() -> None:
    line = progress_line(
        12.4, TASK_NAMES, {"review_sentiment": 1234.0}, {"review_sentiment": 9.5}, {"review_sentiment": 2.0},
        dead=3, joined=1000,
    )  # fmt: skip
    assert line.startswith("[   12 s]")
    assert (
        "review_sentiment v2 1,234 (9.5/s)" in line
        and "dead letters 3" in line
        and "labels joined 1,000" in line
    )
    assert all(task in line for task in TASK_NAMES)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signals_interrupt_once_then_shield_the_shutdown(sig: signal.Signals) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with stop_signals() as shield:
        with pytest.raises(KeyboardInterrupt, match=sig.name):
            signal.raise_signal(sig)
        # the first signal shielded the shutdown: a second (any of the three) is ignored
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            assert signal.getsignal(s) == signal.SIG_IGN
            signal.raise_signal(s)
        shield()  # idempotent
    assert {s: signal.getsignal(s) for s in before} == before  # restored


def test_other_site_reviews_come_from_the_stream_side_with_star_labels() -> None:
    from streamtune.datasets import other_sites

    events = list(replay.other_site_events())
    stream, held = other_sites.split(other_sites.load())
    assert len(events) == len(stream) > 2000
    assert {ev.text for ev, _ in events}.isdisjoint({r.text for r in held})  # never the held-out side
    assert {lab.label for _, lab in events} == {1, 5}
    assert {ev.product_id for ev, _ in events} == {"amazon-site", "imdb-site", "yelp-site"}
    assert len({ev.event_id for ev, _ in events}) == len(events)
    # a plan skips per task: the other sites start from their first row while clicks move on
    outs = list(replay.plan(DATA, ["review_sentiment", "purchase_intent"], 3, skip={"purchase_intent": 5},
                            reviews="other_sites"))  # fmt: skip
    reviews = [json.loads(o.value)["event_id"] for o in outs if o.task == "review_sentiment"]
    assert reviews == [ev.event_id for ev, _ in events[:3]]


def test_accuracy_over_time_is_per_version_and_window() -> None:
    from streamtune.devtools.demo.view import AccuracyBook, accuracy_over_time

    book = AccuracyBook()
    for i, (version, at, right) in enumerate(
        [(2, 1.0, True), (2, 2.0, False), (2, 35.0, True), (3, 40.0, True)]
    ):
        book.result(f"e{i}", version, "positive", at=100.0 + at)
        book.label(f"e{i}", "positive" if right else "negative", drifted=False)
    book.result("unlabelled", 2, "positive", at=101.0)
    cells = book.over_time(100.0, 30.0, 160.0)
    assert cells == {2: [(1, 2), (1, 1)], 3: [(0, 0), (1, 1)]}
    assert accuracy_over_time(cells) == ["v2: 0.50 1.00", "v3:   ·  1.00"]


def test_fast_updates_are_read_from_the_trainer_log(tmp_path: object) -> None:
    from pathlib import Path

    from streamtune.devtools.demo.view import fast_update_of
    from streamtune.devtools.workers import LogTail

    log = Path(str(tmp_path)) / "trainer.log"
    done = {"event": "fast_update_done", "task": "review_sentiment", "outcome": "released", "version": 4,
            "reason": "holdout macro_f1 0.71 vs live 0.66", "cpu_seconds": 3.4, "fresh": 144}  # fmt: skip
    log.write_text("starting\n" + json.dumps({"event": "other"}) + "\n" + json.dumps(done) + '\n{"event": ')
    follower = LogTail(log)
    records = follower.records()
    assert [r["event"] for r in records] == ["other", "fast_update_done"]  # the half line waits
    up = fast_update_of(records[1], 7.0)
    assert up is not None and (up.version, up.passed, up.labels, up.cost) == (4, True, 144, "3.4 s CPU")
    assert fast_update_of(records[0], 7.0) is None
    with log.open("a") as f:
        f.write('"fast_update_done", "outcome": "rejected", "fresh": 60, "cpu_seconds": 1.0}\n')
    [late] = follower.records()
    refused = fast_update_of(late, 8.0)
    assert refused is not None and not refused.passed and refused.reason.startswith("rejected")


def test_the_story_line_tells_what_happened_after_the_drift() -> None:
    from streamtune.devtools.demo.main import DemoState, story_line

    st = DemoState(started=100.0)
    assert story_line(st) == "story: the stream never drifted"
    st.story.update({"drift": 115.0, "detected": 140.0, "fast_canary": 150.0, "fast_live": 190.0})
    st.mark("detected", 170.0)  # the first one stays
    line = story_line(st)
    assert line.startswith(
        "story: drift at 15 s; detected +25 s; fast update in canary +35 s; fast update live +75 s"
    )
    assert "slow update live: not reached" in line


def test_a_log_line_is_a_record_only_when_it_holds_a_json_object() -> None:
    from streamtune.devtools.workers import json_record

    assert json_record('2026-12-04 04:20:00 {"event": "x", "level": "warning"}') == {
        "event": "x",
        "level": "warning",
    }
    for other in ("not json", "[1, 2]", '{"event": ', ""):
        assert json_record(other) is None

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


def _line(**event: object) -> str:
    return json.dumps(event)


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
    for other in ("not json", "[1, 2]", _line(event="scorer_starting")):
        assert export_progress(other, 2, 3) == (None, 2)


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

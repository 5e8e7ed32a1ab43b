from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from streamtune.core.features import (
    FEATURE_DIM,
    SessionState,
    apply_click,
    is_expired,
    session_row,
    vectorize,
)
from streamtune.core.settings import Settings
from streamtune.datasets.loaders import load_sessions
from streamtune.devtools.demo.replay import session_clicks


def _fold(clicks: list) -> SessionState:  # type: ignore[type-arg]
    state = None
    for offset, c in enumerate(clicks):
        state, applied = apply_click(state, c, 0, offset)
        assert applied
    assert state is not None
    return state


@pytest.mark.parametrize("index", [0, 1, 5, 17, 101, 2024])
def test_replayed_clicks_reproduce_the_dataset_row(index: int) -> None:
    row = load_sessions(Settings().model.data_dir)[index]
    clicks = session_clicks(row)
    if not clicks:
        pytest.skip("row has no page views")
    got = session_row(_fold(clicks))
    for col, value in got.items():
        assert value == pytest.approx(float(row[col]), rel=1e-6, abs=1e-6), col


def test_redelivered_click_is_not_counted_twice() -> None:
    row = load_sessions(Settings().model.data_dir)[1]
    clicks = session_clicks(row)
    state, _ = apply_click(None, clicks[0], 0, 10)
    again, applied = apply_click(state, clicks[0], 0, 10)
    assert not applied and again == state and again.page_views == 1
    older, applied = apply_click(state, clicks[0], 0, 3)
    assert not applied and older.page_views == 1


def test_vector_has_fixed_width() -> None:
    row = load_sessions(Settings().model.data_dir)[3]
    assert len(vectorize(row)) == FEATURE_DIM
    assert len(vectorize(session_row(SessionState()))) == FEATURE_DIM


def test_expiry_after_inactivity() -> None:
    row = load_sessions(Settings().model.data_dir)[1]
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    click = session_clicks(row, now=t0)[0]
    state, _ = apply_click(None, click, 0, 0)
    assert not is_expired(state, (t0 + timedelta(minutes=29)).timestamp(), 1800)
    assert is_expired(state, (t0 + timedelta(minutes=31)).timestamp(), 1800)

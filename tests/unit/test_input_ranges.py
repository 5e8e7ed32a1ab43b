"""Values in range at the door (issue 11): input events with non-finite or float32-overflowing
numbers, or times outside 1970 .. now + ``max_future_skew_s``, are dead-lettered by the ordinary
validation path; nothing an accepted click adds up to makes a NaN or infinite model input."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from streamtune.core.decode import Decoded, Source, decode
from streamtune.core.events import (
    FLOAT32_LIMIT,
    MAX_FUTURE_SKEW_S,
    ClickEvent,
    DeadLetter,
    LabelEvent,
    ReviewEvent,
    SearchEvent,
    event_time_problem,
)
from streamtune.core.features import (
    FEATURE_LIMIT,
    SessionState,
    apply_click,
    clip,
    session_row,
    vectorize,
)
from streamtune.core.settings import Settings
from streamtune.datasets import loaders

SRC = Source("events.click", 0, 5, b"s1")
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TS = "2026-11-28T12:00:00Z"
CLICK: dict[str, Any] = {
    "event_id": "c1", "ts": TS, "session_id": "s1", "page_type": "product", "duration_s": 12.5,
    "page_value": 0.0, "bounce_rate": 0.02, "exit_rate": 0.05, "month": 11, "visitor_type": "returning",
    "weekend": False, "special_day": 0.0, "traffic_type": 2, "region": 1, "browser": 2, "operating_system": 2,
}  # fmt: skip
REVIEW: dict[str, Any] = {"event_id": "r1", "ts": TS, "product_id": "p1", "text": "Lovely"}
SEARCH: dict[str, Any] = {"event_id": "q1", "ts": TS, "session_id": "s1", "query": "oak desk"}
LABEL: dict[str, Any] = {"event_id": "r1", "task": "review_sentiment", "label": 4, "ts": TS}
MODELS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "review": (ReviewEvent, REVIEW),
    "search": (SearchEvent, SEARCH),
    "click": (ClickEvent, CLICK),
    "label": (LabelEvent, LABEL),
}


def refused(model: type[Any], raw: bytes, **kw: Any) -> DeadLetter:
    out = decode(model, raw, SRC, now=NOW, **kw)
    assert isinstance(out, DeadLetter), f"accepted: {raw[:200]!r}"
    assert out.stage == "validate"
    return out


def click_json(field: str, literal: str) -> bytes:
    """A click whose ``field`` is a raw JSON token (``NaN``, ``Infinity``: not JSON, but accepted
    by the decoder; json.dumps would write them as well)."""
    body = json.dumps({k: v for k, v in CLICK.items() if k != field})
    return (body[:-1] + f', "{field}": {literal}}}').encode()


# ---------------------------------------------------------------------------------------------
# numbers


@pytest.mark.parametrize("field", ["page_value", "duration_s", "bounce_rate", "exit_rate", "special_day"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_refused_naming_the_field(field: str, literal: str) -> None:
    dl = refused(ClickEvent, click_json(field, literal))
    assert dl.error == f"{field}: Input should be a finite number", dl.error


@pytest.mark.parametrize("value", ["1e39", "3.4000001e38", "1.7e308"])
def test_page_values_beyond_float32_are_refused(value: str) -> None:
    dl = refused(ClickEvent, click_json("page_value", value))
    assert dl.error.startswith("page_value:") and "float32" in dl.error, dl.error


def test_the_float32_bound_itself_is_accepted() -> None:
    out = decode(ClickEvent, click_json("page_value", repr(FLOAT32_LIMIT)), SRC, now=NOW)
    assert isinstance(out, Decoded) and out.event.page_value == FLOAT32_LIMIT


@pytest.mark.parametrize("field", ["rating"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e39"])
def test_review_numbers_must_be_finite_and_in_range(field: str, literal: str) -> None:
    body = json.dumps(REVIEW)[:-1] + f', "{field}": {literal}}}'
    assert refused(ReviewEvent, body.encode()).error.startswith(f"{field}:")


@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
def test_a_label_value_must_be_finite(literal: str) -> None:
    body = json.dumps({k: v for k, v in LABEL.items() if k != "label"})[:-1] + f', "label": {literal}}}'
    refused(LabelEvent, body.encode())


# ---------------------------------------------------------------------------------------------
# times


def test_the_time_window_rule() -> None:
    now = NOW.timestamp()
    day = MAX_FUTURE_SKEW_S
    assert event_time_problem(datetime(1970, 1, 1, tzinfo=UTC), now, day) is None
    assert "before 1970" in (
        event_time_problem(datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), now, day) or ""
    )
    assert event_time_problem(NOW + timedelta(seconds=day), now, day) is None
    assert "ahead" in (event_time_problem(NOW + timedelta(seconds=day + 1), now, day) or "")
    assert event_time_problem(NOW + timedelta(seconds=1), now, 0.0) is not None
    # .timestamp() raises for these (naive times are local); the rule says why instead
    assert event_time_problem(datetime(1, 1, 1), now, day) is not None
    assert event_time_problem(datetime(9999, 12, 31, 23, 59, 59), now, day) is not None
    assert event_time_problem(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))), now, day) is not None


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    "ts", ["0001-01-01T00:00:00", "0001-01-01T00:00:00Z", "1969-12-31T23:59:59Z", "9999-12-31T23:59:59"]
)
def test_times_outside_the_window_are_refused(name: str, ts: str) -> None:
    model, payload = MODELS[name]
    dl = refused(model, json.dumps({**payload, "ts": ts}).encode())
    assert dl.error.startswith("ts:"), dl.error


@pytest.mark.parametrize("name", list(MODELS))
def test_the_future_bound_is_the_configured_skew(name: str) -> None:
    model, payload = MODELS[name]
    raw = json.dumps({**payload, "ts": (NOW + timedelta(hours=2)).isoformat()}).encode()
    assert isinstance(decode(model, raw, SRC, now=NOW), Decoded)  # within the default day
    dl = refused(model, raw, max_future_skew_s=3600.0)
    assert "3600 s ahead" in dl.error


def test_models_built_in_code_get_the_default_bound() -> None:
    """Without a validation context (events built in code, e.g. replay) the default skew and the
    clock apply."""
    fields = {**CLICK, "ts": datetime.now(UTC) + timedelta(seconds=MAX_FUTURE_SKEW_S + 3600)}
    with pytest.raises(ValidationError, match="ts"):
        ClickEvent.model_validate(fields)
    assert ClickEvent.model_validate({**CLICK, "ts": datetime.now(UTC)}).ts.tzinfo is UTC


def test_naive_times_stay_naive_and_their_timestamp_works() -> None:
    """Today's behaviour is kept (a naive time is accepted, as is, and read as local time); an
    accepted event's ``.timestamp()`` never raises."""
    out = decode(ReviewEvent, json.dumps({**REVIEW, "ts": "2026-11-28T12:00:00"}).encode(), SRC, now=NOW)
    assert isinstance(out, Decoded) and out.event.ts.tzinfo is None
    assert out.event.ts.timestamp() == datetime(2026, 11, 28, 12).timestamp()


def test_the_setting_defaults_to_the_module_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().scorer.max_future_skew_s == MAX_FUTURE_SKEW_S
    monkeypatch.setenv("STREAMTUNE_MAX_FUTURE_SKEW_S", "60")
    assert Settings().scorer.max_future_skew_s == 60.0


# ---------------------------------------------------------------------------------------------
# session features


def extreme_click(i: int, page_type: str) -> ClickEvent:
    return ClickEvent.model_validate(
        {**CLICK, "event_id": f"c{i}", "page_type": page_type, "page_value": FLOAT32_LIMIT,
         "duration_s": 86_400.0, "bounce_rate": 1.0, "exit_rate": 1.0, "special_day": 1.0,
         "traffic_type": 1000, "region": 1000, "browser": 1000, "operating_system": 1000}
    )  # fmt: skip


def worst_case_mlp(x: np.ndarray) -> np.ndarray:
    """The click model's forward pass in float32 at its worst: standardised with the floor std
    (1e-6, training/bootstrap.py), then three linear layers of weight 1 (far above any trained
    weight) with ReLU, widths as in model/click.py."""
    h = (x.astype(np.float32) - np.float32(0.0)) / np.float32(1e-6)
    for width in (64, 32):
        h = np.maximum(h @ np.ones((h.shape[-1], width), dtype=np.float32), np.float32(0.0))
    out: np.ndarray = h @ np.ones((h.shape[-1], 1), dtype=np.float32)
    return out


def test_no_accepted_clicks_make_a_non_finite_model_input() -> None:
    state: SessionState | None = None
    pages = ["administrative", "informational", "product"]
    for i in range(3000):
        state, _ = apply_click(state, extreme_click(i, pages[i % 3]), 0, i)
    assert state is not None
    row = session_row(state)
    assert all(np.isfinite(np.float32(v)) for v in row.values()), row
    x = np.asarray([vectorize(row)], dtype=np.float32)
    assert np.isfinite(x).all() and np.abs(x).max() <= FEATURE_LIMIT
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.isfinite(worst_case_mlp(x)).all()


def test_a_state_that_overflowed_still_gives_finite_features() -> None:
    """A state written before these bounds (an infinite or NaN sum) is clipped, not refused: a
    session has no single record to dead-letter, and refusing would fail the batch again."""
    state = SessionState(page_views=2, page_value_sum=float("inf"), bounce_sum=float("nan"))
    row = session_row(state)
    assert all(np.isfinite(np.float32(v)) for v in row.values()), row
    assert row["BounceRates"] == 0.0
    assert np.isfinite(np.asarray(vectorize(row), dtype=np.float32)).all()


def test_clip() -> None:
    assert clip(float("nan"), 1.0) == 0.0
    assert clip(float("inf"), 5.0) == 5.0 and clip(float("-inf"), 5.0) == -5.0
    assert clip(0.25, 1.0) == 0.25


def test_clipping_leaves_the_shipped_sessions_unchanged() -> None:
    """The bounds are far from real data: every shipped row's numeric features are exactly what
    they were without clipping (log-scaled counts and durations, raw rates and page values)."""
    from streamtune.core.features import COUNT_COLUMNS, DURATION_COLUMNS, RATE_COLUMNS

    for row in loaders.load_sessions(Settings().model.data_dir):
        unclipped = [math.log1p(max(float(row[c]), 0.0)) for c in COUNT_COLUMNS + DURATION_COLUMNS]
        unclipped += [float(row[c]) for c in RATE_COLUMNS]
        assert vectorize(row)[: len(unclipped)] == unclipped, row["session_id"]


# The whole shipped data set replayed through the ranges: tests/integration/test_shipped_data.py

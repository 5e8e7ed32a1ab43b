"""Pure session aggregation for ``purchase_intent``.

A session's page views (click events) are folded into the columns of the UCI "Online Shoppers
Purchasing Intention" data set, so the model trained on those rows reads the same features live.
Rates and page values are averaged over the session's page views, counts and durations summed.

No NaN or infinity leaves :func:`session_row` or :func:`vectorize`, whatever accepted clicks
(``core/events.py`` bounds each one) add up to: a NaN feature made the click model return NaN,
which the result model refuses, so the batch failed for ever. Out-of-range values are *clipped*
rather than refused: a session is an aggregate that has already been written to the table, so
there is no single record to dead-letter, and a refusal here would fail the batch again on every
read. Clipping only ever touches sessions far outside anything real, where the model's answer is
saturated anyway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from streamtune.core.events import FLOAT32_LIMIT, ClickEvent

PAGE_COLUMNS = {
    "administrative": ("Administrative", "Administrative_Duration"),
    "informational": ("Informational", "Informational_Duration"),
    "product": ("ProductRelated", "ProductRelated_Duration"),
}
COUNT_COLUMNS = [c for c, _ in PAGE_COLUMNS.values()]
DURATION_COLUMNS = [d for _, d in PAGE_COLUMNS.values()]
RATE_COLUMNS = ["BounceRates", "ExitRates", "PageValues", "SpecialDay"]
# Categorical columns and how many one-hot slots each gets (values above fold into the last slot).
CATEGORICAL = {"Month": 12, "OperatingSystems": 8, "Browser": 13, "Region": 9, "TrafficType": 20}
BINARY_COLUMNS = ["ReturningVisitor", "Weekend"]
NUMERIC_COLUMNS = COUNT_COLUMNS + DURATION_COLUMNS + RATE_COLUMNS
# The columns version 1 of the click model reads. Later columns are only ever appended (see
# :func:`vectorize`), and a model reads the first ``dim`` columns it was trained on, so every
# version keeps serving from the same feature vector.
BASE_FEATURE_DIM = len(NUMERIC_COLUMNS) + sum(CATEGORICAL.values()) + len(BINARY_COLUMNS)
# Appended after the base columns: log page value and whether there is one, log mean duration per
# page of each page type, log pages in all, the product pages' share, log exit and bounce rates.
DERIVED_COLUMNS = (
    "log_page_value", "has_page_value",
    *(f"log_mean_{page}_duration" for page in PAGE_COLUMNS),
    "log_pages", "product_share", "log_exit_rate", "log_bounce_rate",
)  # fmt: skip
FEATURE_DIM = BASE_FEATURE_DIM + len(DERIVED_COLUMNS)
# A session row's values stay within float32 (what the model reads).
ROW_LIMIT = FLOAT32_LIMIT
# Each model feature stays within +-FEATURE_LIMIT. Counts and durations are log-scaled and rates
# are in [0, 1], so only PageValues can be large (the data set's largest is 361), and a mean of
# float32-sized page values would overflow the model's float32 arithmetic (inf - inf is the NaN
# this prevents). The click model standardises (std floored at 1e-6) then runs three small linear
# layers: from inputs within 1e6 its output stays many orders of magnitude below float32
# overflow, while a page value of 1e6 already saturates the model.
FEATURE_LIMIT = 1e6


def clip(value: float, limit: float) -> float:
    """``value`` within ``[-limit, limit]``; infinities go to the nearer bound, NaN to 0."""
    if math.isnan(value):
        return 0.0
    return min(max(value, -limit), limit)


class SessionState(BaseModel):
    """What the Faust table keeps per session. ``last_offset`` makes re-delivered clicks no-ops."""

    model_config = ConfigDict(frozen=True)

    page_views: int = 0
    counts: dict[str, int] = {k: 0 for k in PAGE_COLUMNS}
    durations: dict[str, float] = {k: 0.0 for k in PAGE_COLUMNS}
    bounce_sum: float = 0.0
    exit_sum: float = 0.0
    page_value_sum: float = 0.0
    special_day: float = 0.0
    month: int = 1
    returning: bool = False
    weekend: bool = False
    traffic_type: int = 1
    region: int = 1
    browser: int = 1
    operating_system: int = 1
    partition: int = -1  # source (and changelog) partition of the session
    last_offset: int = -1
    last_seen: float = 0.0  # epoch seconds of the latest click (event time)
    last_event_id: str = ""
    # The latest click time of this session that counts for its partition's watermark: clicks
    # clamped to the wall clock (dated ahead of it) do not. 0.0: none counted; None: a record
    # stored before this field existed, whose ``last_seen`` is taken instead.
    stream_seen: float | None = None


def apply_click(
    state: SessionState | None, click: ClickEvent, partition: int, offset: int
) -> tuple[SessionState, bool]:
    """Fold one click into the session. Returns the new state and whether it was applied.

    A click at or below the session's last applied offset is a re-delivery (at-least-once
    replay after a crash): the state is returned unchanged so no page view counts twice.
    A session's clicks share one partition (the topic is keyed by session id), so offsets order them.
    """
    s = state or SessionState()
    if offset <= s.last_offset:
        return s, False
    counts = dict(s.counts)
    durations = dict(s.durations)
    counts[click.page_type] += 1
    durations[click.page_type] += click.duration_s
    new = SessionState(
        page_views=s.page_views + 1,
        counts=counts,
        durations=durations,
        bounce_sum=s.bounce_sum + click.bounce_rate,
        exit_sum=s.exit_sum + click.exit_rate,
        page_value_sum=s.page_value_sum + click.page_value,
        special_day=click.special_day,
        month=click.month,
        returning=click.visitor_type == "returning",
        weekend=click.weekend,
        traffic_type=click.traffic_type,
        region=click.region,
        browser=click.browser,
        operating_system=click.operating_system,
        partition=partition,
        last_offset=offset,
        last_seen=click.ts.timestamp(),
        last_event_id=click.event_id,
        stream_seen=click.ts.timestamp(),
    )
    return new, True


def session_row(state: SessionState) -> dict[str, float]:
    """The session as one row of the shopping-sessions data set (same column names)."""
    n = max(state.page_views, 1)
    row: dict[str, float] = {}
    for page, (count_col, dur_col) in PAGE_COLUMNS.items():
        row[count_col] = clip(float(state.counts[page]), ROW_LIMIT)
        row[dur_col] = clip(float(state.durations[page]), ROW_LIMIT)
    row["BounceRates"] = clip(state.bounce_sum / n, 1.0)
    row["ExitRates"] = clip(state.exit_sum / n, 1.0)
    row["PageValues"] = clip(state.page_value_sum / n, ROW_LIMIT)
    row["SpecialDay"] = clip(state.special_day, 1.0)
    row["Month"] = float(state.month)
    row["OperatingSystems"] = float(state.operating_system)
    row["Browser"] = float(state.browser)
    row["Region"] = float(state.region)
    row["TrafficType"] = float(state.traffic_type)
    row["ReturningVisitor"] = 1.0 if state.returning else 0.0
    row["Weekend"] = 1.0 if state.weekend else 0.0
    return row


def vectorize(row: Mapping[str, Any]) -> list[float]:
    """Model input of one data-set row: log-scaled numerics, one-hot categoricals, binaries.

    Standardisation (mean/std) is part of the model so it travels with each adapter version.
    Every value is finite and within :data:`FEATURE_LIMIT` (see the module docstring).
    """
    out = [math.log1p(clip(max(float(row[c]), 0.0), ROW_LIMIT)) for c in COUNT_COLUMNS + DURATION_COLUMNS]
    out += [clip(float(row[c]), FEATURE_LIMIT) for c in RATE_COLUMNS]
    for col, slots in CATEGORICAL.items():
        onehot = [0.0] * slots
        idx = min(max(int(row[col]), 1), slots) - 1
        onehot[idx] = 1.0
        out += onehot
    out += [float(row[c]) for c in BINARY_COLUMNS]
    out += derived(row)
    return out


def derived(row: Mapping[str, Any]) -> list[float]:
    """The :data:`DERIVED_COLUMNS` of one row (finite, within :data:`FEATURE_LIMIT`)."""
    value = max(clip(float(row["PageValues"]), FEATURE_LIMIT), 0.0)
    counts = [max(clip(float(row[c]), ROW_LIMIT), 0.0) for c in COUNT_COLUMNS]
    durations = [max(clip(float(row[d]), ROW_LIMIT), 0.0) for d in DURATION_COLUMNS]
    pages = sum(counts)
    out = [math.log1p(value), 1.0 if value > 0 else 0.0]
    out += [math.log1p(d / max(c, 1.0)) for c, d in zip(counts, durations, strict=True)]
    out += [math.log1p(pages), counts[COUNT_COLUMNS.index("ProductRelated")] / max(pages, 1.0)]
    out += [math.log(max(clip(float(row[c]), 1.0), 0.0) + 1e-3) for c in ("ExitRates", "BounceRates")]
    return out


def is_expired(state: SessionState, stream_time: float, inactivity_s: float) -> bool:
    """Whether the session has had no click for more than ``inactivity_s`` at ``stream_time``.

    ``stream_time`` is the event time the stream has reached (the watermark of the session's
    partition, :mod:`streamtune.scorer.sessions`), not the wall clock: a scorer that reads the
    stream late must not drop sessions that are live in it.
    """
    return stream_time - state.last_seen > inactivity_s


def click_time(click: ClickEvent, now: float) -> float:
    """The time a click counts at for session expiry (``last_seen``, watermarks): its event time,
    but never after ``now``, the wall clock when it is applied (epoch seconds). A click dated
    ahead (up to ``max_future_skew_s`` passes the decoder) would otherwise keep its session alive
    until that date, and move its partition's watermark ahead of the stream."""
    return min(click.ts.timestamp(), now)


def vectorize_many(rows: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    return [vectorize(r) for r in rows]

"""Session state of the click task (``scorer/sessions.py``) over plain mappings: no Faust app."""

from __future__ import annotations

import contextlib
import json
from collections import UserDict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from streamtune.core.decode import Decoded, Source
from streamtune.core.events import ClickEvent
from streamtune.core.features import SessionState, apply_click
from streamtune.scorer.sessions import SessionStore

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LIMIT_S = 1800.0


def _click(
    session_id: str = "s1",
    n: int = 0,
    page_type: str = "product",
    ts: datetime = T0,
    duration_s: float = 10.0,
) -> ClickEvent:
    return ClickEvent.model_validate(
        {
            "event_id": f"{session_id}-{n}",
            "ts": ts,
            "session_id": session_id,
            "page_type": page_type,
            "duration_s": duration_s,
            "page_value": 2.5 * n,
            "bounce_rate": 0.1,
            "exit_rate": 0.2,
            "month": 11,
            "visitor_type": "returning",
            "weekend": n % 2 == 1,
            "special_day": 0.0,
            "traffic_type": 2,
            "region": 3,
            "browser": 4,
            "operating_system": 1 + n,
        }
    )


def _at(click: ClickEvent, partition: int, offset: int) -> Decoded[ClickEvent]:
    return Decoded(click, Source("events.click", partition, offset, click.session_id.encode()))


class RecordingTable(UserDict[str, Any]):
    """A mapping that records its writes, and whether each ran inside an attribution context."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, Any, Source | None]] = []
        self.current: Source | None = None

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes.append((key, value, self.current))
        super().__setitem__(key, value)


def _attributing(table: RecordingTable, calls: list[Source]) -> Any:
    @contextlib.contextmanager
    def attribute(src: Source) -> Iterator[None]:
        calls.append(src)
        table.current = src
        try:
            yield
        finally:
            table.current = None

    return attribute


# --- apply -----------------------------------------------------------------------------------


def test_first_click_creates_the_state() -> None:
    table: dict[str, Any] = {}
    store = SessionStore(table)
    assert store.state("s1") is None
    click = _click(page_type="informational", duration_s=7.5)
    (state,) = store.apply([_at(click, 2, 40)])
    assert state == apply_click(None, click, 2, 40)[0]
    assert state.page_views == 1 and state.counts["informational"] == 1
    assert state.durations["informational"] == 7.5
    assert state.partition == 2 and state.last_offset == 40
    assert state.last_seen == T0.timestamp() and state.last_event_id == "s1-0"
    assert list(table) == ["s1"]
    assert store.state("s1") == state


def test_written_json_is_the_model_dump() -> None:
    table: dict[str, Any] = {}
    (state,) = SessionStore(table).apply([_at(_click(), 0, 0)])
    assert table["s1"] == state.model_dump(mode="json")
    assert json.loads(json.dumps(table["s1"])) == table["s1"]  # plain JSON, as the table stores it
    assert SessionState.model_validate(table["s1"]) == state


def test_clicks_accumulate_in_order() -> None:
    table: dict[str, Any] = {}
    store = SessionStore(table)
    clicks = [
        _click("s1", 0, "administrative", duration_s=1.0),
        _click("s2", 0, "product", duration_s=5.0),
        _click("s1", 1, "product", duration_s=2.0),
        _click("s1", 2, "product", duration_s=3.0),
    ]
    states = store.apply([_at(c, 1, 10 + i) for i, c in enumerate(clicks)])
    assert [s.page_views for s in states] == [1, 1, 2, 3]  # each click's state right after it
    expected: dict[str, SessionState | None] = {"s1": None, "s2": None}
    for i, c in enumerate(clicks):
        expected[c.session_id], _ = apply_click(expected[c.session_id], c, 1, 10 + i)
        assert states[i] == expected[c.session_id]
    s1 = store.state("s1")
    assert s1 is not None
    assert s1.counts == {"administrative": 1, "informational": 0, "product": 2}
    assert s1.durations["product"] == 5.0 and s1.page_value_sum == 2.5 * (1 + 2)
    assert s1.last_offset == 13 and s1.last_event_id == "s1-2" and s1.operating_system == 3
    assert table == {k: v.model_dump(mode="json") for k, v in expected.items() if v is not None}

    # a later batch continues from the stored state
    (more,) = store.apply([_at(_click("s2", 1, "informational"), 1, 20)])
    assert more.page_views == 2 and more.counts["informational"] == 1 and more.last_offset == 20
    assert store.state("s2") == more


def test_redelivered_click_is_neither_applied_nor_written() -> None:
    table = RecordingTable()
    calls: list[Source] = []
    store = SessionStore(table)
    attribute = _attributing(table, calls)
    first = store.apply([_at(_click("s1", 0), 0, 5), _at(_click("s1", 1), 0, 6)], attribute=attribute)
    assert len(table.writes) == 2
    stored = dict(table)

    again = store.apply(
        [_at(_click("s1", 1), 0, 6), _at(_click("s1", 0), 0, 5), _at(_click("s1", 0), 0, 2)],
        attribute=attribute,
    )
    assert again == [first[1]] * 3  # the stored state, unchanged: no page view counted twice
    assert again[0].page_views == 2
    assert len(table.writes) == 2 and len(calls) == 2  # nothing written, nothing attributed
    assert dict(table) == stored

    # a new click after the re-deliveries still applies
    (state,) = store.apply([_at(_click("s1", 2), 0, 7)], attribute=attribute)
    assert state.page_views == 3 and len(table.writes) == 3


def test_redelivery_within_one_batch() -> None:
    table = RecordingTable()
    c = _click("s1", 0)
    states = SessionStore(table).apply([_at(c, 0, 3), _at(c, 0, 3)])
    assert states[0] == states[1] and states[1].page_views == 1
    assert len(table.writes) == 1


def test_each_write_runs_inside_its_own_clicks_attribution() -> None:
    table = RecordingTable()
    calls: list[Source] = []
    decoded = [_at(_click("s1", 0), 0, 1), _at(_click("s2", 0), 1, 1), _at(_click("s1", 1), 0, 2)]
    SessionStore(table).apply(decoded, attribute=_attributing(table, calls))
    assert calls == [d.source for d in decoded]
    assert [(key, src) for key, _, src in table.writes] == [
        ("s1", decoded[0].source),
        ("s2", decoded[1].source),
        ("s1", decoded[2].source),
    ]
    assert table.current is None


def test_without_a_hook_writes_are_plain() -> None:
    table = RecordingTable()
    SessionStore(table).apply([_at(_click(), 0, 0)])
    assert [(key, src) for key, _, src in table.writes] == [("s1", None)]


def test_an_empty_stored_value_reads_as_no_session() -> None:
    table: dict[str, Any] = {"s1": None, "s2": {}}
    store = SessionStore(table)
    assert store.state("s1") is None and store.state("s2") is None
    (state,) = store.apply([_at(_click("s2"), 0, 0)])
    assert state.page_views == 1


def test_empty_batch() -> None:
    table = RecordingTable()
    assert SessionStore(table).apply([]) == []
    assert table.writes == []


# --- expiry ----------------------------------------------------------------------------------


def _store_with(sessions: dict[str, tuple[int, datetime]]) -> tuple[dict[str, Any], SessionStore]:
    """One click per session: id -> (partition, event time)."""
    table: dict[str, Any] = {}
    store = SessionStore(table)
    store.apply([_at(_click(sid, ts=ts), partition, 0) for sid, (partition, ts) in sessions.items()])
    return table, store


def test_expiry_returns_idle_sessions_of_owned_partitions_with_their_partition() -> None:
    now = T0 + timedelta(hours=1)
    table, store = _store_with(
        {
            "idle-p0": (0, T0),
            "idle-p2": (2, T0 + timedelta(minutes=10)),
            "fresh-p0": (0, now - timedelta(minutes=5)),
            "fresh-p2": (2, now),
            "idle-p1": (1, T0),  # partition not owned: another worker's to expire
        }
    )
    before = dict(table)
    got = store.expired({0, 2}, now.timestamp(), LIMIT_S)
    assert sorted(got) == [("idle-p0", 0), ("idle-p2", 2)]
    assert table == before  # nothing removed: the caller removes them


def test_sessions_of_partitions_not_owned_are_kept() -> None:
    _, store = _store_with({"a": (0, T0), "b": (1, T0)})
    later = (T0 + timedelta(days=1)).timestamp()
    assert store.expired(set(), later, LIMIT_S) == []
    assert store.expired({3}, later, LIMIT_S) == []
    assert store.expired({1}, later, LIMIT_S) == [("b", 1)]


def test_a_session_exactly_at_the_limit_is_kept() -> None:
    _, store = _store_with({"s1": (4, T0)})
    at_limit = T0.timestamp() + LIMIT_S
    assert store.expired({4}, at_limit, LIMIT_S) == []  # idle for exactly the limit: not expired
    assert store.expired({4}, at_limit + 0.001, LIMIT_S) == [("s1", 4)]
    assert store.expired({4}, T0.timestamp(), LIMIT_S) == []


def test_expiry_uses_the_stored_partition() -> None:
    """The changelog partition is the one the session's clicks came from, kept in its state."""
    table, store = _store_with({"s1": (7, T0)})
    assert table["s1"]["partition"] == 7
    assert store.expired({7}, (T0 + timedelta(hours=2)).timestamp(), LIMIT_S) == [("s1", 7)]


def test_expiry_over_an_empty_table() -> None:
    assert SessionStore({}).expired({0, 1}, T0.timestamp(), LIMIT_S) == []

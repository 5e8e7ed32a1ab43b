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
#
# Expiry follows each partition's event time (its watermark), not the wall clock; a partition
# without any click for IDLE_S of wall-clock time has all its sessions expired.

IDLE_S = 6 * 3600.0


def _sweep(store: SessionStore, owned: set[int], now: datetime) -> list[tuple[str, int]]:
    return sorted(store.expired(owned, now.timestamp(), LIMIT_S, idle_partition_s=IDLE_S))


def _store_with(
    sessions: dict[str, tuple[int, datetime]], now: datetime | None = None
) -> tuple[dict[str, Any], SessionStore]:
    """One click per session: id -> (partition, event time), applied at ``now`` (default: the
    latest event time, a stream without lag)."""
    table: dict[str, Any] = {}
    store = SessionStore(table)
    applied_at = now or max(ts for _, ts in sessions.values())
    store.apply(
        [_at(_click(sid, ts=ts), partition, 0) for sid, (partition, ts) in sessions.items()],
        now=applied_at.timestamp(),
    )
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
    assert _sweep(store, {0, 2}, now) == [("idle-p0", 0), ("idle-p2", 2)]
    assert table == before  # nothing removed: the caller removes them


def test_a_steady_stream_read_two_hours_late_expires_nothing_live() -> None:
    """The scorer reads the stream 2 h behind (a Redis outage, a backlog): the wall clock is far
    past every session's last click, but in the stream they are all live."""
    table: dict[str, Any] = {}
    store = SessionStore(table)
    lag = timedelta(hours=2)
    sessions = [f"s{i}" for i in range(4)]
    for minute in range(0, 60, 5):  # every session clicks every 5 min of event time
        ts = T0 + timedelta(minutes=minute)
        batch = [_at(_click(sid, minute, ts=ts), i % 2, minute) for i, sid in enumerate(sessions)]
        store.apply(batch, now=(ts + lag).timestamp())
        assert _sweep(store, {0, 1}, ts + lag) == []
    assert {sid: s["page_views"] for sid, s in table.items()} == dict.fromkeys(sessions, 12)


def test_a_session_idle_in_event_time_expires_while_the_others_stay() -> None:
    table: dict[str, Any] = {}
    store = SessionStore(table)
    lag = timedelta(hours=2)
    store.apply([_at(_click("quiet", ts=T0), 0, 0)], now=(T0 + lag).timestamp())
    offset = 1
    for minute in range(0, 50, 10):  # "busy" keeps clicking, "quiet" never again
        ts = T0 + timedelta(minutes=minute)
        store.apply([_at(_click("busy", minute, ts=ts), 0, offset)], now=(ts + lag).timestamp())
        offset += 1
    # watermark T0 + 40 min: quiet is 40 min idle in the stream, busy 0
    assert store.watermarks == {0: (T0 + timedelta(minutes=40)).timestamp()}
    assert _sweep(store, {0}, T0 + timedelta(minutes=40) + lag) == [("quiet", 0)]


def test_a_session_exactly_at_the_limit_is_kept() -> None:
    """Changed with stream-time expiry: the limit is measured from the partition's watermark
    (moved here by a second session's clicks), no longer from the wall clock."""
    _, store = _store_with({"s1": (4, T0)})
    wall = T0 + timedelta(hours=1)  # any wall clock within the partition idle limit
    store.apply([_at(_click("s2", 1, ts=T0 + timedelta(seconds=LIMIT_S)), 4, 1)], now=wall.timestamp())
    assert _sweep(store, {4}, wall) == []  # idle for exactly the limit: not expired
    at_limit = T0 + timedelta(seconds=LIMIT_S + 0.001)
    store.apply([_at(_click("s2", 2, ts=at_limit), 4, 2)], now=wall.timestamp())
    assert _sweep(store, {4}, wall) == [("s1", 4)]


def test_the_wall_clock_alone_expires_nothing_within_the_partition_idle_limit() -> None:
    """Changed with stream-time expiry (this used to expire at 30 min of wall clock): a
    partition's last sessions stay while no later click moves its watermark."""
    _, store = _store_with({"s1": (7, T0), "s2": (7, T0 - timedelta(hours=5))})
    assert _sweep(store, {7}, T0 + timedelta(hours=5)) == [("s2", 7)]  # 5 h behind the watermark
    assert _sweep(store, {7}, T0 + timedelta(seconds=IDLE_S)) == [("s2", 7)]


def test_an_idle_partition_expires_all_its_sessions_after_the_partition_limit() -> None:
    table: dict[str, Any] = {}
    store = SessionStore(table)
    store.apply([_at(_click("a", ts=T0), 0, 0), _at(_click("b", ts=T0), 0, 1)], now=T0.timestamp())
    store.apply([_at(_click("c", ts=T0), 1, 0)], now=T0.timestamp())
    # partition 1 keeps receiving clicks (of one session), partition 0 stops
    later = T0 + timedelta(seconds=IDLE_S)
    store.apply([_at(_click("c", 1, ts=later), 1, 1)], now=later.timestamp())
    assert _sweep(store, {0, 1}, later) == []  # idle for exactly the limit: kept
    just_after = later + timedelta(seconds=1)
    assert _sweep(store, {0, 1}, just_after) == [("a", 0), ("b", 0)]


def test_a_redelivered_click_keeps_its_partition_from_idling() -> None:
    table: dict[str, Any] = {}
    store = SessionStore(table)
    click = _at(_click("a", ts=T0), 0, 5)
    store.apply([click], now=T0.timestamp())
    replayed_at = T0 + timedelta(hours=5)
    assert store.apply([click], now=replayed_at.timestamp())[0].page_views == 1  # not applied
    assert store.watermarks == {0: T0.timestamp()}  # nor does it move the watermark
    assert _sweep(store, {0}, replayed_at + timedelta(seconds=IDLE_S)) == []
    assert _sweep(store, {0}, replayed_at + timedelta(seconds=IDLE_S + 1)) == [("a", 0)]


def test_a_future_dated_click_is_clamped_to_the_wall_clock() -> None:
    """A click dated 23 h ahead (the decoder lets up to max_future_skew_s through) counts as made
    when it is applied: it neither pushes the watermark ahead, expiring the live sessions of its
    partition, nor keeps its own session for a day."""
    table: dict[str, Any] = {}
    store = SessionStore(table)
    store.apply([_at(_click("other", ts=T0 - timedelta(minutes=10)), 0, 0)], now=T0.timestamp())
    (state,) = store.apply([_at(_click("early", ts=T0 + timedelta(hours=23)), 0, 1)], now=T0.timestamp())
    assert state.last_seen == T0.timestamp() and store.state("early") == state
    assert table["early"]["last_seen"] == T0.timestamp()  # the stored field, reused
    assert store.watermarks == {0: (T0 - timedelta(minutes=10)).timestamp()}  # not moved by it
    assert _sweep(store, {0}, T0) == []  # "other" is 10 min behind the clamped click: live

    # the stream goes on (dated right): "early" expires 30 min after it was applied, not in 23 h
    t = T0 + timedelta(seconds=LIMIT_S + 1)
    store.apply([_at(_click("next", ts=t), 0, 2)], now=t.timestamp())
    assert _sweep(store, {0}, t) == [("early", 0), ("other", 0)]


def test_a_future_dated_click_on_a_lagging_partition_expires_nothing() -> None:
    """A backlog read two hours late, then one click dated ahead of the wall clock: clamped, it
    would count as "now", two hours ahead of the stream. It must not lift the watermark, or every
    live session of the lagging partition expires at the next sweep, and not after a restart
    either (the watermark recomputed from the table leaves it out too)."""
    table: dict[str, Any] = {}
    store = SessionStore(table)
    now = T0 + timedelta(hours=2)
    late = [_at(_click(f"s{i}", ts=T0 + timedelta(minutes=i)), 0, i) for i in range(5)]
    store.apply(late, now=now.timestamp())
    ahead = _at(_click("ahead", ts=now + timedelta(hours=1)), 0, 5)
    (state,) = store.apply([ahead], now=now.timestamp())
    assert state.last_seen == now.timestamp()  # its own session counts it as made now
    assert store.watermarks == {0: (T0 + timedelta(minutes=4)).timestamp()}
    assert _sweep(store, {0}, now) == []
    restarted = SessionStore(table)
    assert _sweep(restarted, {0}, now) == []
    assert restarted.watermarks == store.watermarks
    # the stream catches up: the lagging sessions expire by stream time, "ahead" by its own
    t = now + timedelta(seconds=LIMIT_S + 1)
    store.apply([_at(_click("next", ts=t), 0, 6)], now=t.timestamp())
    assert sorted(k for k, _ in _sweep(store, {0}, t)) == ["ahead", "s0", "s1", "s2", "s3", "s4"]


def test_a_producer_clock_slightly_ahead_still_moves_the_watermark() -> None:
    """Clicks a second ahead of the scorer's clock (NTP skew) are the live stream, not future
    dates: leaving them out would freeze the watermark and keep every session for hours."""
    store = SessionStore({})
    for i in range(3):
        now = T0 + timedelta(minutes=40 * i)
        (state,) = store.apply(
            [_at(_click(f"s{i}", ts=now + timedelta(seconds=1)), 0, i)], now=now.timestamp()
        )
        assert state.last_seen == state.stream_seen == now.timestamp()  # clamped all the same
    assert store.watermarks == {0: (T0 + timedelta(minutes=80)).timestamp()}
    assert sorted(k for k, _ in _sweep(store, {0}, T0 + timedelta(minutes=80))) == ["s0", "s1"]


def test_a_session_stored_before_stream_seen_existed_seeds_from_last_seen() -> None:
    old = SessionState(partition=0, last_offset=3, last_seen=T0.timestamp()).model_dump(mode="json")
    del old["stream_seen"]
    store = SessionStore({"legacy": old})
    assert _sweep(store, {0}, T0) == []
    assert store.watermarks == {0: T0.timestamp()}


def test_a_click_dated_in_the_past_is_not_moved() -> None:
    (state,) = SessionStore({}).apply([_at(_click(ts=T0), 0, 0)], now=(T0 + timedelta(hours=3)).timestamp())
    assert state.last_seen == T0.timestamp()


def test_watermarks_are_recomputed_from_the_table_after_a_restart() -> None:
    table, before = _store_with(
        {
            "idle": (0, T0),
            "live": (0, T0 + timedelta(hours=1)),
            "p1": (1, T0 + timedelta(minutes=20)),
        },
        now=T0 + timedelta(hours=3),  # read late
    )
    restart = T0 + timedelta(hours=4)
    after = SessionStore(table)  # a restarted scorer: the table (changelog) and nothing else
    assert after.watermarks == {}
    assert _sweep(after, {0, 1}, restart) == [("idle", 0)]  # "live" set partition 0's watermark
    assert after.watermarks == before.watermarks
    # the idle clock of a recomputed partition starts at its first sweep
    assert _sweep(after, {0, 1}, restart + timedelta(seconds=IDLE_S)) == [("idle", 0)]
    assert _sweep(after, {0, 1}, restart + timedelta(seconds=IDLE_S + 1)) == [
        ("idle", 0),
        ("live", 0),
        ("p1", 1),
    ]


def test_a_recomputed_watermark_keeps_later_clicks() -> None:
    """Clicks applied after a restart but before its first sweep are not lost to the recompute."""
    table, _ = _store_with({"old": (0, T0)})
    after = SessionStore(table)
    t = T0 + timedelta(hours=1)
    after.apply([_at(_click("new", ts=t), 0, 1)], now=t.timestamp())
    assert _sweep(after, {0}, t) == [("old", 0)]
    assert after.watermarks == {0: t.timestamp()}


def test_sessions_of_partitions_not_owned_are_untouched() -> None:
    table, store = _store_with({"a": (0, T0), "b": (1, T0 - timedelta(hours=2)), "c": (1, T0)})
    before = dict(table)
    long_after = T0 + timedelta(days=1)  # past both limits, by event time and by partition idleness
    assert _sweep(store, {0}, long_after) == [("a", 0)]  # "b" and "c" are another worker's
    assert _sweep(store, set(), long_after) == []
    assert _sweep(store, {3}, long_after) == []
    assert table == before
    assert 1 not in store.watermarks  # forgotten, so never judged on stale memory


def test_a_partition_that_comes_back_is_recomputed_not_remembered() -> None:
    """A revoked partition is forgotten: when it is assigned again, hours later, its sessions (kept
    live by the other owner meanwhile) are judged on the table, not on this worker's stale
    idle clock."""
    table, store = _store_with({"a": (0, T0), "b": (1, T0)})
    assert _sweep(store, {0, 1}, T0) == []
    assert _sweep(store, {0}, T0 + timedelta(minutes=1)) == []  # partition 1 revoked
    assert 1 not in store.watermarks and 1 not in store.last_click_at
    # the other owner applies a click of "b" (it arrives here through the changelog)
    back = T0 + timedelta(hours=7)
    table["b"] = {
        **table["b"],
        "last_seen": back.timestamp(),
        "stream_seen": back.timestamp(),
        "page_views": 2,
    }
    assert _sweep(store, {0, 1}, back) == [("a", 0)]  # partition 0 idle for 7 h; "b" is live
    assert store.watermarks[1] == back.timestamp()


def test_a_partition_without_a_watermark_expires_nothing() -> None:
    store = SessionStore({})
    assert store.expired({0}, T0.timestamp(), LIMIT_S, idle_partition_s=IDLE_S) == []
    assert store.watermarks == {}


def test_expiry_skips_empty_stored_values() -> None:
    table, store = _store_with({"s1": (0, T0)})
    table["gone"] = None
    assert _sweep(store, {0}, T0 + timedelta(days=1)) == [("s1", 0)]


def test_expiry_over_an_empty_table() -> None:
    assert _sweep(SessionStore({}), {0, 1}, T0) == []

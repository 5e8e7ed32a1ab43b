from __future__ import annotations

import base64
import json

from streamtune.core.decode import Decoded, Source, decode, split
from streamtune.core.events import DeadLetter, ReviewEvent

SRC = Source("events.review", 1, 42, b"p1")
GOOD = {"event_id": "r1", "ts": "2026-11-28T12:00:00Z", "product_id": "p1", "text": "Lovely"}


def test_valid_event_decodes() -> None:
    out = decode(ReviewEvent, json.dumps(GOOD).encode(), SRC)
    assert isinstance(out, Decoded)
    assert out.event.product_id == "p1" and out.source.offset == 42


def test_invalid_json_says_so_with_offset() -> None:
    out = decode(ReviewEvent, b'{"event_id": ', SRC)
    assert isinstance(out, DeadLetter)
    assert out.error.startswith("invalid JSON")
    assert (out.source_topic, out.partition, out.offset, out.key) == ("events.review", 1, 42, "p1")
    assert out.raw == '{"event_id": '


def test_schema_violation_names_the_field() -> None:
    out = decode(ReviewEvent, json.dumps({**GOOD, "rating": 9}).encode(), SRC)
    assert isinstance(out, DeadLetter)
    assert "rating" in out.error


def test_oversize_text_is_refused() -> None:
    out = decode(ReviewEvent, json.dumps({**GOOD, "text": "x" * 10_001}).encode(), SRC)
    assert isinstance(out, DeadLetter) and "text" in out.error and "10000" in out.error


def test_non_utf8_keeps_raw_bytes_as_base64() -> None:
    raw = b"\xff\xfe{\x00}"
    out = decode(ReviewEvent, raw, SRC)
    assert isinstance(out, DeadLetter)
    assert out.raw is None and base64.b64decode(out.raw_b64 or "") == raw
    assert "UTF-8" in out.error


def test_empty_value() -> None:
    out = decode(ReviewEvent, None, SRC)
    assert isinstance(out, DeadLetter) and out.error == "empty value"


def test_split_keeps_valid_neighbours_and_order() -> None:
    recs = [
        (json.dumps({**GOOD, "event_id": f"r{i}"}).encode() if i % 3 else b"nope", Source("t", 0, i))
        for i in range(9)
    ]
    good, bad = split(ReviewEvent, recs)
    assert [g.event.event_id for g in good] == ["r1", "r2", "r4", "r5", "r7", "r8"]
    assert [b.offset for b in bad] == [0, 3, 6]

"""A dead letter always fits the producer's request size, whatever was refused (issue 11).

A ~1 MB invalid record used to produce a dead letter larger than the producer's max request
size; its send failed and the batch was read again for ever. The kept value and key are cut to
``dlq_max_raw_bytes`` (as JSON bytes, escapes counted), the whole value's size and sha256 kept.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import TypeAdapter

from streamtune.core.decode import (
    DLQ_MAX_RAW_BYTES,
    MAX_ERROR_BYTES,
    MAX_PROBLEMS,
    Decoded,
    Source,
    cut_text,
    dead_letter,
    decode,
    split,
)
from streamtune.core.events import DeadLetter, ReviewEvent, SearchEvent
from streamtune.core.settings import Settings

SRC = Source("events.review", 3, 77, b"p1")
TS = "2026-11-28T12:00:00Z"
PRODUCER_MAX_REQUEST = 1_048_576  # aiokafka's default max_request_size
LIMIT = DLQ_MAX_RAW_BYTES
JSON_STR = TypeAdapter(str)


def review(**fields: object) -> bytes:
    return json.dumps({"event_id": "r1", "ts": TS, "product_id": "p1", "text": "ok", **fields}).encode()


def json_bytes(text: str | None) -> int:
    """Bytes ``text`` takes in a dead letter's JSON (pydantic's own serializer, quotes excluded)."""
    assert text is not None
    return len(JSON_STR.dump_json(text)) - 2


def wire_size(dl: DeadLetter) -> int:
    return len(dl.model_dump_json().encode())


def test_a_1mb_invalid_record_makes_a_dead_letter_that_fits() -> None:
    raw = review(text="x" * 1_000_000)
    dl = decode(ReviewEvent, raw, SRC)
    assert isinstance(dl, DeadLetter) and "text" in dl.error
    assert wire_size(dl) <= 2 * LIMIT + 8192 < PRODUCER_MAX_REQUEST
    assert dl.raw_truncated and dl.raw is not None and raw.startswith(dl.raw.encode())
    assert json_bytes(dl.raw) <= LIMIT and len(dl.raw.encode()) > LIMIT - 64
    assert dl.raw_size == len(raw) and dl.raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert (dl.source_topic, dl.partition, dl.offset) == ("events.review", 3, 77)  # still findable
    assert dl.stage == "validate"


def test_a_small_record_is_kept_whole_with_its_size_and_hash() -> None:
    raw = review(rating=9)
    dl = decode(ReviewEvent, raw, SRC)
    assert isinstance(dl, DeadLetter)
    assert dl.raw == raw.decode() and not dl.raw_truncated and not dl.key_truncated
    assert dl.raw_size == len(raw) and dl.raw_sha256 == hashlib.sha256(raw).hexdigest()


def test_escapes_count_so_control_characters_cannot_grow_the_dead_letter() -> None:
    """Valid UTF-8 made of characters JSON escapes as six bytes each (\\u0000)."""
    raw = b'{"text": "' + b"\x00" * 500_000 + b'"}'
    dl = decode(ReviewEvent, raw, SRC)
    assert isinstance(dl, DeadLetter) and dl.stage == "decode"  # a raw NUL is invalid JSON
    assert dl.raw_truncated and json_bytes(dl.raw) <= LIMIT
    assert wire_size(dl) <= LIMIT + 8192


@pytest.mark.parametrize("char", ["é", "€", "😀"])
@pytest.mark.parametrize("limit", [256, 257, 258, 259, 1001])
def test_raw_is_cut_on_a_character_boundary(char: str, limit: int) -> None:
    raw = (char * 5000).encode()
    dl = dead_letter(raw, SRC, "x", max_raw_bytes=limit)
    assert dl.raw is not None and dl.raw_b64 is None and dl.raw_truncated
    kept = dl.raw.encode("utf-8")  # valid UTF-8: a str cut between characters
    assert raw.startswith(kept) and set(dl.raw) == {char}
    width = len(char.encode())
    assert limit - width < len(kept) <= limit


def test_non_utf8_bytes_are_cut_before_base64() -> None:
    raw = bytes(range(256)) * 4000  # ~1 MB, not UTF-8
    dl = decode(ReviewEvent, raw, SRC)
    assert isinstance(dl, DeadLetter) and dl.raw is None and dl.raw_b64 is not None
    assert dl.raw_truncated and len(dl.raw_b64) <= LIMIT
    kept = base64.b64decode(dl.raw_b64, validate=True)
    assert raw.startswith(kept) and len(kept) == LIMIT // 4 * 3
    assert dl.raw_size == len(raw) and dl.raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert wire_size(dl) <= LIMIT + 8192 and dl.stage == "decode"


def test_a_short_non_utf8_value_is_kept_whole() -> None:
    raw = b"\xff\xfe{\x00}"
    dl = decode(ReviewEvent, raw, SRC)
    assert isinstance(dl, DeadLetter) and base64.b64decode(dl.raw_b64 or "") == raw
    assert not dl.raw_truncated and dl.raw_size == 5


@pytest.mark.parametrize("key", [b"k" * 300_000, b"\xff" * 300_000, "€".encode() * 100_000])
def test_an_oversized_key_is_cut_the_same_way(key: bytes) -> None:
    dl = decode(ReviewEvent, b"nope", Source("events.review", 0, 1, key))
    assert isinstance(dl, DeadLetter) and dl.key_truncated and dl.key is not None
    assert json_bytes(dl.key) <= LIMIT
    assert key.decode("utf-8", "replace").startswith(dl.key)
    assert wire_size(dl) <= 2 * LIMIT + 8192


def test_the_limit_is_a_parameter_of_decode_and_split() -> None:
    raw = review(text="y" * 20_000)
    dl = decode(ReviewEvent, raw, SRC, max_raw_bytes=1000)
    assert isinstance(dl, DeadLetter) and dl.raw_truncated and json_bytes(dl.raw) <= 1000
    good, bad = split(ReviewEvent, [(raw, SRC), (review(), SRC)], max_raw_bytes=1000)
    assert len(good) == 1 and len(bad) == 1 and bad[0].raw_truncated and json_bytes(bad[0].raw) <= 1000


def test_a_long_error_is_bounded_and_counts_the_rest() -> None:
    raw = json.dumps(
        {"event_id": "q", "ts": TS, "session_id": "s", "query": "d", "shown_product_ids": list(range(900))}
    ).encode()
    dl = decode(SearchEvent, raw, SRC)
    assert isinstance(dl, DeadLetter)
    assert dl.error.count("shown_product_ids.") == MAX_PROBLEMS and dl.error.endswith(
        f"and {900 - MAX_PROBLEMS} more"
    )
    huge = dead_letter(None, SRC, "e" * 100_000)
    assert len(huge.error.encode()) <= MAX_ERROR_BYTES and huge.error.endswith("…")


def test_stage_says_decode_or_validate() -> None:
    def stage(raw: bytes | None) -> str | None:
        out = decode(ReviewEvent, raw, SRC)
        assert isinstance(out, DeadLetter)
        return out.stage

    assert stage(None) == "decode" and stage(b"") == "decode"
    assert stage(b"\xff{}") == "decode"  # not UTF-8
    assert stage(b'{"event_id": ') == "decode"  # invalid JSON
    assert stage(review(rating=9)) == "validate"
    assert dead_letter(b"x", SRC, "boom").stage == "decode"  # the default
    assert dead_letter(b"x", SRC, "boom", stage="model").stage == "model"


def test_cut_text_counts_json_bytes() -> None:
    assert cut_text("abc", 3) == ("abc", False)
    assert cut_text("abcd", 3) == ("abc", True)
    assert cut_text('a"b', 3) == ('a"', True)  # '"' is two bytes escaped
    assert cut_text("\x01\x02", 6) == ("\x01", True)
    assert cut_text("", 0) == ("", False)


def test_a_v1_dead_letter_without_the_new_fields_still_parses() -> None:
    old = {"source_topic": "t", "partition": 0, "offset": 1, "error": "x", "received_at": TS}
    dl = DeadLetter.model_validate_json(json.dumps(old))
    assert dl.raw_size is None and dl.raw_sha256 is None and dl.stage is None
    assert not dl.raw_truncated and not dl.key_truncated


def test_the_setting_defaults_to_the_module_default_and_reads_its_env_var(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().scorer.dlq_max_raw_bytes == DLQ_MAX_RAW_BYTES
    monkeypatch.setenv("STREAMTUNE_DLQ_MAX_RAW_BYTES", "4096")
    assert Settings().scorer.dlq_max_raw_bytes == 4096


def test_the_scorer_passes_its_settings_to_split() -> None:
    """``BatchProcessor.start`` decodes with the configured limits (a batch of refused records
    only: no model run, no Redis)."""
    from streamtune.ops.telemetry import ScorerMetrics
    from streamtune.scorer.pipeline import BatchProcessor

    settings = Settings(dlq_max_raw_bytes=1024, max_future_skew_s=60.0)
    proc = BatchProcessor(settings, None, None, None, None, ScorerMetrics())  # type: ignore[arg-type]
    ahead = (datetime.now(UTC) + timedelta(hours=1)).isoformat()  # inside the default day
    records = [
        (review(text="z" * 50_000), Source("events.review", 0, 0)),
        (review(ts=ahead), Source("events.review", 0, 1)),
    ]

    async def go() -> None:
        started = await proc.start("review_sentiment", records)
        assert [d.offset for d in started.bad] == [0, 1] and started.scoring is None
        assert started.bad[0].raw_truncated and json_bytes(started.bad[0].raw) <= 1024
        assert "ts" in started.bad[1].error and "60 s ahead" in started.bad[1].error

    asyncio.run(go())
    assert isinstance(decode(ReviewEvent, review(ts=ahead), SRC), Decoded)  # the default accepts it

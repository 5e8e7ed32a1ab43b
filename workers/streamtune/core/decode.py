"""Pure decode/validate stage: raw Kafka bytes to a typed event, or a dead letter saying why.

A dead letter must always fit the producer's request size, whatever was refused: a 1 MB record
used to make a larger dead letter, whose send failed, so the batch was read again for ever. The
kept ``raw`` (or ``raw_b64``) and ``key`` therefore each take at most ``max_raw_bytes`` bytes of
the dead letter's JSON (setting ``dlq_max_raw_bytes``; escapes counted, so a value of control
characters cannot grow six-fold), and the error at most :data:`MAX_ERROR_BYTES`; the whole
value's size and sha256 are recorded. The limits are parameters with module defaults, so these
functions stay pure; the workers pass their settings.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

from pydantic import BaseModel, ValidationError

from streamtune.core.events import MAX_FUTURE_SKEW_S, DeadLetter, validation_context

E = TypeVar("E", bound=BaseModel)

DLQ_MAX_RAW_BYTES = 64 * 1024  # default of the setting dlq_max_raw_bytes
MAX_ERROR_BYTES = 4096  # the error in words; a label's value can be quoted in it
MAX_PROBLEMS = 10  # problems listed by name in one error, then a count of the rest
ELLIPSIS = "…"


@dataclass(frozen=True, slots=True)
class Source:
    """Where a record came from; carried into logs and dead letters."""

    topic: str
    partition: int
    offset: int
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class Decoded(Generic[E]):
    event: E
    source: Source


def describe_validation_error(exc: ValidationError) -> str:
    """One readable line per problem: ``field: message`` (the first :data:`MAX_PROBLEMS`)."""
    parts = []
    errors = exc.errors(include_url=False)
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"]) or "(value)"
        if err["type"] == "json_invalid":
            return f"invalid JSON: {err['msg'].removeprefix('Invalid JSON: ')}"
        parts.append(f"{loc}: {err['msg']}")
    more = len(parts) - MAX_PROBLEMS
    return "; ".join(parts[:MAX_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")


def _json_cost(ch: str) -> int:
    """Bytes one character takes inside a JSON string: UTF-8, or its escape (at most six bytes)."""
    o = ord(ch)
    if o < 0x20:
        return 6
    if ch in '"\\':
        return 2
    return 1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4


def cut_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """The longest start of ``text`` that takes at most ``max_bytes`` bytes as a JSON string, and
    whether it was cut. Cut between characters, so the kept text stays valid UTF-8; the scan stops
    after ``max_bytes`` characters (each takes at least one byte), however long the text."""
    used = 0
    for i, ch in enumerate(text):
        used += _json_cost(ch)
        if used > max_bytes:
            return text[:i], True
    return text, False


def _kept(raw: bytes | None, max_bytes: int) -> tuple[str | None, str | None, bool]:
    """``(raw, raw_b64, truncated)`` of a dead letter: the text when it is UTF-8, else base64 of
    the bytes (cut before encoding, to whole 3-byte groups, so the base64 is at most ``max_bytes``)."""
    if raw is None:
        return None, None, False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        keep = max_bytes // 4 * 3
        return None, base64.b64encode(raw[:keep]).decode("ascii"), len(raw) > keep
    kept, cut = cut_text(text, max_bytes)
    return kept, None, cut


def dead_letter(
    raw: bytes | None,
    source: Source,
    error: str,
    now: datetime | None = None,
    stage: str = "decode",
    *,
    max_raw_bytes: int = DLQ_MAX_RAW_BYTES,
) -> DeadLetter:
    """A dead letter for ``raw`` that always fits: the value and key are cut to ``max_raw_bytes``
    (see the module docstring), with the whole value's size and sha256; ``stage`` says where it
    was refused (decode, validate, model, encode, sink, publish)."""
    text, b64, truncated = _kept(raw, max_raw_bytes)
    key, key_cut = (None, False)
    if source.key is not None:
        key, key_cut = cut_text(source.key.decode("utf-8", "replace"), max_raw_bytes)
    words, words_cut = cut_text(error, MAX_ERROR_BYTES - len(ELLIPSIS.encode()))
    return DeadLetter(
        source_topic=source.topic,
        partition=source.partition,
        offset=source.offset,
        key=key,
        error=words + ELLIPSIS if words_cut else words,
        raw=text,
        raw_b64=b64,
        received_at=now or datetime.now(UTC),
        raw_size=len(raw) if raw is not None else None,
        raw_sha256=hashlib.sha256(raw).hexdigest() if raw is not None else None,
        raw_truncated=truncated,
        key_truncated=key_cut,
        stage=stage,
    )


def decode(
    model: type[E],
    raw: bytes | None,
    source: Source,
    *,
    max_raw_bytes: int = DLQ_MAX_RAW_BYTES,
    max_future_skew_s: float = MAX_FUTURE_SKEW_S,
    now: datetime | None = None,
) -> Decoded[E] | DeadLetter:
    """Validate one record against its event model. Never raises for bad input.

    ``max_raw_bytes`` bounds what a dead letter keeps (setting ``dlq_max_raw_bytes``),
    ``max_future_skew_s`` how far ahead of ``now`` (default: the clock) an event time may be
    (setting ``max_future_skew_s``; passed to the models as validation context).
    """
    now = now or datetime.now(UTC)

    def refuse(error: str, stage: str) -> DeadLetter:
        return dead_letter(raw, source, error, now, stage, max_raw_bytes=max_raw_bytes)

    if raw is None or raw == b"":
        return refuse("empty value", "decode")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return refuse(f"value is not UTF-8 JSON ({e.reason} at byte {e.start})", "decode")
    try:
        event = model.model_validate_json(raw, context=validation_context(max_future_skew_s, now))
    except ValidationError as e:
        not_json = any(err["type"] == "json_invalid" for err in e.errors(include_url=False))
        return refuse(describe_validation_error(e), "decode" if not_json else "validate")
    return Decoded(event=event, source=source)


def split(
    model: type[E],
    records: list[tuple[bytes | None, Source]],
    *,
    max_raw_bytes: int = DLQ_MAX_RAW_BYTES,
    max_future_skew_s: float = MAX_FUTURE_SKEW_S,
) -> tuple[list[Decoded[E]], list[DeadLetter]]:
    """Decode a batch; valid and invalid records are separated, order kept within each.
    The limits are :func:`decode`'s."""
    good: list[Decoded[E]] = []
    bad: list[DeadLetter] = []
    now = datetime.now(UTC)  # one clock reading per batch
    for raw, source in records:
        result = decode(
            model, raw, source, max_raw_bytes=max_raw_bytes, max_future_skew_s=max_future_skew_s, now=now
        )
        (bad if isinstance(result, DeadLetter) else good).append(result)  # type: ignore[arg-type]
    return good, bad

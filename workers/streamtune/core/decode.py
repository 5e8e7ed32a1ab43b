"""Pure decode/validate stage: raw Kafka bytes to a typed event, or a dead letter saying why."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

from pydantic import BaseModel, ValidationError

from streamtune.core.events import DeadLetter

E = TypeVar("E", bound=BaseModel)


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
    """One readable line per problem: ``field: message``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(value)"
        if err["type"] == "json_invalid":
            return f"invalid JSON: {err['msg'].removeprefix('Invalid JSON: ')}"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _text(raw: bytes | None) -> tuple[str | None, str | None]:
    if raw is None:
        return None, None
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, base64.b64encode(raw).decode("ascii")


def dead_letter(raw: bytes | None, source: Source, error: str, now: datetime | None = None) -> DeadLetter:
    text, b64 = _text(raw)
    key = source.key.decode("utf-8", "replace") if source.key is not None else None
    return DeadLetter(
        source_topic=source.topic,
        partition=source.partition,
        offset=source.offset,
        key=key,
        error=error,
        raw=text,
        raw_b64=b64,
        received_at=now or datetime.now(UTC),
    )


def decode(model: type[E], raw: bytes | None, source: Source) -> Decoded[E] | DeadLetter:
    """Validate one record against its event model. Never raises for bad input."""
    if raw is None or raw == b"":
        return dead_letter(raw, source, "empty value")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return dead_letter(raw, source, f"value is not UTF-8 JSON ({e.reason} at byte {e.start})")
    try:
        event = model.model_validate_json(raw)
    except ValidationError as e:
        return dead_letter(raw, source, describe_validation_error(e))
    return Decoded(event=event, source=source)


def split(
    model: type[E], records: list[tuple[bytes | None, Source]]
) -> tuple[list[Decoded[E]], list[DeadLetter]]:
    """Decode a batch; valid and invalid records are separated, order kept within each."""
    good: list[Decoded[E]] = []
    bad: list[DeadLetter] = []
    for raw, source in records:
        result = decode(model, raw, source)
        (bad if isinstance(result, DeadLetter) else good).append(result)  # type: ignore[arg-type]
    return good, bad

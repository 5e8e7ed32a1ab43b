"""Typed models of every payload on our topics.

The JSON Schemas in ``schemas/`` are generated from these models (``streamtune schemas --write``)
and a test checks that the committed files equal what the models produce, so the two cannot drift.
Models are frozen; unknown fields are ignored so producers can add fields without breaking scorers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_REVIEW_TEXT = 10_000
MAX_TITLE = 1_000
MAX_QUERY = 512
MAX_ID = 128

# Input numbers must be finite and fit the float32 the click model runs in: one NaN or infinity
# would make the session features, then the model's output, NaN, and the batch fail for ever.
FLOAT32_LIMIT = 3.4e38
# How far ahead of the worker's clock an event time may be (setting ``max_future_skew_s``).
MAX_FUTURE_SKEW_S = 86_400.0
# Validation-context keys: ``decode`` passes the configured skew (and its clock) this way, since a
# pydantic model cannot read Settings; without a context the module default and the clock apply.
CONTEXT_MAX_FUTURE_SKEW_S = "max_future_skew_s"
CONTEXT_NOW = "now"

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# Input rates: as Probability, and NaN/infinity refused as "should be a finite number".
Rate = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]

TaskName = Literal["review_sentiment", "query_class", "purchase_intent"]
PageType = Literal["administrative", "informational", "product"]
VisitorType = Literal["returning", "new", "other"]
SentimentLabel = Literal["negative", "neutral", "positive"]


def event_time_problem(ts: datetime, now_s: float, max_future_skew_s: float) -> str | None:
    """Why an event time is outside the window the workers accept, or None when it is inside.

    The window is 1970-01-01T00:00:00Z to ``now_s + max_future_skew_s`` (epoch seconds). The
    check computes ``ts.timestamp()`` itself, the way every later stage does (a naive time is read
    as the worker's local time, as before), so an accepted event's ``.timestamp()`` cannot raise:
    a naive ``0001-01-01T00:00:00`` used to pass validation and raise later in the batch.
    """
    try:
        t = ts.timestamp()
    except (OverflowError, OSError, ValueError):
        return f"{ts.isoformat()} is out of range (earliest 1970-01-01T00:00:00Z)"
    if t < 0.0:
        return f"{ts.isoformat()} is before 1970-01-01T00:00:00Z"
    if t > now_s + max_future_skew_s:
        return f"{ts.isoformat()} is more than {max_future_skew_s:g} s ahead of the worker's clock"
    return None


def validation_context(max_future_skew_s: float, now: datetime | None = None) -> dict[str, Any]:
    """The context ``model_validate_json(..., context=...)`` takes to apply configured bounds."""
    ctx: dict[str, Any] = {CONTEXT_MAX_FUTURE_SKEW_S: max_future_skew_s}
    if now is not None:
        ctx[CONTEXT_NOW] = now
    return ctx


def _check_event_time(ts: datetime, info: ValidationInfo) -> datetime:
    ctx: Mapping[str, Any] = info.context if isinstance(info.context, Mapping) else {}
    now = ctx.get(CONTEXT_NOW)
    now_s = now.timestamp() if isinstance(now, datetime) else time.time()
    problem = event_time_problem(ts, now_s, float(ctx.get(CONTEXT_MAX_FUTURE_SKEW_S, MAX_FUTURE_SKEW_S)))
    if problem is not None:
        raise ValueError(problem)
    return ts


EventTime = Annotated[datetime, AfterValidator(_check_event_time)]
TS_DESCRIPTION = (
    "When the event happened (ISO-8601, UTC recommended; a time without offset is read as the "
    "worker's local time); from 1970-01-01T00:00:00Z to at most max_future_skew_s (default one "
    "day) ahead of the worker's clock"
)


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: Id = Field(description="Unique id of the event; results are keyed by it")
    ts: EventTime = Field(description=TS_DESCRIPTION)


class ReviewEvent(_Event):
    """A product review (topic ``events.review``)."""

    model_config = ConfigDict(title="review.v1", json_schema_extra={"$id": "review.v1.json"})

    product_id: Id
    text: str = Field(min_length=1, max_length=MAX_REVIEW_TEXT)
    title: str | None = Field(None, max_length=MAX_TITLE)
    user_id: Id | None = None
    rating: int | None = Field(None, ge=1, le=5)

    def model_text(self) -> str:
        """What the sentiment model reads: the title (when given) then the text."""
        return f"{self.title}. {self.text}" if self.title else self.text


class SearchEvent(_Event):
    """A product search (topic ``events.search``)."""

    model_config = ConfigDict(title="search.v1", json_schema_extra={"$id": "search.v1.json"})

    session_id: Id
    query: str = Field(min_length=1, max_length=MAX_QUERY)
    user_id: Id | None = None
    shown_product_ids: list[Id] | None = Field(None, max_length=1000)


class ClickEvent(_Event):
    """One page view of a shopping session (topic ``events.click``), with its session context."""

    model_config = ConfigDict(title="click.v1", json_schema_extra={"$id": "click.v1.json"})

    session_id: Id
    page_type: PageType
    duration_s: float = Field(ge=0.0, le=86_400.0, allow_inf_nan=False)
    page_value: float = Field(ge=0.0, allow_inf_nan=False, json_schema_extra={"maximum": FLOAT32_LIMIT})
    bounce_rate: Rate
    exit_rate: Rate
    month: int = Field(ge=1, le=12)
    visitor_type: VisitorType
    weekend: bool
    special_day: Rate
    traffic_type: int = Field(ge=1, le=1000)
    region: int = Field(ge=1, le=1000)
    browser: int = Field(ge=1, le=1000)
    operating_system: int = Field(ge=1, le=1000)

    @field_validator("page_value")
    @classmethod
    def _float32(cls, v: float) -> float:
        """A readable message (``le=`` would print 39 digits); the schema carries the maximum."""
        if v > FLOAT32_LIMIT:
            raise ValueError(f"{v:g} exceeds {FLOAT32_LIMIT:g}, the float32 range the click model runs in")
        return v


class LabelEvent(BaseModel):
    """A (late) ground-truth label for an earlier event or session (topic ``labels``).

    ``review_sentiment`` takes a sentiment name or a 1-5 rating, ``query_class`` a class name,
    ``purchase_intent`` 0 or 1 and a ``session_id``.
    """

    model_config = ConfigDict(
        frozen=True, extra="ignore", title="label.v1", json_schema_extra={"$id": "label.v1.json"}
    )

    event_id: Id | None = None
    session_id: Id | None = None
    task: TaskName
    label: str | int
    ts: EventTime = Field(description=TS_DESCRIPTION)

    @model_validator(mode="after")
    def _check(self) -> LabelEvent:
        if (self.event_id is None) == (self.session_id is None):
            raise ValueError("exactly one of event_id or session_id is required")
        from streamtune.core.tasks import TASKS  # the specs import these models

        spec = TASKS[self.task]
        if spec.labels_session and self.session_id is None:
            raise ValueError(f"{self.task} labels a session_id")
        error = spec.check_label(self.label)
        if error is not None:
            raise ValueError(error)
        return self

    @property
    def target(self) -> str:
        """The id this label names: its event's, or its session's (exactly one is set). The
        trainer joins on it (``training.online.label_key``) and judges served versions by it
        (``drift.served``); a text task's label that names a session joins nothing."""
        return self.event_id or self.session_id or ""


# ---------------------------------------------------------------------------------------------
# Output events


class AdapterRef(BaseModel):
    """Which adapter produced a result."""

    model_config = ConfigDict(frozen=True)

    task: TaskName
    version: int = Field(ge=1)


class ClassProbability(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str
    probability: Probability


AnswerPath = Literal["linear", "blend", "transformer"]
PATH_DESCRIPTION = (
    "Which model answered (text tasks): the version's linear stage alone, a blend of it with the"
    " transformer, or the transformer alone (every result of a version without a linear stage)."
    " Absent (null) from results written before this field existed"
)


class TermWeight(BaseModel):
    """A term of the text and how hard it pushed the linear stage towards the result's label."""

    model_config = ConfigDict(frozen=True)

    term: str
    weight: float = Field(ge=0.0)


class _Score(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: Id
    task: TaskName
    adapter: AdapterRef
    label: str = Field(description="The most likely class")
    event_ts: datetime
    scored_at: datetime


class ReviewScore(_Score):
    """Sentiment of one review (topic ``scores.review``, key ``product_id``)."""

    model_config = ConfigDict(title="score.review.v1", json_schema_extra={"$id": "score.review.v1.json"})

    product_id: Id
    probabilities: dict[SentimentLabel, Probability]
    path: AnswerPath | None = Field(None, description=PATH_DESCRIPTION)
    reasons: list[TermWeight] | None = Field(
        None,
        max_length=10,
        description="The terms that pushed the linear stage hardest towards the label, largest first"
        " (versions with a linear stage)",
    )


class SearchScore(_Score):
    """Product class of one search query (topic ``scores.search``, key ``session_id``)."""

    model_config = ConfigDict(title="score.search.v1", json_schema_extra={"$id": "score.search.v1.json"})

    session_id: Id
    top: list[ClassProbability] = Field(min_length=1, max_length=10, description="Best classes first")
    path: AnswerPath | None = Field(None, description=PATH_DESCRIPTION)


class ClickScore(_Score):
    """Purchase probability of a session after one page view (topic ``scores.click``, key ``session_id``)."""

    model_config = ConfigDict(title="score.click.v1", json_schema_extra={"$id": "score.click.v1.json"})

    session_id: Id
    purchase_probability: Probability
    page_views: int = Field(ge=1)


class DeadLetter(BaseModel):
    """An input the scorer could not use (topic ``events.dlq``). Nothing is dropped silently."""

    model_config = ConfigDict(frozen=True, title="dlq.v1", json_schema_extra={"$id": "dlq.v1.json"})

    source_topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    key: str | None = None
    error: str = Field(description="Why the event was refused, in words")
    raw: str | None = Field(None, description="The raw value when it is UTF-8")
    raw_b64: str | None = Field(None, description="The raw value, base64, when it is not UTF-8")
    received_at: datetime
    # Added in place (optional, v1 subscribers unaffected): a dead letter must fit the producer's
    # request size, so ``raw``/``raw_b64`` and ``key`` are cut to ``dlq_max_raw_bytes``; these
    # say what the whole value was. Find the record itself by source_topic/partition/offset.
    raw_size: int | None = Field(None, ge=0, description="Size of the whole raw value in bytes")
    raw_sha256: str | None = Field(
        None, pattern="^[0-9a-f]{64}$", description="sha256 (hex) of the whole raw value"
    )
    raw_truncated: bool = Field(
        False, description="raw (or raw_b64) holds only the start of the value (cut on a character boundary)"
    )
    key_truncated: bool = Field(False, description="key holds only the start of the record's key")
    stage: str | None = Field(
        None,
        description="Where it was refused: decode, validate, model, encode, sink or publish",
    )


SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "review.v1": ReviewEvent,
    "search.v1": SearchEvent,
    "click.v1": ClickEvent,
    "label.v1": LabelEvent,
    "score.review.v1": ReviewScore,
    "score.search.v1": SearchScore,
    "score.click.v1": ClickScore,
    "dlq.v1": DeadLetter,
}

"""Each scoring task described once: the rest of the code dispatches on its :class:`TaskSpec`.

A spec says what kind of model the task runs, which topic feeds it and how it is keyed, how the
model input is read from an event, which labels it predicts and how a label event names one,
the metric the release gate compares, the share of the shipped data held out, and how a batch's
model output becomes result events. Adding a text task is one more entry here (plus its data
loader and result model): see ``docs/architecture.md``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from streamtune.core import encode
from streamtune.core.events import ClickEvent, ReviewEvent, SearchEvent, TaskName
from streamtune.core.scored import Scored

DLQ_TOPIC = "events.dlq"
LABELS_TOPIC = "labels"
RELEASES_TOPIC = "adapters.releases"

SENTIMENTS = ("negative", "neutral", "positive")
CLICK_LABELS = ("no_purchase", "purchase")


class MetricFamily(enum.Enum):
    """Which quality metrics a task reports (``streamtune.training.metrics``)."""

    CLASSIFICATION = "classification"  # accuracy, macro-F1, log loss
    TOP_K = "top_k"  # top-1 / top-3 accuracy over many classes
    BINARY = "binary"  # ROC-AUC, PR-AUC, log loss of one probability


class TaskKind(enum.Enum):
    """What the model of a task reads."""

    TEXT = "text"  # one text per event: the shared encoder + the task's LoRA adapter + a head
    SESSION = "session"  # the session's features after each click: a small MLP + LoRA


# (events, scored, now, page views per event: session tasks only, else empty) -> results
ResultEncoder = Callable[[list[Any], Scored, datetime, Sequence[int]], list[encode.Result]]


def sentiment_of_rating(rating: int) -> str:
    return "negative" if rating <= 2 else "neutral" if rating == 3 else "positive"


def _sentiment_label(label: str | int) -> str:
    return sentiment_of_rating(label) if isinstance(label, int) else str(label)


def _check_sentiment(label: str | int) -> str | None:
    ok = label in (1, 2, 3, 4, 5) or label in SENTIMENTS
    return None if ok else "review_sentiment label is a 1-5 rating or negative/neutral/positive"


def _check_class(label: str | int) -> str | None:
    return None if isinstance(label, str) and label else "query_class label is a class name"


def _check_purchase(label: str | int) -> str | None:
    return None if label in (0, 1) else "purchase_intent labels a session_id with 0 or 1"


@dataclass(frozen=True, slots=True)
class TaskSpec:
    name: TaskName
    kind: TaskKind
    input_topic: str
    output_topic: str
    event_model: type[BaseModel]
    entity: str  # the field input events are keyed by, and output events too
    scorer_agent: str  # Faust agent names (stable: they name the agents' consumer state)
    trainer_agent: str
    gate_metric: str  # what the release gate compares (higher is better)
    held_out_percent: int  # share of the shipped data never trained on (by row id hash)
    labels: tuple[str, ...] | None  # fixed class names; None: learnt from the data
    label_of: Callable[[str | int], str]  # a label event's value as a class name
    check_label: Callable[[str | int], str | None]  # why a label value is invalid, or None
    results: ResultEncoder
    metric_family: MetricFamily
    data_file: str  # the shipped data set (under ``STREAMTUNE_DATA_DIR``) it is trained on
    prototype_head: bool = False  # head rows start at the embeddings of the class names
    text_of: Callable[[Any], str] | None = None  # TEXT tasks: what the model reads of an event
    reasons: int = 0  # terms explaining each result (from a version's linear stage); 0: none
    # ``streamtune train`` fits a linear stage and a cascade rule beside the transformer
    cascade: bool = False
    # 0: the rule is chosen on the validation split; K: on out-of-fold predictions of the whole
    # training split over K folds, for a task too small for a validation split
    # (``training/out_of_fold.py``; no validation split is carved then)
    rule_folds: int = 0

    @property
    def is_text(self) -> bool:
        return self.kind is TaskKind.TEXT

    @property
    def labels_session(self) -> bool:
        """Labels name a session (the whole session so far is the input), not an event."""
        return self.kind is TaskKind.SESSION

    def key_of(self, event: Any) -> str:
        """The entity key of an input event (product or session): routes canaries, keys outputs."""
        return str(getattr(event, self.entity))

    def model_text(self, event: Any) -> str:
        if self.text_of is None:
            raise TypeError(f"{self.name} is not a text task")
        return self.text_of(event)


def _text_results(encoder: Callable[[list[Any], Scored, datetime], list[encode.Result]]) -> ResultEncoder:
    """A text task's encoder (``encode.review_results``, ``encode.search_results``) as a
    :data:`ResultEncoder`: text events carry no page views (the pipeline passes an empty
    sequence), so the encoder does not take them and the fourth argument is dropped here.
    Session tasks' encoders take the page views and are used as they are."""

    def results(
        events: list[Any], scored: Scored, now: datetime, page_views: Sequence[int]
    ) -> list[encode.Result]:
        return encoder(events, scored, now)

    return results


REVIEW = TaskSpec(
    name="review_sentiment",
    kind=TaskKind.TEXT,
    input_topic="events.review",
    output_topic="scores.review",
    event_model=ReviewEvent,
    entity="product_id",
    scorer_agent="score-reviews",
    trainer_agent="trainer-reviews",
    gate_metric="macro_f1",
    held_out_percent=10,
    labels=SENTIMENTS,
    label_of=_sentiment_label,
    check_label=_check_sentiment,
    results=_text_results(encode.review_results),
    metric_family=MetricFamily.CLASSIFICATION,
    data_file="womens_clothing_reviews.csv",
    text_of=ReviewEvent.model_text,
    reasons=5,
    cascade=True,
)
QUERY = TaskSpec(
    name="query_class",
    kind=TaskKind.TEXT,
    input_topic="events.search",
    output_topic="scores.search",
    event_model=SearchEvent,
    entity="session_id",
    scorer_agent="score-searches",
    trainer_agent="trainer-searches",
    gate_metric="top1",
    held_out_percent=20,
    labels=None,
    label_of=str,
    check_label=_check_class,
    results=_text_results(encode.search_results),
    metric_family=MetricFamily.TOP_K,
    data_file="wands_queries.tsv",
    prototype_head=True,  # 188 classes, some with few or no training queries
    text_of=lambda ev: ev.query,
    cascade=True,  # it pays: docs/linear-stage.md ("query_class")
    rule_folds=5,  # 375 training rows: a validation split would hold about 38
)
CLICK = TaskSpec(
    name="purchase_intent",
    kind=TaskKind.SESSION,
    input_topic="events.click",
    output_topic="scores.click",
    event_model=ClickEvent,
    entity="session_id",
    scorer_agent="score-clicks",
    trainer_agent="trainer-clicks",
    gate_metric="roc_auc",
    held_out_percent=20,
    labels=CLICK_LABELS,
    label_of=lambda label: CLICK_LABELS[int(label)],
    check_label=_check_purchase,
    results=encode.click_results,
    metric_family=MetricFamily.BINARY,
    data_file="online_shoppers_intention.csv",
)

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (REVIEW, QUERY, CLICK)}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
TEXT_TASKS: tuple[str, ...] = tuple(name for name, spec in TASKS.items() if spec.is_text)

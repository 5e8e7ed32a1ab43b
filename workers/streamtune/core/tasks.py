"""The three scoring tasks: which topic feeds each, which model validates it, where results go."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from streamtune.core.events import ClickEvent, ReviewEvent, SearchEvent, TaskName


@dataclass(frozen=True, slots=True)
class TaskSpec:
    name: TaskName
    input_topic: str
    output_topic: str
    event_model: type[BaseModel]
    entity: str  # the field output events are keyed by


TASKS: dict[str, TaskSpec] = {
    "review_sentiment": TaskSpec(
        "review_sentiment", "events.review", "scores.review", ReviewEvent, "product_id"
    ),
    "query_class": TaskSpec("query_class", "events.search", "scores.search", SearchEvent, "session_id"),
    "purchase_intent": TaskSpec("purchase_intent", "events.click", "scores.click", ClickEvent, "session_id"),
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
DLQ_TOPIC = "events.dlq"
LABELS_TOPIC = "labels"
RELEASES_TOPIC = "adapters.releases"

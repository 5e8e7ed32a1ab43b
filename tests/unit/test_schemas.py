"""The committed JSON Schemas and the typed models are the same contract."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from streamtune.core import schemas
from streamtune.core.events import SCHEMA_MODELS

TS = "2026-11-28T12:00:00Z"
CLICK = {
    "event_id": "c1", "ts": TS, "session_id": "s1", "page_type": "product", "duration_s": 12.5,
    "page_value": 0.0, "bounce_rate": 0.02, "exit_rate": 0.05, "month": 11, "visitor_type": "returning",
    "weekend": False, "special_day": 0.0, "traffic_type": 2, "region": 1, "browser": 2, "operating_system": 2,
}  # fmt: skip
CASES: list[tuple[str, dict[str, Any]]] = [
    ("review.v1", {"event_id": "r1", "ts": TS, "product_id": "p1", "text": "Lovely dress"}),
    ("review.v1", {"event_id": "r1", "ts": TS, "product_id": "p1", "text": "ok", "title": "t", "rating": 5}),
    ("review.v1", {"event_id": "r1", "ts": TS, "product_id": "p1", "text": "ok", "rating": 6}),
    ("review.v1", {"event_id": "r1", "ts": TS, "product_id": "p1", "text": ""}),
    ("review.v1", {"event_id": "r1", "ts": TS, "product_id": "p1", "text": "x" * 10_001}),
    ("review.v1", {"event_id": "r1", "ts": TS, "product_id": "p1"}),
    ("search.v1", {"event_id": "q1", "ts": TS, "session_id": "s", "query": "oak desk"}),
    ("search.v1", {"event_id": "q1", "ts": TS, "session_id": "s", "query": "q" * 513}),
    ("search.v1", {"event_id": "q1", "ts": TS, "session_id": "s", "query": "d", "shown_product_ids": ["a"]}),
    ("search.v1", {"event_id": "q1", "ts": TS, "session_id": "s", "query": "d", "shown_product_ids": [1]}),
    ("click.v1", CLICK),
    ("click.v1", {**CLICK, "page_type": "checkout"}),
    ("click.v1", {**CLICK, "bounce_rate": 1.5}),
    ("click.v1", {**CLICK, "month": 13}),
    ("click.v1", {k: v for k, v in CLICK.items() if k != "visitor_type"}),
    ("click.v1", {**CLICK, "page_value": 1e39}),
    ("click.v1", {**CLICK, "page_value": 3.4e38}),
    ("label.v1", {"event_id": "r1", "task": "review_sentiment", "label": 4, "ts": TS}),
    ("label.v1", {"session_id": "s1", "task": "purchase_intent", "label": 1, "ts": TS}),
    ("label.v1", {"event_id": "r1", "task": "unknown", "label": 4, "ts": TS}),
    ("dlq.v1", {"source_topic": "events.review", "partition": 0, "offset": 5, "error": "x",
                "received_at": TS}),
    ("dlq.v1", {"source_topic": "events.review", "partition": -1, "offset": 5, "error": "x",
                "received_at": TS}),
    ("dlq.v1", {"source_topic": "events.review", "partition": 0, "offset": 5, "error": "x",
                "received_at": TS, "raw": "{", "raw_size": 1_000_000, "raw_sha256": "ab" * 32,
                "raw_truncated": True, "key_truncated": False, "stage": "validate"}),
    ("dlq.v1", {"source_topic": "events.review", "partition": 0, "offset": 5, "error": "x",
                "received_at": TS, "raw_sha256": "not hex"}),
    ("dlq.v1", {"source_topic": "events.review", "partition": 0, "offset": 5, "error": "x",
                "received_at": TS, "raw_size": -1}),
]  # fmt: skip


@pytest.mark.parametrize("name", list(SCHEMA_MODELS))
def test_committed_schema_equals_the_model(name: str) -> None:
    committed = (schemas.SCHEMA_DIR / f"{name}.json").read_text(encoding="utf-8")
    assert committed == schemas.render(name), (
        f"schemas/{name}.json is out of date: run `streamtune schemas --write`"
    )


@pytest.mark.parametrize(("name", "payload"), CASES)
def test_schema_and_model_agree_on_each_payload(name: str, payload: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(
        schemas.load(name), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    schema_ok = validator.is_valid(payload)
    try:
        SCHEMA_MODELS[name].model_validate_json(json.dumps(payload))
        model_ok = True
    except ValidationError:
        model_ok = False
    assert schema_ok == model_ok, f"{name}: schema says {schema_ok}, model says {model_ok} for {payload}"


def test_cases_cover_valid_and_invalid() -> None:
    verdicts = set()
    for name, payload in CASES:
        try:
            SCHEMA_MODELS[name].model_validate_json(json.dumps(payload))
            verdicts.add(True)
        except ValidationError:
            verdicts.add(False)
    assert verdicts == {True, False}


def test_label_rules_beyond_the_schema() -> None:
    from streamtune.core.events import LabelEvent

    with pytest.raises(ValidationError):
        LabelEvent.model_validate(
            {"event_id": "a", "session_id": "b", "task": "query_class", "label": "x", "ts": TS}
        )
    with pytest.raises(ValidationError):
        LabelEvent.model_validate({"session_id": "s", "task": "purchase_intent", "label": 3, "ts": TS})
    with pytest.raises(ValidationError):
        LabelEvent.model_validate({"event_id": "r", "task": "review_sentiment", "label": "great", "ts": TS})

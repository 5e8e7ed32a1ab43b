"""Hostile records a user found, built from valid ones: the poison mix of ``tests/integration/
test_poison.py`` and of ``streamtune chaos`` (scenario ``poison_mix``).

Each record says the stage at which the scorer must dead-letter it. The valid records whose ids
would break a Redis Cluster hash tag are returned apart: they must be *scored*, exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from streamtune.core.tasks import CLICK, REVIEW
from streamtune.devtools.demo.replay import Outgoing

HOSTILE_PRODUCTS = ("}evil{", "{}", "a:b\nc", "产品-42", "{tag}-1")


@dataclass(frozen=True)
class Poison:
    topic: str  # without the prefix
    key: bytes
    value: bytes
    stage: str  # where the scorer must dead-letter it
    what: str


def poison_records(outs: list[Outgoing], now: datetime | None = None) -> list[Poison]:
    """One of each hostile kind, built from the first valid click and review of ``outs``."""
    click: dict[str, Any] = json.loads(next(o for o in outs if o.task == CLICK.name and o.valid).value)
    review: dict[str, Any] = json.loads(next(o for o in outs if o.task == REVIEW.name and o.valid).value)
    now = now or datetime.now(UTC)
    sid = str(click["session_id"]).encode()
    big = dict(click, event_id="poison-big", page_value=1e39)
    inf = json.dumps(dict(click, event_id="poison-inf", page_value=0.0)).replace(
        '"page_value": 0.0', '"page_value": Infinity'
    )
    old = dict(review, event_id="poison-old", ts="0001-01-01T00:00:00")
    ahead = dict(review, event_id="poison-ahead", ts=(now + timedelta(days=10)).isoformat())
    huge = b'{"event_id": "poison-huge", "query": "' + b"x" * 900_000  # not even JSON
    return [
        Poison("events.click", sid, json.dumps(big).encode(), "validate", "page_value 1e39"),
        Poison("events.click", sid, inf.encode(), "validate", "page_value Infinity"),
        Poison("events.review", b"p", json.dumps(old).encode(), "validate", "ts 0001-01-01"),
        Poison("events.review", b"p", json.dumps(ahead).encode(), "validate", "ts ten days ahead"),
        Poison("events.search", b"s", huge, "decode", "900 kB, not JSON"),
    ]


def hostile_reviews(
    outs: list[Outgoing], per_product: int = 2, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Valid reviews of products whose ids hold braces, colons, newlines and non-ASCII."""
    review: dict[str, Any] = json.loads(next(o for o in outs if o.task == REVIEW.name and o.valid).value)
    ts = (now or datetime.now(UTC)).isoformat()
    return [
        dict(review, event_id=f"hostile-{i}-{n}", product_id=pid, ts=ts)
        for i, pid in enumerate(HOSTILE_PRODUCTS)
        for n in range(per_product)
    ]

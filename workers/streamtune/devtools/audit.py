"""What a run of known events left in Redis, checked against the events themselves.

Used by the fault-tolerance suite (``streamtune chaos``): every valid event must have a score
record (nothing lost), and every entity view must count each of its events exactly once
(nothing double counted), however often the scorers crashed, retried or rebalanced.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from streamtune.core.tasks import CLICK, REVIEW
from streamtune.devtools.demo.replay import Outgoing
from streamtune.scorer.sink import product_key, score_key, session_key


def event_id(out: Outgoing) -> str:
    return str(json.loads(out.value)["event_id"])


@dataclass
class Audit:
    expected: int
    scored: int
    missing: list[str] = field(default_factory=list)
    double_counted: list[str] = field(default_factory=list)  # entities whose view counts too much
    undercounted: list[str] = field(default_factory=list)  # entities whose view counts too little
    longest_gap_s: float = 0.0  # longest pause between consecutive results (scored_at)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.double_counted or self.undercounted)


@dataclass(frozen=True)
class _View:
    """An entity view in Redis that counts a task's results: what :func:`audit` checks."""

    entity_of: Callable[[Outgoing, dict[str, Any]], str]  # the entity a result counts towards
    key_of: Callable[[str], str]  # the entity's Redis hash
    counter: str  # the hash field counting
    message: str  # the report line: {entity}, {counted}, {n}


_VIEWS: dict[str, _View] = {
    REVIEW.name: _View(
        lambda o, rec: str(rec["product_id"]),
        product_key,
        "reviews",
        "product {entity}: {counted} for {n} reviews",
    ),
    CLICK.name: _View(
        lambda o, rec: o.key,
        session_key,
        "page_views",
        "session {entity}: {counted} page views for {n} clicks",
    ),
}


def _compare_counts(
    r: redis.Redis,
    result: Audit,
    expected: Mapping[str, int],
    key_of: Callable[[str], str],
    counter: str,
    message: str,
) -> None:
    """Compare the ``counter`` field of each entity's Redis hash (``key_of(entity)``) with the
    number of its scored events, ``expected[entity]``: a higher count goes to ``double_counted``,
    a lower one to ``undercounted``, as ``message`` formatted with ``entity``, ``counted`` and
    ``n`` (the expected count)."""
    for entity, n in expected.items():
        counted = int(r.hget(key_of(entity), counter) or 0)
        if counted > n:
            result.double_counted.append(message.format(entity=entity, counted=counted, n=n))
        elif counted < n:
            result.undercounted.append(message.format(entity=entity, counted=counted, n=n))


def audit(r: redis.Redis, outs: list[Outgoing]) -> Audit:
    """Check Redis against the valid events in ``outs`` (all of them are expected scored)."""
    valid = [o for o in outs if o.valid]
    keys = [score_key(o.task, event_id(o)) for o in valid]
    raw = [v for i in range(0, len(keys), 500) for v in r.mget(keys[i : i + 500])]
    result = Audit(expected=len(valid), scored=sum(v is not None for v in raw))
    expected: dict[str, dict[str, int]] = {task: defaultdict(int) for task in _VIEWS}
    times: list[datetime] = []
    for o, v in zip(valid, raw, strict=True):
        if v is None:
            result.missing.append(event_id(o))
            continue
        rec = json.loads(v)
        times.append(datetime.fromisoformat(rec["scored_at"]))
        if o.task in _VIEWS:
            expected[o.task][_VIEWS[o.task].entity_of(o, rec)] += 1
    for task, view in _VIEWS.items():
        _compare_counts(r, result, expected[task], view.key_of, view.counter, view.message)
    times.sort()
    result.longest_gap_s = max(((b - a).total_seconds() for a, b in itertools.pairwise(times)), default=0.0)
    return result

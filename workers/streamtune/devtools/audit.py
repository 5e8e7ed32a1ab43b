"""What a run of known events left in Redis, checked against the events themselves.

Used by the fault-tolerance suite (``streamtune chaos``): every valid event must have a score
record (nothing lost), and every entity view must count each of its events exactly once
(nothing double counted), however often the scorers crashed, retried or rebalanced.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

import redis

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


def audit(r: redis.Redis, outs: list[Outgoing]) -> Audit:
    """Check Redis against the valid events in ``outs`` (all of them are expected scored)."""
    valid = [o for o in outs if o.valid]
    keys = [score_key(o.task, event_id(o)) for o in valid]
    raw = [v for i in range(0, len(keys), 500) for v in r.mget(keys[i : i + 500])]
    result = Audit(expected=len(valid), scored=sum(v is not None for v in raw))
    by_product: dict[str, int] = defaultdict(int)
    by_session: dict[str, int] = defaultdict(int)
    times: list[datetime] = []
    for o, v in zip(valid, raw, strict=True):
        if v is None:
            result.missing.append(event_id(o))
            continue
        rec = json.loads(v)
        times.append(datetime.fromisoformat(rec["scored_at"]))
        if o.task == "review_sentiment":
            by_product[rec["product_id"]] += 1
        elif o.task == "purchase_intent":
            by_session[o.key] += 1
    for product, n in by_product.items():
        counted = int(r.hget(product_key(product), "reviews") or 0)
        if counted > n:
            result.double_counted.append(f"product {product}: {counted} for {n} reviews")
        elif counted < n:
            result.undercounted.append(f"product {product}: {counted} for {n} reviews")
    for session, n in by_session.items():
        counted = int(r.hget(session_key(session), "page_views") or 0)
        if counted > n:
            result.double_counted.append(f"session {session}: {counted} page views for {n} clicks")
        elif counted < n:
            result.undercounted.append(f"session {session}: {counted} page views for {n} clicks")
    times.sort()
    result.longest_gap_s = max(((b - a).total_seconds() for a, b in itertools.pairwise(times)), default=0.0)
    return result

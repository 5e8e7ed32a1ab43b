"""Pure encode stage: model output of a batch to score events and Redis updates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pydantic import BaseModel

from streamtune.core.events import (
    AdapterRef,
    AnswerPath,
    ClassProbability,
    ClickEvent,
    ClickScore,
    ReviewEvent,
    ReviewScore,
    SearchEvent,
    SearchScore,
    TermWeight,
)
from streamtune.core.scored import ANSWER_PATHS, Scored

TOP_K = 3
NEGATIVE = "negative"  # the sentiment whose reasons the product views count


@dataclass(frozen=True, slots=True)
class ProductUpdate:
    """One review's contribution to its product view (replaced, never added twice)."""

    product_id: str
    event_id: str
    label: str
    positive_probability: float
    terms: tuple[str, ...] = ()  # a negative review's reasons: counted in the product's view


@dataclass(frozen=True, slots=True)
class SessionUpdate:
    """The session view after a page view (absolute values, so a rewrite is harmless)."""

    session_id: str
    page_views: int
    purchase_probability: float
    event_id: str
    version: int


@dataclass(frozen=True, slots=True)
class Result:
    task: str
    event_id: str
    key: str  # entity key of the output event (product_id / session_id)
    score: BaseModel
    event_ts: datetime
    aggregate: ProductUpdate | SessionUpdate | None = None

    def payload(self) -> bytes:
        return self.score.model_dump_json().encode("utf-8")


def _refs(scored: Scored) -> list[AdapterRef]:
    """The adapter that produced each row (a canary splits a batch between two versions)."""
    cache: dict[int, AdapterRef] = {}
    out = []
    for v in scored.versions.tolist():
        if v not in cache:
            cache[v] = AdapterRef(task=scored.task, version=v)
        out.append(cache[v])
    return out


def _paths(scored: Scored) -> list[AnswerPath | None]:
    if scored.paths is None:
        return [None] * len(scored.versions)
    return [ANSWER_PATHS[int(c)] for c in scored.paths.tolist()]


def _reasons(scored: Scored) -> list[list[TermWeight] | None]:
    if scored.reasons is None:
        return [None] * len(scored.versions)
    return [
        None if row is None else [TermWeight(term=t, weight=round(w, 6)) for t, w in row]
        for row in scored.reasons
    ]


def review_results(events: list[ReviewEvent], scored: Scored, now: datetime) -> list[Result]:
    out = []
    pos = scored.labels.index("positive")
    rows = zip(events, scored.probs, _refs(scored), _paths(scored), _reasons(scored), strict=True)
    for ev, p, ref, path, reasons in rows:
        probs = {label: round(float(v), 6) for label, v in zip(scored.labels, p, strict=True)}
        label = scored.labels[int(np.argmax(p))]
        score = ReviewScore(
            event_id=ev.event_id,
            task="review_sentiment",
            adapter=ref,
            label=label,
            event_ts=ev.ts,
            scored_at=now,
            product_id=ev.product_id,
            probabilities=probs,
            path=path,
            reasons=reasons,
        )
        terms = tuple(r.term for r in reasons) if reasons and label == NEGATIVE else ()
        agg = ProductUpdate(ev.product_id, ev.event_id, label, probs[scored.labels[pos]], terms)
        out.append(Result("review_sentiment", ev.event_id, ev.product_id, score, ev.ts, agg))
    return out


def search_results(events: list[SearchEvent], scored: Scored, now: datetime) -> list[Result]:
    out = []
    k = min(TOP_K, len(scored.labels))
    for ev, p, ref, path in zip(events, scored.probs, _refs(scored), _paths(scored), strict=True):
        best = np.argsort(-p, kind="stable")[:k]
        top = [ClassProbability(label=scored.labels[i], probability=round(float(p[i]), 6)) for i in best]
        score = SearchScore(
            event_id=ev.event_id,
            task="query_class",
            adapter=ref,
            label=top[0].label,
            event_ts=ev.ts,
            scored_at=now,
            session_id=ev.session_id,
            top=top,
            path=path,
        )
        out.append(Result("query_class", ev.event_id, ev.session_id, score, ev.ts))
    return out


def click_results(
    events: list[ClickEvent], scored: Scored, now: datetime, page_views: Sequence[int]
) -> list[Result]:
    """``page_views[i]``: the session's page views after ``events[i]`` (from the session state)."""
    out = []
    for ev, views, p, ref in zip(events, page_views, scored.probs[:, 0], _refs(scored), strict=True):
        prob = round(float(p), 6)
        score = ClickScore(
            event_id=ev.event_id,
            task="purchase_intent",
            adapter=ref,
            label="purchase" if prob >= 0.5 else "no_purchase",
            event_ts=ev.ts,
            scored_at=now,
            session_id=ev.session_id,
            purchase_probability=prob,
            page_views=views,
        )
        agg = SessionUpdate(ev.session_id, views, prob, ev.event_id, ref.version)
        out.append(Result("purchase_intent", ev.event_id, ev.session_id, score, ev.ts, agg))
    return out

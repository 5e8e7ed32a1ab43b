"""Encoded results as the scorer hands them to the Redis sink, for sink tests of both tiers."""

from __future__ import annotations

from datetime import UTC, datetime

from streamtune.core.encode import ProductUpdate, Result, SessionUpdate
from streamtune.core.events import AdapterRef, ClickScore, ReviewScore

NOW = datetime(2026, 11, 28, tzinfo=UTC)


def review(
    event_id: str,
    product: str,
    label: str = "positive",
    p_pos: float = 0.8,
    version: int = 1,
    terms: tuple[str, ...] = (),
) -> Result:
    """A scored review of ``product`` with its product-view update (``terms``: its reasons, as
    counted for a negative review)."""
    probs = {"negative": 0.0, "neutral": round(1 - p_pos, 6), "positive": p_pos}
    score = ReviewScore(
        event_id=event_id,
        task="review_sentiment",
        adapter=AdapterRef(task="review_sentiment", version=version),
        label=label,
        event_ts=NOW,
        scored_at=NOW,
        product_id=product,
        probabilities=probs,  # type: ignore[arg-type]
    )
    update = ProductUpdate(product, event_id, label, p_pos, terms)
    return Result("review_sentiment", event_id, product, score, NOW, update)


def click(event_id: str, session: str, views: int = 1, p: float = 0.2) -> Result:
    """A scored page view of ``session`` with its session-view update."""
    score = ClickScore(
        event_id=event_id,
        task="purchase_intent",
        adapter=AdapterRef(task="purchase_intent", version=1),
        label="no_purchase",
        event_ts=NOW,
        scored_at=NOW,
        session_id=session,
        purchase_probability=p,
        page_views=views,
    )
    return Result(
        "purchase_intent", event_id, session, score, NOW, SessionUpdate(session, views, p, event_id, 1)
    )

"""Every row of the shipped data, replayed as events, passes the input ranges (pure, but it reads
all ~19,000 reviews and 12,000 sessions: too slow for the unit tier's minute)."""

from __future__ import annotations

from typing import Any

from streamtune.core.decode import Decoded, Source, decode
from streamtune.core.events import ClickEvent, LabelEvent, ReviewEvent, SearchEvent
from streamtune.core.settings import Settings
from streamtune.datasets import loaders
from streamtune.devtools.demo import replay

SRC = Source("events.click", 0, 5, b"s1")


def test_every_shipped_row_replayed_as_events_still_validates() -> None:
    """Replay builds each event through its model (validation in code); a sample per row also
    goes through ``decode`` as JSON, the scorer's path, with the default bounds."""
    data_dir = Settings().model.data_dir
    counts = {"review": 0, "search": 0, "click": 0, "label": 0}

    def through_decode(model: type[Any], event: Any) -> None:
        out = decode(model, event.model_dump_json().encode(), SRC)
        assert isinstance(out, Decoded), (event, getattr(out, "error", None))

    for ev, label in replay.review_events(data_dir):
        through_decode(ReviewEvent, ev)
        through_decode(LabelEvent, label)
        counts["review"] += 1
    for sev, slabel in replay.search_events(data_dir):
        through_decode(SearchEvent, sev)
        if slabel is not None:
            through_decode(LabelEvent, slabel)
        counts["search"] += 1
    for row in loaders.load_sessions(data_dir):
        clicks = replay.session_clicks(row)  # every click validated as it is built
        seen: set[tuple[str, float]] = set()
        for c in clicks:
            if (c.page_type, c.duration_s) not in seen:  # the distinct clicks of the row
                seen.add((c.page_type, c.duration_s))
                through_decode(ClickEvent, c)
        counts["click"] += len(clicks)
    for _clicks, clabel in replay.click_events(data_dir, max_pages=10**9):
        through_decode(LabelEvent, clabel)
        counts["label"] += 1
    assert counts["review"] > 18_000 and counts["search"] == 480
    assert counts["click"] > 300_000 and counts["label"] > 10_000

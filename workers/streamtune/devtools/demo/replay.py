"""``streamtune replay``: the shipped data sets as events on the input topics.

Event generation is pure (rows to typed events, deterministic ids), so tests can compute the
expected aggregates from the same events; only :func:`replay` touches Kafka.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import structlog
from kafka import KafkaProducer
from kafka.errors import KafkaError

from streamtune.core.errors import StartupError
from streamtune.core.events import ClickEvent, LabelEvent, ReviewEvent, SearchEvent
from streamtune.core.features import PAGE_COLUMNS
from streamtune.core.settings import Settings
from streamtune.core.tasks import CLICK, LABELS_TOPIC, QUERY, REVIEW, TASKS
from streamtune.datasets import loaders as data
from streamtune.datasets import other_sites
from streamtune.devtools.demo.drift import critical_wave
from streamtune.kafka.security import kafka_client_kwargs

log = structlog.get_logger(__name__)

TOPIC_OF: dict[str, str] = {t.name: t.input_topic for t in TASKS.values()}
# the data set's mix, the drifted wave (drift.py), or reviews from other sites (datasets/other_sites.py)
ReviewSource = Literal["natural", "critical", "other_sites"]
RATING_OF_SITE_LABEL = {"negative": 1, "positive": 5}  # other-site sentences as star ratings


@dataclass(frozen=True, slots=True)
class Outgoing:
    task: str
    key: str
    value: bytes
    valid: bool
    label: LabelEvent | None = None


def _ts(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


def review_events(
    data_dir: Path, now: datetime | None = None, rows: Iterable[data.Review] | None = None
) -> Iterator[tuple[ReviewEvent, LabelEvent]]:
    for r in data.load_reviews(data_dir) if rows is None else rows:
        ts = _ts(now)
        ev = ReviewEvent(
            event_id=f"review-{r.review_id}",
            ts=ts,
            product_id=r.product_id,
            text=r.text,
            title=r.title or None,
            rating=None,  # the rating is the label; it arrives later on `labels`
        )
        yield ev, LabelEvent(event_id=ev.event_id, task=REVIEW.name, label=r.rating, ts=ts)


def other_site_events(now: datetime | None = None) -> Iterator[tuple[ReviewEvent, LabelEvent]]:
    """The other sites' stream side (:func:`streamtune.datasets.other_sites.split`: never their
    held-out side) as reviews of one product per site, labelled 1 or 5 stars."""
    for i, r in enumerate(other_sites.split(other_sites.load())[0]):
        ts = _ts(now)
        ev = ReviewEvent(event_id=f"review-{r.site}-{i}", ts=ts, product_id=f"{r.site}-site", text=r.text)
        label = RATING_OF_SITE_LABEL[r.label]
        yield ev, LabelEvent(event_id=ev.event_id, task=REVIEW.name, label=label, ts=ts)


def search_events(
    data_dir: Path, now: datetime | None = None, cycle: bool = False
) -> Iterator[tuple[SearchEvent, LabelEvent | None]]:
    """Queries; the few without a class in the data set get no label. With ``cycle`` the
    480 queries repeat without end, each round with fresh event and session ids (``-r1``,
    ``-r2``, ...; the first round keeps the plain ids), so a long replay keeps search traffic
    flowing and no repeat is taken for a duplicate."""
    queries = data.load_queries(data_dir)
    for round_no in itertools.count() if cycle else range(1):
        suffix = f"-r{round_no}" if round_no else ""
        for q in queries:
            ts = _ts(now)
            qid = f"{q.query_id}{suffix}"
            ev = SearchEvent(event_id=f"search-{qid}", ts=ts, session_id=f"qs-{qid}", query=q.query)
            label = q.label and LabelEvent(event_id=ev.event_id, task=QUERY.name, label=q.label, ts=ts)
            yield ev, label or None


def session_clicks(row: dict[str, str], now: datetime | None = None) -> list[ClickEvent]:
    """One data-set row as page views whose aggregate reproduces the row.

    Each page type's duration is spread evenly over its pages; rates and page value are the
    row's averages on every page, so their mean is the row's value.
    """
    sid = f"s-{row['session_id']}"
    pages: list[tuple[str, float]] = []
    for page, (count_col, dur_col) in PAGE_COLUMNS.items():
        n = int(float(row[count_col]))
        dur = max(float(row[dur_col]), 0.0)
        pages += [(page, dur / n)] * n if n else []
    clicks = []
    for i, (page, dur) in enumerate(pages):
        clicks.append(
            ClickEvent(
                event_id=f"click-{row['session_id']}-{i}",
                ts=_ts(now),
                session_id=sid,
                page_type=page,
                duration_s=min(dur, 86_400.0),
                page_value=float(row["PageValues"]),
                bounce_rate=float(row["BounceRates"]),
                exit_rate=float(row["ExitRates"]),
                month=int(float(row["Month"])),
                visitor_type="returning" if row["ReturningVisitor"] == "1" else "new",
                weekend=row["Weekend"] == "1",
                special_day=float(row["SpecialDay"]),
                traffic_type=int(float(row["TrafficType"])),
                region=int(float(row["Region"])),
                browser=int(float(row["Browser"])),
                operating_system=int(float(row["OperatingSystems"])),
            )
        )
    return clicks


def click_events(
    data_dir: Path, max_pages: int = 40, now: datetime | None = None
) -> Iterator[tuple[list[ClickEvent], LabelEvent]]:
    """Sessions (at most ``max_pages`` page views, to keep replays varied) and their purchase label."""
    for row in data.load_sessions(data_dir):
        clicks = session_clicks(row, now)
        if not clicks or len(clicks) > max_pages:
            continue
        label = LabelEvent(
            session_id=clicks[0].session_id, task=CLICK.name, label=int(row["Revenue"]), ts=_ts(now)
        )
        yield clicks, label


MALFORMED_KINDS = ("invalid_json", "missing_field", "oversize", "bad_enum", "not_utf8", "wrong_type")


@dataclass(frozen=True)
class _Breaks:
    """How a task's events break: the field a "missing_field" event lacks, the value that makes
    an "oversize" one too long, and the field and value a "bad_enum" one gets."""

    missing: str
    oversize: tuple[str, str]
    bad_enum: tuple[str, str]


_BREAKS: dict[str, _Breaks] = {
    REVIEW.name: _Breaks("text", ("text", "x" * 10_001), ("ts", "yesterday")),
    QUERY.name: _Breaks("query", ("query", "q" * 513), ("ts", "yesterday")),
    CLICK.name: _Breaks("page_type", ("session_id", "s" * 200), ("page_type", "checkout")),
}


def malform(task: str, valid: dict[str, object], kind: str) -> bytes:
    """A deliberately broken version of a valid event (each kind is one way producers break)."""
    v = dict(valid)
    breaks = _BREAKS[task]
    if kind == "invalid_json":
        return json.dumps(v).encode()[:-7] + b"}{"
    if kind == "not_utf8":
        return b"\xff\xfe" + json.dumps(v).encode("utf-16-le")
    if kind == "missing_field":
        v.pop(breaks.missing)
    elif kind == "oversize":
        v[breaks.oversize[0]] = breaks.oversize[1]
    elif kind == "bad_enum":
        v[breaks.bad_enum[0]] = breaks.bad_enum[1]
    elif kind == "wrong_type":
        v["event_id"] = 12345
    return json.dumps(v).encode()


Source = Iterator[tuple[str, list[bytes], LabelEvent | None]]


def _review_source(data_dir: Path, reviews: ReviewSource, cycle_queries: bool) -> Source:
    rows = critical_wave(data_dir, "train") if reviews == "critical" else None
    source = other_site_events() if reviews == "other_sites" else review_events(data_dir, rows=rows)
    for review, review_label in source:
        yield review.product_id, [review.model_dump_json().encode()], review_label


def _query_source(data_dir: Path, reviews: ReviewSource, cycle_queries: bool) -> Source:
    for s, lab in search_events(data_dir, cycle=cycle_queries):
        yield s.session_id, [s.model_dump_json().encode()], lab


def _click_source(data_dir: Path, reviews: ReviewSource, cycle_queries: bool) -> Source:
    for clicks, lab in click_events(data_dir):
        yield clicks[0].session_id, [c.model_dump_json().encode() for c in clicks], lab


_SOURCES: dict[str, Callable[[Path, ReviewSource, bool], Source]] = {
    REVIEW.name: _review_source,
    QUERY.name: _query_source,
    CLICK.name: _click_source,
}


def _events(
    task: str, data_dir: Path, reviews: ReviewSource = "natural", cycle_queries: bool = False
) -> Source:
    """A task's events (key, the record values, the label that follows them)."""
    return _SOURCES[task](data_dir, reviews, cycle_queries)


def _task_records(
    task: str,
    data_dir: Path,
    limit: int,
    malformed_share: float,
    rng: random.Random,
    skip: int,
    reviews: ReviewSource = "natural",
    cycle_queries: bool = False,
) -> Iterator[Outgoing]:
    """One task's records: at most ``limit`` valid ones, some replaced by broken ones."""
    sent = 0
    for n, (key, values, label) in enumerate(_events(task, data_dir, reviews, cycle_queries)):
        if n < skip:
            continue
        if sent >= limit:
            return
        for i, value in enumerate(values):
            # A session's last click stays valid, so every replayed session ends (and is labelled).
            breakable = len(values) == 1 or i < len(values) - 1
            if malformed_share and breakable and rng.random() < malformed_share:
                kind = rng.choice(MALFORMED_KINDS)
                yield Outgoing(task, key, malform(task, json.loads(value), kind), valid=False)
                continue
            sent += 1
            last = i == len(values) - 1
            yield Outgoing(task, key, value, valid=True, label=label if last else None)


def plan(
    data_dir: Path,
    tasks: list[str],
    limit: int,
    malformed_share: float = 0.0,
    seed: int = 7,
    skip: int | Mapping[str, int] = 0,  # records of each task to leave out first (per task: a mapping)
    reviews: ReviewSource = "natural",
    cycle_queries: bool = False,
) -> Iterator[Outgoing]:
    """Records of the given tasks interleaved one by one, ``limit`` valid events per task at most
    (a click session is finished even when it crosses the limit). ``malformed_share`` of the
    records are replaced by broken ones (reported as invalid). Deterministic for a seed.
    ``cycle_queries``: the queries repeat with fresh ids (:func:`search_events`) until ``limit``.
    """
    streams = {
        t: _task_records(
            t,
            data_dir,
            limit,
            malformed_share,
            random.Random(f"{seed}-{t}"),
            skip.get(t, 0) if isinstance(skip, Mapping) else skip,
            reviews,
            cycle_queries,
        )
        for t in tasks
    }
    while streams:
        for task in list(streams):
            out = next(streams[task], None)
            if out is None:
                del streams[task]
            else:
                yield out


@dataclass
class ReplayReport:
    sent: dict[str, int] = field(default_factory=dict)
    malformed: dict[str, int] = field(default_factory=dict)
    labels: int = 0
    seconds: float = 0.0


def producer(settings: Settings) -> KafkaProducer:
    try:
        return KafkaProducer(
            **kafka_client_kwargs(settings),
            acks="all",  # idempotent, retried within delivery_timeout_ms (kafka-python defaults)
            linger_ms=5,
            client_id="streamtune-replay",
        )
    except (KafkaError, OSError, ValueError) as e:
        raise StartupError(
            f"cannot reach Kafka at STREAMTUNE_BOOTSTRAP_SERVERS={settings.kafka.bootstrap_servers} ({e})"
        ) from e


def replay(
    settings: Settings,
    tasks: list[str],
    limit: int,
    rate: float = 0.0,
    malformed_share: float = 0.0,
    labels: bool = False,
    seed: int = 7,
    skip: int | Mapping[str, int] = 0,
    should_stop: Callable[[], bool] | None = None,
    reviews: ReviewSource = "natural",
    label_delay_s: float = 0.0,
    on_label: Callable[[LabelEvent], None] | None = None,
    cycle_queries: bool = False,
) -> ReplayReport:
    """Produce events; ``rate`` events/s in total (0: as fast as possible).

    With ``labels``, each event's label follows on ``labels`` ``label_delay_s`` seconds later
    (labels still due when the events run out are sent at the end, immediately).
    """
    report = ReplayReport(sent=dict.fromkeys(tasks, 0), malformed=dict.fromkeys(tasks, 0))
    prod = producer(settings)
    started = time.monotonic()
    n = 0
    due_labels: list[tuple[float, int, LabelEvent]] = []

    def send_label(lab: LabelEvent) -> None:
        lkey = (lab.event_id or lab.session_id or "").encode()
        prod.send(settings.topic(LABELS_TOPIC), key=lkey, value=lab.model_dump_json().encode())
        report.labels += 1
        if on_label is not None:
            on_label(lab)

    try:
        data_dir = settings.model.data_dir
        records = plan(data_dir, tasks, limit, malformed_share, seed, skip, reviews, cycle_queries)
        while True:
            if should_stop is not None and should_stop():
                break
            if rate > 0:
                due = started + n / rate
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)  # pacing the producer, not waiting for a condition
            # Built after the pause, so an event's time is when it is sent (latency is measured from it).
            out = next(records, None)
            if out is None:
                break
            prod.send(settings.topic(TOPIC_OF[out.task]), key=out.key.encode(), value=out.value)
            n += 1
            if out.valid:
                report.sent[out.task] += 1
            else:
                report.malformed[out.task] += 1
            if labels and out.label is not None:
                heapq.heappush(due_labels, (time.monotonic() + label_delay_s, n, out.label))
            while due_labels and due_labels[0][0] <= time.monotonic():
                send_label(heapq.heappop(due_labels)[2])
        while due_labels and not (should_stop is not None and should_stop()):
            send_label(heapq.heappop(due_labels)[2])
        prod.flush(timeout=60)
    finally:
        prod.close(timeout=10)
    report.seconds = time.monotonic() - started
    log.info(
        "replay_done",
        sent=report.sent,
        malformed=report.malformed,
        labels=report.labels,
        seconds=round(report.seconds, 2),
    )
    return report

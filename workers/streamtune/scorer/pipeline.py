"""One micro-batch, end to end, in two halves: ``start`` (decode, queue the model run) and
``finish`` (score, encode, write, publish, flush); overlap.py runs them for overlapping batches.

Kafka specifics stay in :mod:`streamtune.scorer.app`; this class sees records and two
outputs (a Redis sink and a publisher), so the wiring can be exercised directly in tests.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import numpy as np
import structlog

from streamtune.core.decode import Decoded, Source, dead_letter, split
from streamtune.core.encode import Result
from streamtune.core.errors import BatchStalledError
from streamtune.core.events import ClickEvent, DeadLetter, ReviewEvent, SearchEvent
from streamtune.core.features import SessionState, session_row, vectorize
from streamtune.core.settings import Settings
from streamtune.core.tasks import DLQ_TOPIC, TASKS
from streamtune.drift.watch import DriftWatch
from streamtune.model.runtime import ModelRuntime, Scored, Split
from streamtune.ops.telemetry import ScorerMetrics
from streamtune.scorer.isolation import (
    DEAD_LETTER,
    ENCODE,
    MODEL,
    PUBLISH,
    SINK,
    DeadLetterUnavailable,
    StageError,
    describe,
    halves,
    is_size_refusal,
    is_transient,
    stage_of,
)
from streamtune.scorer.sink import RedisSink

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A record identity (topic, partition, offset, "result" | "dead_letter") and its delivery.
RecordId = tuple[str, int, int, str]
Sent = tuple[RecordId, asyncio.Future[Any]]


class Publisher(Protocol):
    async def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[Any]:
        """Queue one record; the future resolves once the broker acknowledged it."""
        ...

    async def flush(self, deliveries: Sequence[asyncio.Future[Any]]) -> None:
        """Wait for ``deliveries`` (one batch's own records, nobody else's); raise if one
        failed. Cancelling this wait must leave the deliveries themselves alone."""
        ...


# Applies decoded clicks to the session table (in stream order) and returns each click's
# session state after it; supplied by the Faust layer, which owns the table.
SessionUpdater = Callable[[list[Decoded[ClickEvent]]], Awaitable[list[SessionState]]]


@dataclass(frozen=True, slots=True)
class Started:
    """A batch between :meth:`BatchProcessor.start` and :meth:`BatchProcessor.finish`.

    The valid events come with what a retry or a split needs without reading them again: each
    one's raw value and source (for an isolated record's dead letter), model input and entity
    key (to score a part of the batch again)."""

    task: str
    bad: list[DeadLetter]
    now: datetime
    scoring: asyncio.Future[Scored] | None  # None: no valid event in the batch
    events: Sequence[ReviewEvent | SearchEvent | ClickEvent]
    page_views: list[int]  # clicks: each session's page views after its click
    sources: list[Source] = field(default_factory=list)
    raws: list[bytes | None] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    # A batch split by its linear pass: ``eager`` is already writing and publishing the rows
    # the linear stage answered alone (and the dead letters); ``later`` holds the rest, queued
    # on the model thread. The batch is done (and acknowledged) when both are.
    eager: asyncio.Task[BatchOutcome] | None = None
    later: Started | None = None


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    scored: int
    dead: int
    isolated: int = 0  # valid events that failed alone and went to the dead-letter topic

    def __add__(self, other: BatchOutcome) -> BatchOutcome:
        return BatchOutcome(
            self.scored + other.scored, self.dead + other.dead, self.isolated + other.isolated
        )


class BatchProcessor:
    def __init__(
        self,
        settings: Settings,
        runtime: ModelRuntime,
        model_executor: Executor,
        sink: RedisSink,
        publisher: Publisher,
        metrics: ScorerMetrics,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.executor = model_executor
        self.sink = sink
        self.publisher = publisher
        self.metrics = metrics
        self.delivered = Delivered()
        self.drift = DriftWatch(delta=settings.drift.delta, grace=settings.drift.grace)

    def _start_scoring(self, task: str, inputs: Sequence[Any], keys: list[str]) -> asyncio.Future[Scored]:
        """Queue the batch on the model thread and return at once; the model threads run while
        the event loop decodes the next batch and writes the previous one."""

        def timed() -> Scored:
            started = time.perf_counter()
            scored = self.runtime.score(task, list(inputs), keys, self.settings.scorer.shadow)
            self.metrics.model_seconds.labels(task).observe(time.perf_counter() - started)
            return scored

        return asyncio.get_running_loop().run_in_executor(self.executor, timed)

    async def start(
        self,
        task: str,
        records: list[tuple[bytes | None, Source]],
        sessions: SessionUpdater | None = None,
    ) -> Started:
        """First half of a batch: decode, validate, (clicks) update the session table in stream
        order, and queue the model run. Nothing leaves the process yet."""
        spec = TASKS[task]
        good, bad = split(
            spec.event_model,
            records,
            max_raw_bytes=self.settings.scorer.dlq_max_raw_bytes,
            max_future_skew_s=self.settings.scorer.max_future_skew_s,
        )
        now = datetime.now(UTC)
        if not good:
            return Started(task, bad, now, None, [], [])
        raw_of = {(src.topic, src.partition, src.offset): raw for raw, src in records}
        events: list[Any] = [d.event for d in good]
        sources = [d.source for d in good]
        raws = [raw_of.get((d.source.topic, d.source.partition, d.source.offset)) for d in good]
        keys = [spec.key_of(ev) for ev in events]
        page_views: list[int] = []
        if spec.is_text:
            inputs: list[Any] = [spec.model_text(ev) for ev in events]
        else:
            assert sessions is not None, f"{task} needs the session table"
            states = await sessions(good)  # type: ignore[arg-type]
            inputs = [vectorize(session_row(st)) for st in states]
            page_views = [st.page_views for st in states]
        if spec.is_text and self.settings.scorer.early_answers:
            try:
                routed = await asyncio.get_running_loop().run_in_executor(
                    None, self.runtime.split, task, inputs, keys, self.settings.scorer.shadow
                )
            except Exception as e:  # one pass instead: its failure is retried and isolated there
                log.warning("linear_pass_failed", task=task, events=len(events), error=describe(e))
                routed = None
            if routed is not None:
                whole = Started(task, bad, now, None, events, page_views, sources, raws, inputs, keys)
                return self._start_split(whole, routed)
        scoring = self._start_scoring(task, inputs, keys)
        return Started(task, bad, now, scoring, events, page_views, sources, raws, inputs, keys)

    def _start_split(self, whole: Started, split: Split) -> Started:
        """Finish the linear stage's answers now, each batch on its own (not after the batches
        before it: their results and aggregates are per event, so order does not matter, and the
        offsets are still acknowledged in stream order); queue the rest on the model thread."""
        early = _part(whole, split.early_rows, bad=whole.bad)
        if split.early is not None:
            done: asyncio.Future[Scored] = asyncio.get_running_loop().create_future()
            done.set_result(split.early)
            early = replace(early, scoring=done)
        later = None
        if split.later_rows:
            later = replace(_part(whole, split.later_rows, bad=[]), scoring=self._start_later(split))
        return replace(whole, eager=asyncio.create_task(self._finish_retrying(early)), later=later)

    def _start_later(self, split: Split) -> asyncio.Future[Scored]:
        def timed() -> Scored:
            started = time.perf_counter()
            scored = self.runtime.score_later(split)
            self.metrics.model_seconds.labels(split.task).observe(time.perf_counter() - started)
            return scored

        return asyncio.get_running_loop().run_in_executor(self.executor, timed)

    def abandon(self, started: Started) -> None:
        """A started batch that will not be finished (it is read again): drop its model runs and
        stop publishing its early answers (what was delivered is not sent again by the re-read,
        see :class:`Delivered`)."""
        for part in (started, started.later):
            if part is not None and part.scoring is not None:
                part.scoring.cancel()
        if started.eager is not None:
            started.eager.cancel()
            started.eager.add_done_callback(_retrieved)

    async def finish(self, started: Started) -> BatchOutcome:
        """Second half: wait for the model, then dead letters, Redis, output events, and flush
        (everything the batch's offsets may be committed for).

        A transient failure (a service away, a stalled step: see :mod:`streamtune.scorer.isolation`)
        is raised: the batch is read again after a back-off, for as long as the outage lasts.
        Any other failure is retried here ``batch_retries`` times, then the batch is bisected:
        the parts that succeed are written and a record that fails alone goes to the dead-letter
        topic with its stage. Results and dead letters already delivered for a record are not
        sent again by a retry, a split or a re-read (see :class:`Delivered`)."""
        if started.eager is not None:
            try:
                outcome = await started.eager
            except BaseException:
                if started.later is not None and started.later.scoring is not None:
                    started.later.scoring.cancel()  # the whole batch is read again
                raise
            if started.later is not None:
                outcome += await self._finish_retrying(started.later)
        else:
            outcome = await self._finish_retrying(started)
        self.delivered.forget(started)
        return outcome

    async def _finish_retrying(self, started: Started) -> BatchOutcome:
        """:meth:`finish` for one batch or one part of a split batch (see there)."""
        task = started.task
        attempt = 0
        while True:
            try:
                outcome = await self._finish_once(started)
            except Exception as e:
                if is_transient(e):
                    raise
                attempt += 1
                stage = stage_of(e)
                self.metrics.batch_retries.labels(task, stage).inc()
                log.warning("batch_retry", task=task, stage=stage, attempt=attempt, error=describe(e))
                if attempt > self.settings.scorer.batch_retries:
                    break
                await asyncio.sleep(self.settings.scorer.batch_retry_backoff_s * attempt)
                started = self._rescored(started, range(len(started.events)))
            else:
                return outcome
        log.warning("batch_isolating", task=task, events=len(started.events), dead=len(started.bad))
        return await self._isolate(started)

    async def _finish_once(self, started: Started) -> BatchOutcome:
        task, spec = started.task, TASKS[started.task]
        results: list[Result] = []
        sent: list[Sent] = []  # this batch's own
        isolated = 0
        try:
            scored = None
            if started.scoring is not None:
                scored = await self._stage(MODEL, self._step(task, "model", started.scoring))
            if started.bad:
                await self._stage(DEAD_LETTER, self._dead_letters(task, started.bad, sent))
            if scored is not None:
                finite = np.isfinite(scored.probs).reshape(len(started.events), -1).all(axis=1)
                if not finite.all():  # never a retry loop: those rows are isolated at once
                    bad_rows = [int(i) for i in np.flatnonzero(~finite)]
                    isolated += len(bad_rows)
                    for i in bad_rows:
                        dl = self._isolated_letter(started, i, MODEL, "model output is not finite")
                        await self._stage(DEAD_LETTER, self._dead_letters(task, [dl], sent))
                    started, scored = _rows(started, scored, [int(i) for i in np.flatnonzero(finite)])
            if scored is not None and started.events:
                if scored.shadow is not None:
                    self.metrics.shadow_agreement.labels(task).set(scored.shadow.agreement)
                    self.metrics.shadow_confidence.labels(task).set(scored.shadow.confidence)
                    self.metrics.shadow_rows.labels(task).inc(scored.shadow.rows)
                now = started.now
                results = await self._stage(
                    ENCODE, _sync(lambda: spec.results(list(started.events), scored, now, started.page_views))
                )
                # Not bounded here: the sink retries with capped back-off while Redis is down (each
                # attempt bounded by the client's socket timeouts), so an outage pauses the scorer.
                await self._stage(SINK, self.sink.write(results, now.isoformat()))
                out_topic = self.settings.topic(spec.output_topic)
                await self._stage(
                    PUBLISH,
                    self._step(task, "publish", self._publish(task, out_topic, started, results, sent)),
                )
            try:
                await self._step(task, "flush", self.publisher.flush([f for _, f in sent]))
            except Exception as e:  # a refused delivery: name what was refused
                if is_transient(e):
                    raise
                failed = [i[3] for i, f in sent if f.done() and not f.cancelled() and f.exception()]
                raise StageError(DEAD_LETTER if failed[:1] == ["dead_letter"] else PUBLISH, e) from e
        except BaseException:
            await self.delivered.settle(sent, self.settings.scorer.batch_step_timeout_s)
            raise
        self.delivered.settle_now(sent)
        if results:
            versions = np.asarray([r.score.adapter.version for r in results])  # type: ignore[attr-defined]
            for v, n in zip(*np.unique(versions, return_counts=True), strict=True):
                self.metrics.results_by_version.labels(task, str(v)).inc(int(n))
            for path, n in Counter(getattr(r.score, "path", None) for r in results).items():
                if path is not None:
                    self.metrics.results_by_path.labels(task, path).inc(n)
            self.metrics.scored.labels(task).inc(len(results))
            self.metrics.batch_size.labels(task).observe(len(results))
            if scored is not None:
                self._watch_drift(scored)
        if isolated:
            self.metrics.isolated.labels(task, MODEL).inc(isolated)
        return BatchOutcome(scored=len(results), dead=len(started.bad), isolated=isolated)

    def _watch_drift(self, scored: Scored) -> None:
        """Feed the batch's served answers to the drift detectors; log and count what they find.
        The batch is published by now: a failure here is logged, never a batch failure."""
        try:
            labels = list(TASKS[scored.task].labels or scored.labels)
            found = self.drift.observe(
                scored.task, scored.versions, labels, scored.probs, scored.linear_confidence
            )
        except Exception as e:
            log.error("drift_watch_failed", task=scored.task, error=describe(e))
            return
        for d in found:
            self.metrics.drift_detected.labels(d.task, d.signal.value, d.detail).inc()
            self.metrics.drift_last.labels(d.task).set(d.at)
            log.warning("drift_detected", task=d.task, version=d.version, signal=d.signal.value,
                        detail=d.detail, before=round(d.before, 4), after=round(d.after, 4),
                        observations=d.observations)  # fmt: skip

    async def _isolate(self, started: Started) -> BatchOutcome:
        """Bisect a batch that keeps failing: its dead letters on their own, then halves of its
        events, down to single records; a record that fails alone is dead-lettered."""
        task = started.task
        outcome = BatchOutcome(0, 0)
        if started.bad:
            for dl in started.bad:
                outcome += await self._dead_letter_alone(task, dl)
        if started.events:
            outcome += await self._bisect(started, list(range(len(started.events))))
        return outcome

    async def _bisect(self, started: Started, rows: list[int]) -> BatchOutcome:
        part = self._rescored(started, rows, bad=[])
        try:
            return await self._finish_once(part)
        except Exception as e:
            if is_transient(e):
                raise
            if len(rows) == 1:
                return await self._isolate_record(started, rows[0], e)
            first, second = halves(rows)
            return await self._bisect(started, list(first)) + await self._bisect(started, list(second))

    async def _isolate_record(self, started: Started, row: int, exc: BaseException) -> BatchOutcome:
        stage = stage_of(exc, MODEL)
        dl = self._isolated_letter(started, row, stage, describe(exc))
        log.warning(
            "record_isolated", task=started.task, stage=stage, topic=dl.source_topic,
            partition=dl.partition, offset=dl.offset, error=dl.error,
        )  # fmt: skip
        self.metrics.isolated.labels(started.task, stage).inc()
        if stage == SINK:  # its score key may have been written before its aggregate failed
            await self.sink.discard(started.task, started.events[row].event_id)
        outcome = await self._dead_letter_alone(started.task, dl)
        return BatchOutcome(0, outcome.dead - 1, 1)  # counted as isolated, not as malformed

    async def _dead_letter_alone(self, task: str, dl: DeadLetter) -> BatchOutcome:
        """Send one dead letter; if it is refused, once more without the raw value (the record
        stays findable by topic, partition and offset). If that is refused for its size too,
        log it as lost: it can never fit. Refused for any other reason (an ACL, a closing
        producer, an error nobody foresaw), it raises a transient error: the batch is read
        again later and its offsets are not committed past a record that reached no topic
        (``streamtune_dead_letters_unavailable_total`` counts those pauses)."""
        refusal: Exception | None = None
        for letter in (dl, dl.model_copy(update={"raw": None, "raw_b64": None})):
            sent: list[Sent] = []
            try:
                await self._dead_letters(task, [letter], sent)
                await self._step(task, "flush", self.publisher.flush([f for _, f in sent]))
            except Exception as e:
                await self.delivered.settle(sent, self.settings.scorer.batch_step_timeout_s)
                if is_transient(e):
                    raise
                log.warning("dead_letter_refused", topic=dl.source_topic, partition=dl.partition,
                            offset=dl.offset, error=describe(e))  # fmt: skip
                refusal = e
                continue
            self.delivered.settle_now(sent)
            return BatchOutcome(0, 1)
        assert refusal is not None
        if not is_size_refusal(refusal):
            self.metrics.dead_letters_unavailable.labels(task).inc()
            log.error("dead_letter_unavailable", topic=dl.source_topic, partition=dl.partition,
                      offset=dl.offset, error=describe(refusal))  # fmt: skip
            raise DeadLetterUnavailable(f"dead letter of {dl.source_topic}[{dl.partition}]@{dl.offset} "
                                        f"refused: {describe(refusal)}") from refusal  # fmt: skip
        self.metrics.dead_letters_lost.labels(task).inc()
        log.error("dead_letter_lost", topic=dl.source_topic, partition=dl.partition, offset=dl.offset)
        return BatchOutcome(0, 1)

    def _isolated_letter(self, started: Started, row: int, stage: str, error: str) -> DeadLetter:
        src = started.sources[row]
        return dead_letter(
            started.raws[row], src, f"{stage}: {error}", stage=stage,
            max_raw_bytes=self.settings.scorer.dlq_max_raw_bytes,
        )  # fmt: skip

    def _rescored(
        self, started: Started, rows: Sequence[int], bad: list[DeadLetter] | None = None
    ) -> Started:
        """The same batch (or some of its rows) with its model run queued again."""
        rows = list(rows)
        if not started.inputs or not rows:
            return replace(started, bad=started.bad if bad is None else bad, scoring=None, events=[],
                           page_views=[], sources=[], raws=[], inputs=[], keys=[])  # fmt: skip
        pick = _picker(rows)
        inputs, keys = pick(started.inputs), pick(started.keys)
        return replace(
            started,
            bad=started.bad if bad is None else bad,
            scoring=self._start_scoring(started.task, inputs, keys),
            events=pick(list(started.events)),
            page_views=pick(started.page_views) if started.page_views else [],
            sources=pick(started.sources),
            raws=pick(started.raws),
            inputs=inputs,
            keys=keys,
        )

    async def _stage(self, stage: str, aw: Awaitable[T]) -> T:
        """Run one step; a failure names its stage (a transient one is raised as it is)."""
        try:
            return await aw
        except Exception as e:
            if is_transient(e) or isinstance(e, StageError):
                raise
            raise StageError(stage, e) from e

    async def _step(self, task: str, step: str, aw: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(aw, self.settings.scorer.batch_step_timeout_s)
        except TimeoutError as e:
            raise BatchStalledError(
                f"{task}: the {step} step took more than {self.settings.scorer.batch_step_timeout_s:g} s"
            ) from e

    async def _publish(
        self,
        task: str,
        topic: str,
        started: Started,
        results: list[Result],
        sent: list[Sent],
    ) -> None:
        done = time.time()
        for src, r in zip(started.sources, results, strict=True):
            ident = (src.topic, src.partition, src.offset, "result")
            if ident in self.delivered:
                continue  # delivered by an earlier attempt of this batch: never twice
            sent.append((ident, await self.publisher.send(topic, r.key.encode("utf-8"), r.payload())))
            self.metrics.latency.labels(task).observe(max(0.0, done - r.event_ts.timestamp()))

    async def _dead_letters(
        self,
        task: str,
        bad: list[DeadLetter],
        sent: list[Sent],
    ) -> None:
        for dl in bad:
            ident = (dl.source_topic, dl.partition, dl.offset, "dead_letter")
            if ident in self.delivered:
                continue
            sent.append((ident, await self._dead_letter(task, dl)))

    async def _dead_letter(self, task: str, dl: DeadLetter) -> asyncio.Future[Any]:
        self.metrics.dead_letters.labels(task).inc()
        log.warning(
            "dead_letter", topic=dl.source_topic, partition=dl.partition, offset=dl.offset, error=dl.error
        )
        key = dl.key.encode("utf-8") if dl.key is not None else None
        return await self.publisher.send(
            self.settings.topic(DLQ_TOPIC), key, dl.model_dump_json().encode("utf-8")
        )


class Delivered:
    """Which records' results and dead letters the broker has acknowledged, until their batch
    completes: a retry, a split or a re-read after a rewind (same process) sends only what was not
    delivered. Bounded: the oldest entries go first beyond ``limit`` (a batch that fails over and
    over is re-sent in part rather than growing this without bound)."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._ids: dict[RecordId, None] = {}

    def __contains__(self, ident: object) -> bool:
        return ident in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, ident: RecordId) -> None:
        self._ids[ident] = None
        while len(self._ids) > self.limit:
            del self._ids[next(iter(self._ids))]

    def settle_now(self, sent: Sequence[Sent]) -> None:
        """Record the sends that are acknowledged already (after a successful flush: all)."""
        for ident, fut in sent:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.add(ident)

    async def settle(self, sent: Sequence[Sent], timeout_s: float) -> None:
        """After a failed attempt: wait (bounded) for the sends still in flight, then record the
        acknowledged ones, so the next attempt does not send them again."""
        pending = [f for _, f in sent if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        self.settle_now(sent)

    def forget(self, started: Started) -> None:
        """The batch completed: its offsets are acknowledged, its records are not read again."""
        for src in started.sources:
            for kind in ("result", "dead_letter"):
                self._ids.pop((src.topic, src.partition, src.offset, kind), None)
        for dl in started.bad:
            self._ids.pop((dl.source_topic, dl.partition, dl.offset, "dead_letter"), None)


def _picker(rows: list[int]) -> Callable[[Sequence[T]], list[T]]:
    return lambda items: [items[i] for i in rows]


def _part(started: Started, rows: list[int], bad: list[DeadLetter]) -> Started:
    """``rows`` of a text batch (no model run queued yet)."""
    pick = _picker(rows)
    return replace(
        started,
        bad=bad,
        scoring=None,
        events=pick(list(started.events)),
        sources=pick(started.sources),
        raws=pick(started.raws),
        inputs=pick(started.inputs),
        keys=pick(started.keys),
    )


def _retrieved(task: asyncio.Task[Any]) -> None:
    """An abandoned task's outcome is not awaited: read it, so asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


def _rows(started: Started, scored: Scored, rows: list[int]) -> tuple[Started, Scored]:
    """The batch and its model output restricted to ``rows`` (rows whose output is usable)."""
    pick = _picker(rows)
    part = replace(
        started,
        events=pick(list(started.events)),
        page_views=pick(started.page_views) if started.page_views else [],
        sources=pick(started.sources),
        raws=pick(started.raws),
        inputs=pick(started.inputs),
        keys=pick(started.keys),
    )

    def rows_of(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[rows]

    return part, replace(
        scored,
        probs=scored.probs[rows],
        versions=scored.versions[rows],
        paths=rows_of(scored.paths),
        reasons=None if scored.reasons is None else pick(scored.reasons),
        linear_confidence=rows_of(scored.linear_confidence),
    )


async def _sync(fn: Callable[[], T]) -> T:
    return fn()

"""Faust wiring of the trainer: three tables with changelogs (so a restarted trainer recovers them),
agents that fill them, a trigger timer that starts training runs in a thread, and a sweeper.

What the tables hold and how labels join inputs is :mod:`streamtune.trainer.joiner` (pure): here
the agents feed it events, send the tombstones it asks for, and count what it reports.

* ``inputs``  key ``task:event_id`` (text tasks) or ``task:session_id`` (session tasks: the
  session state so far): what a label joins to. Bounded by event-time window, count and bytes
  (``trainer_max_input_bytes``).
* ``joined``  key ``task:id``: one joined label (:class:`~streamtune.training.online.Example`);
  the first label of an input wins, later ones are duplicates. Bounded per task (replay pool)
  and in bytes (``trainer_max_replay_bytes``: only labels already trained on go).
* ``pending`` labels that arrived before their input; once the task's input stream is more
  than ``trainer_label_wait_s`` past them (event time, every partition) they are orphans, and
  beyond ``trainer_max_pending`` or ``trainer_max_pending_bytes`` the oldest arrivals are
  dropped (both counted and logged). ``streamtune_trainer_store_bytes`` reports each table's
  bytes.

Which joined labels are fresh is decided by the label offsets recorded in the newest
trainer-made manifest of the task, so "trained on" lives in the registry, written atomically
with the version: a run killed before it published leaves its labels fresh.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faust
import structlog

from streamtune.core.decode import Decoded, Source, decode
from streamtune.core.events import DeadLetter, LabelEvent
from streamtune.core.settings import Settings
from streamtune.core.tasks import DLQ_TOPIC, LABELS_TOPIC, TASK_NAMES, TASKS, TaskSpec
from streamtune.drift.served import ServedBook, served_of
from streamtune.drift.watch import DriftWatch
from streamtune.kafka.app import JSON_TABLE, worker_app
from streamtune.kafka.guard import SkipGuard
from streamtune.ops.telemetry import Readiness, TrainerMetrics
from streamtune.trainer.joiner import Eviction, Joiner, JoinLimits, LabelStatus
from streamtune.training.candidate import NothingToTrain
from streamtune.training.online import (
    TrainingSet,
    Trigger,
    Watermark,
    fast_due,
    is_fresh,
    select,
    should_train,
)

log = structlog.get_logger(__name__)

# Runs one training job (in the training thread) and returns whether a version was published.
TrainJob = Callable[[str, TrainingSet], Any]
# Runs one fast-path update (in the fast thread): (task, labels, re-check the rule) -> FastRun
FastJob = Callable[[str, TrainingSet, bool], Any]


@dataclass
class TrainerState:
    """In-memory bookkeeping of the trigger (rebuilt from the registry on start)."""

    watermarks: dict[str, Watermark]  # updated in place (the joiner reads it)
    last_run: dict[str, float] = field(default_factory=dict)
    retry_after: dict[str, float] = field(default_factory=dict)
    running: str | None = None
    runs: int = 0
    drift_at: dict[str, float] = field(default_factory=dict)  # monotonic time of the last error-rate rise
    drift_handled: dict[str, float] = field(default_factory=dict)  # start of the last successful run
    fast_watermarks: dict[str, Watermark] = field(default_factory=dict)  # the fast path's own
    fast_running: str | None = None
    fast_last: dict[str, float] = field(default_factory=dict)  # monotonic end of the last fast run
    fast_handled: dict[str, float] = field(default_factory=dict)  # start of the last fast run after a drift
    fast_retry_after: dict[str, float] = field(default_factory=dict)  # after a failed or deferred run


@dataclass
class TrainerResources:
    metrics: TrainerMetrics
    executor: ThreadPoolExecutor
    job: TrainJob
    state: TrainerState
    exclude_inputs: frozenset[str | tuple[float, ...]] = frozenset()
    readiness: Readiness = field(default_factory=lambda: Readiness(needs_redis=False))
    served: ServedBook = field(default_factory=ServedBook)  # what the scorers answered, until labelled
    drift: DriftWatch = field(default_factory=DriftWatch)  # error rate per served version
    fast_job: FastJob | None = None  # None: no fast path
    fast_executor: ThreadPoolExecutor | None = None


def build_app(settings: Settings, res: TrainerResources) -> faust.App:
    app = worker_app(settings, settings.trainer.group_id)
    m, state = res.metrics, res.state
    inputs = app.Table("inputs", default=None, partitions=settings.kafka.topic_partitions, schema=JSON_TABLE)
    joined = app.Table("joined", default=None, partitions=settings.kafka.topic_partitions, schema=JSON_TABLE)
    pending = app.Table(
        "pending", default=None, partitions=settings.kafka.topic_partitions, schema=JSON_TABLE
    )
    trigger = Trigger(
        settings.trainer.min_labels,
        settings.trainer.interval_s,
        settings.trainer.interval_min_labels,
        settings.drift.min_labels,
    )

    def topic(name: str) -> faust.TopicT:
        return app.topic(settings.topic(name), key_serializer="raw", value_serializer="raw")

    def source(event: faust.EventT) -> Source:
        msg = event.message
        return Source(msg.topic, msg.partition, msg.offset, msg.key)

    tables = {"inputs": inputs, "joined": joined, "pending": pending}

    def evict(e: Eviction) -> None:
        """Delete outside the current event's partition: the tombstone goes to the changelog
        partition the entry was written to (``cp``), so a restart does not bring it back."""
        table = tables[e.table]
        table.data.pop(e.key, None)
        table.send_changelog(e.partition, e.key, None, value_serializer="raw")

    limits = JoinLimits(
        input_window_s=settings.trainer.input_window_s,
        max_inputs=settings.trainer.max_inputs,
        label_wait_s=settings.trainer.label_wait_s,
        replay_max=settings.trainer.replay_max,
        max_pending=settings.trainer.max_pending,
        max_input_bytes=settings.trainer.max_input_bytes,
        max_pending_bytes=settings.trainer.max_pending_bytes,
        max_replay_bytes=settings.trainer.max_replay_bytes,
    )
    joiner = Joiner(inputs, joined, pending, limits, state.watermarks, evict)

    skip_guard = SkipGuard(app, settings=settings)

    async def store_inputs(spec: TaskSpec, stream: faust.StreamT) -> None:
        task = spec.name
        async for event in stream.events():
            if not await skip_guard.admit([event]):
                continue
            src = source(event)
            decoded = decode(
                spec.event_model,
                event.message.value,
                src,
                max_raw_bytes=settings.scorer.dlq_max_raw_bytes,
                max_future_skew_s=settings.scorer.max_future_skew_s,
            )
            if isinstance(decoded, DeadLetter):
                m.inputs_invalid.labels(task).inc()  # the scorer dead-letters it; here it is skipped
                continue
            added = joiner.add_input(spec, decoded.event, src.partition, src.offset)
            if added is None:  # a re-delivered click
                continue
            m.inputs_seen.labels(task).inc()
            if added.joined is not None:
                m.labels_joined.labels(task).inc()

    async def dead_letter(dl: DeadLetter) -> None:
        fut = await app.producer.send(
            settings.topic(DLQ_TOPIC), None, dl.model_dump_json().encode(), None, None, None
        )
        await fut

    def input_agent(spec: TaskSpec) -> Callable[[faust.StreamT], Awaitable[None]]:
        async def store(stream: faust.StreamT) -> None:
            await store_inputs(spec, stream)

        return store

    for spec in TASKS.values():  # agent names are stable: they name the agents' consumer state
        app.agent(topic(spec.input_topic), name=spec.trainer_agent)(input_agent(spec))

    def served_agent(spec: TaskSpec) -> Callable[[faust.StreamT], Awaitable[None]]:
        async def remember(stream: faust.StreamT) -> None:
            async for event in stream.events():
                served = served_of(spec, event.message.value)
                if served is None:  # not a result of ours: nothing to judge labels by
                    continue
                judged = res.served.add(served)
                if judged is not None:  # its label was read first
                    record(spec, *judged)

        return remember

    for spec in TASKS.values():  # what the scorers served, to judge each version by its labels
        app.agent(topic(spec.output_topic), name=f"{spec.trainer_agent}-served")(served_agent(spec))

    def judge(lab: LabelEvent) -> None:
        """A label against what was served for it: the served version's error rate, watched."""
        spec = TASKS[lab.task]
        judged = res.served.judge(
            lab.task, lab.target, spec.label_of(lab.label), wait=not spec.labels_session
        )
        if judged is not None:
            record(spec, *judged)

    def record(spec: TaskSpec, version: int, wrong: bool) -> None:
        m.served_judged.labels(spec.name, str(version), "wrong" if wrong else "right").inc()
        for d in res.drift.observe_errors(spec.name, version, [wrong]):
            m.drift_detected.labels(d.task).inc()
            if d.after > d.before:  # the error rate rose: a fall (traffic back to normal) is no reason
                state.drift_at[d.task] = time.monotonic()
            log.warning("drift_detected", task=d.task, version=d.version, signal=d.signal.value,
                        before=round(d.before, 4), after=round(d.after, 4),
                        observations=d.observations)  # fmt: skip

    @app.agent(topic(LABELS_TOPIC), name="trainer-labels")
    async def labels(stream: faust.StreamT) -> None:
        async for event in stream.events():
            if not await skip_guard.admit([event]):
                continue
            src = source(event)
            decoded = decode(
                LabelEvent,
                event.message.value,
                src,
                max_raw_bytes=settings.scorer.dlq_max_raw_bytes,
                max_future_skew_s=settings.scorer.max_future_skew_s,
            )
            if isinstance(decoded, DeadLetter):
                m.labels_invalid.inc()
                log.warning("label_invalid", partition=src.partition, offset=src.offset, error=decoded.error)
                await dead_letter(decoded)
                continue
            assert isinstance(decoded, Decoded)
            lab: LabelEvent = decoded.event
            outcome = joiner.add_label(lab, src.partition, src.offset, now=time.time())
            if outcome.status is not LabelStatus.DUPLICATE:
                judge(lab)
            if outcome.status is LabelStatus.DUPLICATE:
                m.labels_duplicate.labels(outcome.task).inc()
            elif outcome.status is LabelStatus.JOINED:
                m.labels_joined.labels(outcome.task).inc()

    async def run_job(task: str, ts: TrainingSet) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        m.training.labels(task).set(1)
        try:
            outcome = await loop.run_in_executor(res.executor, res.job, task, ts)
        except NothingToTrain as e:
            state.watermarks[task] = ts.watermark  # nothing usable: do not retry the same labels
            m.runs.labels(task, "skipped").inc()
            log.warning("training_skipped", task=task, reason=str(e))
        except Exception as e:
            m.runs.labels(task, "failed").inc()
            log.exception("training_failed", task=task, error=str(e))
            state.retry_after[task] = time.monotonic() + min(settings.trainer.interval_s, 60.0)
        else:
            # Only as far as the run got (train_candidate reports it in ts.progress): labels it
            # never reached, stopped at its time budget, stay fresh for the next run.
            reached = ts.reached()
            state.watermarks[task] = reached
            state.drift_handled[task] = started  # a rise detected during the run stays pending
            m.runs.labels(task, outcome).inc()
            if reached < ts.watermark:
                left = sum(1 for e in ts.fresh if e.seq > reached)
                log.warning("labels_left_fresh", task=task, joined_seq=reached, fresh=left)
        finally:
            m.training.labels(task).set(0)
            m.run_seconds.labels(task).observe(time.monotonic() - started)
            state.last_run[task] = time.monotonic()
            state.running = None

    running_jobs: set[asyncio.Future[None]] = set()

    @app.timer(settings.trainer.check_s)
    async def check_triggers() -> None:
        res.readiness.beat()
        res.readiness.partitions_assigned = bool(app.consumer.assignment())
        now = time.monotonic()
        for task in TASK_NAMES:
            wm = state.watermarks.get(task, -1)
            exs = joiner.examples(task)
            fresh = sum(1 for e in exs if is_fresh(e, wm))
            m.fresh_labels.labels(task).set(fresh)
            if state.running is not None or now < state.retry_after.get(task, 0.0):
                continue
            last = state.last_run.setdefault(task, now)
            drifted = state.drift_at.get(task, float("-inf")) > state.drift_handled.get(task, float("-inf"))
            reason = should_train(fresh, now - last, trigger, drifted)
            if reason is None:
                continue
            ts = select(
                exs, wm, settings.trainer.holdout_fraction, settings.trainer.replay_ratio,
                settings.trainer.seed + state.runs, res.exclude_inputs, settings.trainer.holdout_max,
            )  # fmt: skip
            if not ts.fresh:
                continue
            state.running = task
            state.runs += 1
            log.info("training_triggered", task=task, reason=reason, fresh=len(ts.fresh),
                     holdout=len(ts.holdout), replay=len(ts.replay))  # fmt: skip
            running_jobs.add(asyncio.ensure_future(run_job(task, ts)))
            running_jobs.difference_update({j for j in running_jobs if j.done()})

    async def run_fast(task: str, ts: TrainingSet, recheck: bool) -> None:
        assert res.fast_job is not None and res.fast_executor is not None
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        backoff = min(settings.trainer.fast_interval_s, 30.0)
        try:
            run = await loop.run_in_executor(res.fast_executor, res.fast_job, task, ts, recheck)
        except NothingToTrain as e:  # e.g. a live version without a linear stage: wait a cadence
            m.fast_updates.labels(task, "skipped").inc()
            log.info("fast_update_skipped", task=task, reason=str(e))
            state.fast_retry_after[task] = time.monotonic() + settings.trainer.fast_interval_s
        except Exception as e:
            m.fast_updates.labels(task, "failed").inc()
            log.exception("fast_update_failed", task=task, error=str(e))
            state.fast_retry_after[task] = time.monotonic() + backoff
        else:
            m.fast_updates.labels(task, run.outcome).inc()
            m.fast_update_cpu.labels(task).observe(run.cpu_seconds)
            if run.outcome == "released":  # its labels are used; any other outcome keeps them fresh
                state.fast_watermarks[task] = ts.watermark
            elif run.outcome == "deferred":  # a canary is being judged: try again a little later
                state.fast_retry_after[task] = time.monotonic() + backoff
            mf = run.manifest
            log.info("fast_update_done", task=task, outcome=run.outcome, version=mf.version if mf else None,
                     reason=mf.gate.get("reason") if mf else run.why, cpu_seconds=run.cpu_seconds,
                     fresh=len(ts.fresh), holdout=len(ts.holdout))  # fmt: skip
        finally:
            if recheck:  # the drift was acted on, whatever came of it: no retry every check
                state.fast_handled[task] = started
            state.fast_last[task] = time.monotonic()
            state.fast_running = None

    fast_tasks = [t for t, spec in TASKS.items() if spec.is_text] if res.fast_job is not None else []

    @app.timer(settings.trainer.check_s)
    async def check_fast() -> None:
        """The fast path's cadence: every ``fast_interval_s`` per text task, at once after a
        drift, on the fresh labels since its own watermark (the newest ``fast_max_labels``)."""
        if not fast_tasks or state.fast_running is not None:
            return
        now = time.monotonic()
        for task in sorted(fast_tasks, key=lambda t: state.fast_last.get(t, 0.0)):  # least recent first
            if now < state.fast_retry_after.get(task, 0.0):
                continue
            drifted = state.drift_at.get(task, float("-inf")) > state.fast_handled.get(task, float("-inf"))
            last = state.fast_last.setdefault(task, now)
            wm = state.fast_watermarks.get(task, -1)
            exs = joiner.examples(task)
            fresh = sum(1 for e in exs if is_fresh(e, wm))
            reason = fast_due(fresh, now - last, settings.trainer.fast_interval_s,
                              settings.trainer.fast_min_labels, drifted)  # fmt: skip
            if reason is None:
                continue
            ts = select(
                exs, wm, settings.trainer.holdout_fraction, 0.0, settings.trainer.seed,
                res.exclude_inputs, settings.trainer.holdout_max,
            )  # fmt: skip
            keep = settings.trainer.fast_max_labels
            if len(ts.fresh) > keep:  # the newest; older ones an earlier refusal kept wait no longer
                ts = dataclasses.replace(ts, fresh=ts.fresh[-keep:])
            state.fast_running = task
            log.info("fast_update_triggered", task=task, reason=reason,
                     fresh=len(ts.fresh), holdout=len(ts.holdout))  # fmt: skip
            running_jobs.add(asyncio.ensure_future(run_fast(task, ts, drifted)))
            return

    @app.timer(max(settings.trainer.check_s, 5.0))
    async def sweep() -> None:
        swept = joiner.sweep(time.time())
        for task, n in swept.orphans.items():
            m.labels_orphan.labels(task).inc(n)
            m.labels_dropped.labels(task, "orphan").inc(n)
            why = f"the task's inputs are over {settings.trainer.label_wait_s} s past them"
            log.warning("labels_orphaned", task=task, count=n, reason=why)
        for task, n in swept.dropped.items():
            m.labels_dropped.labels(task, "pending_full").inc(n)
            why = (
                f"over {settings.trainer.max_pending} labels or {settings.trainer.max_pending_bytes}"
                " bytes waiting for their input"
            )
            log.warning("labels_dropped", task=task, count=n, reason=why)
        m.inputs_held.set(swept.inputs_held)
        m.labels_pending.set(swept.labels_pending)
        m.store_bytes.labels("inputs").set(swept.inputs_bytes)
        m.store_bytes.labels("pending").set(swept.pending_bytes)
        m.store_bytes.labels("joined").set(swept.joined_bytes)
        if swept.inputs_evicted:
            log.info("inputs_evicted", count=swept.inputs_evicted, held=swept.inputs_held)

    return app

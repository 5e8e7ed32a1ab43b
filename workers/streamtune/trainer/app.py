"""Faust wiring of the trainer: three tables with changelogs (so a restarted trainer recovers them),
agents that fill them, a trigger timer that starts training runs in a thread, and a sweeper.

* ``inputs``  key ``task:event_id`` (text tasks) or ``purchase_intent:session_id`` (the session
  state so far): what a label joins to. Bounded by event-time window and count.
* ``joined``  key ``task:id``: one joined label (:class:`~streamtune.training.online.Example`);
  the first label of an input wins, later ones are duplicates. Bounded per task (replay pool).
* ``pending`` labels that arrived before their input; after ``trainer_label_wait_s`` they are
  orphans (counted and logged).

Which joined labels are fresh is decided by the label offsets recorded in the newest
trainer-made manifest of the task, so "trained on" lives in the registry, written atomically
with the version: a run killed before it published leaves its labels fresh.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faust
import structlog

from streamtune.core.decode import Decoded, Source, decode
from streamtune.core.events import ClickEvent, DeadLetter, LabelEvent, ReviewEvent, SearchEvent
from streamtune.core.features import SessionState, apply_click, session_row, vectorize
from streamtune.core.settings import Settings
from streamtune.core.tasks import DLQ_TOPIC, LABELS_TOPIC, TASK_NAMES, TASKS
from streamtune.kafka.app import JSON_TABLE, worker_app
from streamtune.kafka.guard import SkipGuard
from streamtune.ops.telemetry import Readiness, TrainerMetrics
from streamtune.training.candidate import NothingToTrain
from streamtune.training.online import (
    Example,
    TrainingSet,
    Trigger,
    Watermark,
    is_fresh,
    label_key,
    label_name,
    select,
    should_train,
)

log = structlog.get_logger(__name__)

# Runs one training job (in the training thread) and returns whether a version was published.
TrainJob = Callable[[str, TrainingSet], Any]


@dataclass
class TrainerState:
    """In-memory bookkeeping of the trigger (rebuilt from the registry on start)."""

    watermarks: dict[str, Watermark]
    next_seq: int | None = None  # join sequence; set from the recovered table at the first join
    last_run: dict[str, float] = field(default_factory=dict)
    retry_after: dict[str, float] = field(default_factory=dict)
    running: str | None = None
    runs: int = 0


@dataclass
class TrainerResources:
    metrics: TrainerMetrics
    executor: ThreadPoolExecutor
    job: TrainJob
    state: TrainerState
    exclude_inputs: frozenset[str | tuple[float, ...]] = frozenset()
    readiness: Readiness = field(default_factory=lambda: Readiness(needs_redis=False))


def _input_value(task: str, event: Any) -> tuple[str, str]:
    if task == "review_sentiment":
        assert isinstance(event, ReviewEvent)
        return f"{task}:{event.event_id}", event.model_text()
    assert isinstance(event, SearchEvent)
    return f"{task}:{event.event_id}", event.query


def _session_x(raw: dict[str, Any]) -> list[float]:
    return vectorize(session_row(SessionState.model_validate(raw["s"])))


def build_app(settings: Settings, res: TrainerResources) -> faust.App:
    app = worker_app(settings, settings.trainer_group_id)
    m, state = res.metrics, res.state
    inputs = app.Table("inputs", default=None, partitions=settings.topic_partitions, schema=JSON_TABLE)
    joined = app.Table("joined", default=None, partitions=settings.topic_partitions, schema=JSON_TABLE)
    pending = app.Table("pending", default=None, partitions=settings.topic_partitions, schema=JSON_TABLE)
    trigger = Trigger(
        settings.trainer_min_labels, settings.trainer_interval_s, settings.trainer_interval_min_labels
    )

    def topic(name: str) -> faust.TopicT:
        return app.topic(settings.topic(name), key_serializer="raw", value_serializer="raw")

    def source(event: faust.EventT) -> Source:
        msg = event.message
        return Source(msg.topic, msg.partition, msg.offset, msg.key)

    def evict(table: Any, key: str, value: dict[str, Any]) -> None:
        """Delete outside the current event's partition: the tombstone goes to the changelog
        partition the entry was written to (``cp``), so a restart does not bring it back."""
        table.data.pop(key, None)
        table.send_changelog(int(value["cp"]), key, None, value_serializer="raw")

    def next_seq() -> int:
        if state.next_seq is None:  # first join after start: continue after the recovered table
            seqs = [int(v["ex"].get("s", 0)) for v in joined.data.values()]
            state.next_seq = max([-1, *seqs, *state.watermarks.values()]) + 1
        seq, state.next_seq = state.next_seq, state.next_seq + 1
        return seq

    def join(key: str, label: dict[str, Any], x: str | list[float], partition: int) -> None:
        ex = Example(key, x, label["y"], label["p"], label["o"], label["t"], next_seq())
        joined[key] = {"ex": ex.to_json(), "cp": partition}
        m.labels_joined.labels(key.split(":", 1)[0]).inc()

    def try_pending(key: str, x: str | list[float], partition: int) -> None:
        waiting = pending.get(key)
        if waiting is not None:
            evict(pending, key, waiting)  # its tombstone goes where the entry was written
            if key not in joined:
                join(key, waiting["label"], x, partition)

    skip_guard = SkipGuard(app, settings=settings)

    async def store_inputs(task: str, stream: faust.StreamT) -> None:
        model = TASKS[task].event_model
        async for event in stream.events():
            if not await skip_guard.admit([event]):
                continue
            src = source(event)
            decoded = decode(model, event.message.value, src)
            if isinstance(decoded, DeadLetter):
                m.inputs_invalid.labels(task).inc()  # the scorer dead-letters it; here it is skipped
                continue
            ev: Any = decoded.event
            if task == "purchase_intent":
                assert isinstance(ev, ClickEvent)
                key = f"{task}:{ev.session_id}"
                prev_raw = inputs.get(key)
                prev = SessionState.model_validate(prev_raw["s"]) if prev_raw else None
                new, applied = apply_click(prev, ev, src.partition, src.offset)
                if not applied:
                    continue
                value: dict[str, Any] = {
                    "s": new.model_dump(mode="json"),
                    "t": ev.ts.timestamp(),
                    "cp": src.partition,
                }
                inputs[key] = value
                x: str | list[float] = _session_x(value)
            else:
                key, text = _input_value(task, ev)
                inputs[key] = {"x": text, "t": ev.ts.timestamp(), "cp": src.partition}
                x = text
            m.inputs_seen.labels(task).inc()
            try_pending(key, x, src.partition)

    async def dead_letter(dl: DeadLetter) -> None:
        fut = await app.producer.send(
            settings.topic(DLQ_TOPIC), None, dl.model_dump_json().encode(), None, None, None
        )
        await fut

    @app.agent(topic(TASKS["review_sentiment"].input_topic), name="trainer-reviews")
    async def reviews(stream: faust.StreamT) -> None:
        await store_inputs("review_sentiment", stream)

    @app.agent(topic(TASKS["query_class"].input_topic), name="trainer-searches")
    async def searches(stream: faust.StreamT) -> None:
        await store_inputs("query_class", stream)

    @app.agent(topic(TASKS["purchase_intent"].input_topic), name="trainer-clicks")
    async def clicks(stream: faust.StreamT) -> None:
        await store_inputs("purchase_intent", stream)

    @app.agent(topic(LABELS_TOPIC), name="trainer-labels")
    async def labels(stream: faust.StreamT) -> None:
        async for event in stream.events():
            if not await skip_guard.admit([event]):
                continue
            src = source(event)
            decoded = decode(LabelEvent, event.message.value, src)
            if isinstance(decoded, DeadLetter):
                m.labels_invalid.inc()
                log.warning("label_invalid", partition=src.partition, offset=src.offset, error=decoded.error)
                await dead_letter(decoded)
                continue
            assert isinstance(decoded, Decoded)
            lab: LabelEvent = decoded.event
            key = label_key(lab)
            label = {"y": label_name(lab), "p": src.partition, "o": src.offset, "t": lab.ts.timestamp()}
            if key in joined or key in pending:
                m.labels_duplicate.labels(lab.task).inc()
                continue
            held = inputs.get(key)
            if held is None:
                pending[key] = {"label": label, "arrived": time.time(), "cp": src.partition}
                continue
            join(key, label, _session_x(held) if lab.task == "purchase_intent" else held["x"], src.partition)

    def examples(task: str) -> list[Example]:
        prefix = task + ":"
        return [Example.from_json(v["ex"]) for k, v in list(joined.data.items()) if k.startswith(prefix)]

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
            state.retry_after[task] = time.monotonic() + min(settings.trainer_interval_s, 60.0)
        else:
            state.watermarks[task] = ts.watermark
            m.runs.labels(task, outcome).inc()
        finally:
            m.training.labels(task).set(0)
            m.run_seconds.labels(task).observe(time.monotonic() - started)
            state.last_run[task] = time.monotonic()
            state.running = None

    running_jobs: set[asyncio.Future[None]] = set()

    @app.timer(settings.trainer_check_s)
    async def check_triggers() -> None:
        res.readiness.beat()
        res.readiness.partitions_assigned = bool(app.consumer.assignment())
        now = time.monotonic()
        for task in TASK_NAMES:
            wm = state.watermarks.get(task, -1)
            exs = examples(task)
            fresh = sum(1 for e in exs if is_fresh(e, wm))
            m.fresh_labels.labels(task).set(fresh)
            if state.running is not None or now < state.retry_after.get(task, 0.0):
                continue
            reason = should_train(fresh, now - state.last_run.setdefault(task, now), trigger)
            if reason is None:
                continue
            ts = select(
                exs, wm, settings.trainer_holdout_fraction, settings.trainer_replay_ratio,
                settings.trainer_seed + state.runs, res.exclude_inputs, settings.trainer_holdout_max,
            )  # fmt: skip
            if not ts.fresh:
                continue
            state.running = task
            state.runs += 1
            log.info("training_triggered", task=task, reason=reason, fresh=len(ts.fresh),
                     holdout=len(ts.holdout), replay=len(ts.replay))  # fmt: skip
            running_jobs.add(asyncio.ensure_future(run_job(task, ts)))
            running_jobs.difference_update({j for j in running_jobs if j.done()})

    @app.timer(max(settings.trainer_check_s, 5.0))
    async def sweep() -> None:
        now = time.time()
        cutoff = now - settings.trainer_input_window_s
        held = sorted(inputs.data.items(), key=lambda kv: kv[1]["t"])
        excess = max(0, len(held) - settings.trainer_max_inputs)
        dropped = 0
        for i, (key, value) in enumerate(held):
            if i < excess or value["t"] < cutoff:
                evict(inputs, key, value)
                dropped += 1
        orphans: dict[str, int] = {}
        for key, value in list(pending.data.items()):
            if now - value["arrived"] > settings.trainer_label_wait_s:
                evict(pending, key, value)
                task = key.split(":", 1)[0]
                orphans[task] = orphans.get(task, 0) + 1
        for task, n in orphans.items():
            m.labels_orphan.labels(task).inc(n)
            log.warning("labels_orphaned", task=task, count=n, reason="input never seen or out of the window")
        for task in TASK_NAMES:
            wm = state.watermarks.get(task, -1)
            prefix = task + ":"
            old = sorted(
                ((k, v) for k, v in joined.data.items() if k.startswith(prefix)
                 and not is_fresh(Example.from_json(v["ex"]), wm)),
                key=lambda kv: kv[1]["ex"]["t"],
            )  # fmt: skip
            for key, value in old[: max(0, len(old) - settings.trainer_replay_max)]:
                evict(joined, key, value)
        m.inputs_held.set(len(inputs.data))
        m.labels_pending.set(len(pending.data))
        if dropped:
            log.info("inputs_evicted", count=dropped, held=len(inputs.data))

    return app

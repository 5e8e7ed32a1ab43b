"""Prometheus metrics of a worker, on its own registry (no module-level mutable state)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

# Readiness: (ready, reason). Called from the HTTP thread; must only read plain state.
ReadyCheck = Callable[[], tuple[bool, str]]


@dataclass
class Readiness:
    """What ``/readyz`` reports; written by the worker's event loop, read by the HTTP thread."""

    adapters_loaded: bool = False
    partitions_assigned: bool = False
    redis_reachable: bool = False
    needs_redis: bool = True
    heartbeat_at: float = 0.0  # monotonic time the event loop last ran its health timer
    max_silence_s: float = 30.0
    extra: list[Callable[[], str | None]] = field(default_factory=list)  # each: problem or None
    # Problems the event loop sets by name (a reason, or None once resolved), e.g. "progress":
    # the stalled partitions (ops/progress.py). Each concern owns its key.
    problems: dict[str, str | None] = field(default_factory=dict)
    # Scorer: task -> why it serves a version other than the released one (a start-up fallback,
    # scorer/swap.py); written by the release threads, removed once the release is served.
    fallbacks: dict[str, str] = field(default_factory=dict)

    def beat(self) -> None:
        self.heartbeat_at = time.monotonic()

    def check(self) -> tuple[bool, str]:
        silent = time.monotonic() - self.heartbeat_at
        missing = [
            name
            for name, ok in (
                ("adapters not loaded", self.adapters_loaded),
                ("no partitions assigned", self.partitions_assigned),
                ("redis unreachable", self.redis_reachable or not self.needs_redis),
                (f"event loop silent for {silent:.0f} s", silent <= self.max_silence_s),
            )
            if not ok
        ]
        missing += [problem for check in self.extra if (problem := check()) is not None]
        missing += [problem for problem in list(self.problems.values()) if problem is not None]
        missing += [f"{task} serves a fallback: {why}" for task, why in sorted(dict(self.fallbacks).items())]
        return (not missing, "; ".join(missing) or "ready")


def serve_http(registry: CollectorRegistry, port: int, host: str, ready: ReadyCheck | None = None) -> None:
    """``/metrics`` (Prometheus), ``/healthz`` (the process serves) and ``/readyz`` (``ready``)
    on one port, in a daemon thread. Port 0 disables it."""
    if not port:
        return
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok, why = ready() if ready is not None else (True, "ready")
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [why.encode() + b"\n"]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ScorerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.scored = Counter("streamtune_events_scored", "Events scored", ["task"], registry=r)
        self.dead_letters = Counter(
            "streamtune_dead_letters", "Events sent to the dead-letter topic", ["task"], registry=r
        )
        self.batch_size = Histogram(
            "streamtune_batch_size", "Events per model batch", ["task"], buckets=BATCH_BUCKETS, registry=r
        )
        self.model_seconds = Histogram(
            "streamtune_model_seconds", "Model time per batch", ["task"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "streamtune_event_to_redis_seconds",
            "Event time to Redis write",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_version = Gauge(
            "streamtune_adapter_version", "Adapter version in use", ["task"], registry=r
        )
        self.redis_retries = Counter("streamtune_redis_retries", "Redis write retries", registry=r)
        self.batch_failures = Counter(
            "streamtune_batch_failures",
            "Batches that failed and were taken again from their first offset",
            ["task"],
            registry=r,
        )
        self.batch_retries = Counter(
            "streamtune_batch_retries",
            "Batches retried in place after a failure that a service outage does not explain",
            ["task", "stage"],
            registry=r,
        )
        self.isolated = Counter(
            "streamtune_isolated_records",
            "Valid records that failed alone (bisected out of their batch) and went to the DLQ",
            ["task", "stage"],
            registry=r,
        )
        self.dead_letters_lost = Counter(
            "streamtune_dead_letters_lost",
            "Dead letters the broker refused even without their raw value (logged, not sent)",
            ["task"],
            registry=r,
        )
        self.dead_letters_unavailable = Counter(
            "streamtune_dead_letters_unavailable",
            "Dead letters refused for another reason than their size: the batch paused and is read again",
            ["task"],
            registry=r,
        )
        self.offset_skips = Counter(
            "streamtune_offset_skips",
            "Input records the consumer skipped and the scorer sought back to (see offsets.py)",
            registry=r,
        )
        self.sessions_expired = Counter(
            "streamtune_sessions_expired", "Session states expired after inactivity", registry=r
        )
        self.sessions_active = Gauge("streamtune_sessions_active", "Sessions held in the table", registry=r)
        self.results_by_version = Counter(
            "streamtune_results_by_version", "Results per adapter version", ["task", "version"], registry=r
        )
        self.drift_detected = Counter(
            "streamtune_drift_detected",
            "Changes the drift detectors found (river ADWIN), per task, signal and class or kind",
            ["task", "signal", "detail"],
            registry=r,
        )
        self.drift_last = Gauge(
            "streamtune_drift_last_detected_timestamp_seconds",
            "Wall-clock time of the task's latest drift detection",
            ["task"],
            registry=r,
        )
        self.results_by_path = Counter(
            "streamtune_results_by_path",
            "Results per answer path (linear, blend, transformer) of text tasks",
            ["task", "path"],
            registry=r,
        )
        self.canary_version = Gauge(
            "streamtune_canary_version", "Adapter version in canary (0: none)", ["task"], registry=r
        )
        self.canary_fraction = Gauge(
            "streamtune_canary_fraction", "Share of entities routed to the canary", ["task"], registry=r
        )
        self.shadow_agreement = Gauge(
            "streamtune_shadow_agreement", "Canary agrees with live (last batch)", ["task"], registry=r
        )
        self.shadow_confidence = Gauge(
            "streamtune_shadow_confidence", "Canary mean top probability (last batch)", ["task"], registry=r
        )
        self.shadow_rows = Counter("streamtune_shadow_rows", "Rows shadow-scored", ["task"], registry=r)
        self.refusals = Counter(
            "streamtune_adapter_refusals", "Adapter versions refused", ["task"], registry=r
        )
        self.consumer_lag = Gauge(
            "streamtune_consumer_lag", "Events on the input topic not yet consumed", ["task"], registry=r
        )
        self.oldest_in_progress = Gauge(
            "streamtune_oldest_in_progress_seconds",
            "Since the oldest batch still in progress was admitted (0: none in progress)",
            ["task"],
            registry=r,
        )
        self.swap_seconds = Histogram(
            "streamtune_swap_seconds", "Release seen to route swapped", ["task"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.releases_pending = Gauge(
            "streamtune_releases_pending",
            "Releases held back until their files (version directory, ONNX artifact) are on this"
            " scorer's disk, retried with back-off (0 or 1 per task: a newer release replaces it)",
            ["task"],
            registry=r,
        )
        self.adapter_fallback = Gauge(
            "streamtune_adapter_fallback",
            "1 while a task serves a fallback version, not the released one (its files were missing"
            " at start, or it was refused there); /readyz fails meanwhile",
            ["task"],
            registry=r,
        )

    def serve(self, port: int, host: str = "127.0.0.1", ready: ReadyCheck | None = None) -> None:
        serve_http(self.registry, port, host, ready)


@dataclass
class TrainerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.inputs_seen = Counter("streamtune_trainer_inputs", "Input events stored", ["task"], registry=r)
        self.inputs_held = Gauge("streamtune_trainer_inputs_held", "Inputs held in the window", registry=r)
        self.inputs_invalid = Counter(
            "streamtune_trainer_inputs_invalid",
            "Input events that failed validation (skipped)",
            ["task"],
            registry=r,
        )
        self.labels_joined = Counter(
            "streamtune_trainer_labels_joined", "Labels joined", ["task"], registry=r
        )
        self.served_judged = Counter(
            "streamtune_trainer_served_judged",
            "Labels judged against the answer a version served (outcome: right, wrong)",
            ["task", "version", "outcome"],
            registry=r,
        )
        self.fast_updates = Counter(
            "streamtune_trainer_fast_updates",
            "Fast-path updates of a text task's linear stage, by outcome (released, rejected, skipped,"
            " failed, superseded, ...)",
            ["task", "outcome"],
            registry=r,
        )
        self.fast_update_cpu = Histogram(
            "streamtune_trainer_fast_update_cpu_seconds",
            "CPU seconds of one fast-path update, from its labels to the gate's verdict (and publishing)",
            ["task"],
            buckets=(0.5, 1, 2, 5, 10, 20, 60),
            registry=r,
        )
        self.drift_detected = Counter(
            "streamtune_trainer_drift_detected",
            "Changes in a served version's error rate on labelled traffic (river ADWIN)",
            ["task"],
            registry=r,
        )
        self.labels_duplicate = Counter(
            "streamtune_trainer_labels_duplicate", "Labels dropped as duplicates", ["task"], registry=r
        )
        self.labels_orphan = Counter(
            "streamtune_trainer_labels_orphan",
            "Labels whose input was never seen or fell out of the window",
            ["task"],
            registry=r,
        )
        self.labels_invalid = Counter(
            "streamtune_trainer_labels_invalid", "Labels that failed validation (dead-lettered)", registry=r
        )
        self.labels_dropped = Counter(
            "streamtune_trainer_labels_dropped",
            "Valid labels given up without joining, by reason: pending_full (more than"
            " STREAMTUNE_TRAINER_MAX_PENDING or STREAMTUNE_TRAINER_MAX_PENDING_BYTES waiting; the"
            " oldest arrival goes), orphan (the input"
            " stream moved past the label; also counted in labels_orphan)",
            ["task", "reason"],
            registry=r,
        )
        self.labels_pending = Gauge(
            "streamtune_trainer_labels_pending", "Labels waiting for their input", registry=r
        )
        self.store_bytes = Gauge(
            "streamtune_trainer_store_bytes",
            "Bytes held in each trainer table (inputs, pending, joined), each entry counted as its"
            " compact JSON; bounded by STREAMTUNE_TRAINER_MAX_INPUT_BYTES, _MAX_PENDING_BYTES and"
            " _MAX_REPLAY_BYTES",
            ["table"],
            registry=r,
        )
        self.fresh_labels = Gauge(
            "streamtune_trainer_fresh_labels", "Joined labels not yet trained on", ["task"], registry=r
        )
        self.runs = Counter(
            "streamtune_trainer_runs", "Training runs by outcome", ["task", "outcome"], registry=r
        )
        self.run_seconds = Histogram(
            "streamtune_trainer_run_seconds", "Training run time", ["task"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800), registry=r,
        )  # fmt: skip
        self.gate_metric = Gauge(
            "streamtune_trainer_gate_metric",
            "Gate metric of the last run on the holdout",
            ["task", "model"],
            registry=r,
        )
        self.training = Gauge(
            "streamtune_trainer_training", "1 while a run is in progress", ["task"], registry=r
        )

    def serve(self, port: int, host: str = "127.0.0.1", ready: ReadyCheck | None = None) -> None:
        serve_http(self.registry, port, host, ready)

"""``streamtune demo``: the whole path on the embedded stack, with a live terminal view.

Starts Kafka (KRaft, from the Maven jars) and Redis, trains version-1 adapters if the
registry has none, starts one scorer process, replays the three data sets (with a share of
malformed events) and shows events/s, latency percentiles, dead letters and recent results.
Stops everything on Ctrl-C or after ``--duration`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from streamtune.errors import StartupError
from streamtune.registry import LocalRegistry
from streamtune.settings import REPO_ROOT, Settings
from streamtune.stack import EmbeddedKafka, ensure_redis, find_free_port
from streamtune.tail import describe
from streamtune.tasks import TASK_NAMES, TASKS


@dataclass
class Snapshot:
    """Counters scraped from the scorer's /metrics at one instant."""

    at: float
    scored: dict[str, float] = field(default_factory=dict)
    dead: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # task -> (le, count)
    versions: dict[str, float] = field(default_factory=dict)


def scrape(port: int) -> Snapshot:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    snap = Snapshot(at=time.monotonic())
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            task = s.labels.get("task", "")
            if s.name == "streamtune_events_scored_total":
                snap.scored[task] = s.value
            elif s.name == "streamtune_dead_letters_total":
                snap.dead[task] = s.value
            elif s.name == "streamtune_event_to_redis_seconds_bucket":
                snap.buckets.setdefault(task, []).append((float(s.labels["le"]), s.value))
            elif s.name == "streamtune_adapter_version":
                snap.versions[task] = s.value
    return snap


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the histogram bucket holding quantile ``q`` (Prometheus-style, coarse)."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    for le, count in buckets:
        if count >= q * total:
            return le
    return None


def _delta(now: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    prev = dict(before)
    return [(le, c - prev.get(le, 0.0)) for le, c in now]


def render(first: Snapshot, prev: Snapshot, cur: Snapshot, recent: deque[str], elapsed: float) -> Group:
    table = Table(title=f"streamtune demo — {elapsed:,.0f} s", expand=True)
    for col in ("task", "adapter", "scored", "events/s", "p50 ms", "p99 ms", "dead letters"):
        table.add_column(col, justify="left" if col in ("task", "adapter") else "right", no_wrap=True)
    dt = max(cur.at - prev.at, 1e-6)
    for task in TASK_NAMES:
        rate = (cur.scored.get(task, 0) - prev.scored.get(task, 0)) / dt
        window = _delta(cur.buckets.get(task, []), first.buckets.get(task, []))
        p50, p99 = quantile(window, 0.5), quantile(window, 0.99)
        fmt = lambda v: "–" if v is None else ("> 30000" if v == float("inf") else f"≤ {v * 1000:,.0f}")  # noqa: E731
        ver = cur.versions.get(task)
        table.add_row(
            task,
            f"v{ver:.0f}" if ver else "–",
            f"{cur.scored.get(task, 0):,.0f}",
            f"{rate:,.1f}",
            fmt(p50),
            fmt(p99),
            f"{cur.dead.get(task, 0):,.0f}",
        )
    results = Panel("\n".join(recent) or "waiting for results…", title="recent results", expand=True)
    return Group(table, results)


def _follow(settings: Settings, recent: deque[str], stop: threading.Event) -> None:
    topics = [settings.topic(t.output_topic) for t in TASKS.values()] + [settings.topic("events.dlq")]
    consumer = KafkaConsumer(
        *topics,
        bootstrap_servers=settings.bootstrap_servers.split(","),
        auto_offset_reset="latest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=500,
    )
    try:
        while not stop.is_set():
            for msg in consumer:
                recent.append(describe(msg.topic, json.loads(msg.value))[:160])
                if stop.is_set():
                    break
    finally:
        consumer.close()


def _wait_for(cond: object, timeout_s: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise StartupError(f"scorer exited while {what}:\n" + "\n".join(tail))
        with contextlib.suppress(OSError):
            if callable(cond) and cond():
                return
        time.sleep(0.2)
    raise StartupError(f"timed out after {timeout_s:.0f} s {what} (log: {log})")


def run_demo(base: Settings, duration: float, rate: float, malformed: float) -> None:
    from rich.console import Console

    from streamtune.logs import configure_logging
    from streamtune.replay import replay
    from streamtune.training.bootstrap import TrainConfig, train_task

    console = Console()
    work = REPO_ROOT / "var" / "demo"
    work.mkdir(parents=True, exist_ok=True)
    configure_logging("ERROR", json=False)
    console.print("[bold]streamtune demo[/] — starting the embedded stack (Kafka 3.9 KRaft, Redis)…")
    kafka = EmbeddedKafka(work_dir=work / "kafka")
    procs: list[subprocess.Popen[bytes]] = []
    redis_srv = None
    stop = threading.Event()
    try:
        kafka.start()
        redis_url, redis_srv = ensure_redis(base.redis_url, work / "redis")
        metrics_port = find_free_port()
        settings = base.model_copy(
            update={
                "bootstrap_servers": kafka.bootstrap_servers,
                "redis_url": redis_url,
                "metrics_port": metrics_port,
            }
        )
        console.print(f"  Kafka {settings.bootstrap_servers}  Redis {redis_url}")
        registry = LocalRegistry(settings.adapter_dir)
        for task in TASK_NAMES:
            if registry.latest(task) is None:
                console.print(f"  training version 1 of {task} (first run only)…")
                train_task(task, settings.base_model, settings.data_dir, registry, TrainConfig())
        env = {
            **os.environ,
            **{
                f"STREAMTUNE_{k.upper()}": str(v)
                for k, v in {
                    "bootstrap_servers": settings.bootstrap_servers,
                    "redis_url": redis_url,
                    "metrics_port": metrics_port,
                    "adapter_dir": settings.adapter_dir,
                    "topic_prefix": settings.topic_prefix,
                    "group_id": settings.group_id,
                }.items()
            },
        }
        log = work / "scorer.log"
        with log.open("wb") as out:
            scorer = subprocess.Popen(
                [sys.executable, "-m", "streamtune.cli", "scorer"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(scorer)
        console.print(f"  scorer pid {scorer.pid}, logs in {log}; loading the model…")
        _wait_for(lambda: scrape(metrics_port) is not None, 180, "loading the model", scorer, log)
        recent: deque[str] = deque(maxlen=8)
        threading.Thread(target=_follow, args=(settings, recent, stop), daemon=True).start()
        producer = threading.Thread(
            target=replay,
            kwargs={
                "settings": settings,
                "tasks": list(TASK_NAMES),
                "limit": 1_000_000,
                "rate": rate,
                "malformed_share": malformed,
                "labels": True,
                "should_stop": stop.is_set,
            },
            daemon=True,
        )
        producer.start()
        started = time.monotonic()
        first = prev = scrape(metrics_port)
        with Live(render(first, prev, prev, recent, 0), console=console, refresh_per_second=2) as live:
            while not duration or time.monotonic() - started < duration:
                if scorer.poll() is not None:
                    raise StartupError(f"scorer exited with {scorer.returncode}; see {log}")
                stop.wait(1.0)
                cur = scrape(metrics_port)
                live.update(render(first, prev, cur, recent, time.monotonic() - started))
                prev = cur
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        if redis_srv is not None:
            redis_srv.stop()
        kafka.stop()
        console.print("demo stopped; stack shut down.")

"""Test session: a real Kafka broker and a real Redis on free ports (the demo's own code starts
them), the real model, and helpers that wait on conditions with a bound, never on sleeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from streamtune.settings import REPO_ROOT, Settings
from streamtune.stack import EmbeddedKafka, EmbeddedRedis, find_free_port
from streamtune.workers import settings_env as worker_env


def wait_until(
    cond: Callable[[], Any],
    timeout_s: float,
    what: str,
    poll_s: float = 0.1,
    guard: Callable[[], None] | None = None,
    context: Callable[[], str] | None = None,
) -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout_s``.

    ``guard`` runs before each poll and fails fast (e.g. when a worker process died);
    ``context`` adds what helps explain a timeout (a worker's log tail) to the failure.
    """
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        if guard is not None:
            guard()
        try:
            value = cond()
            if value:
                return value
        except Exception as e:
            last_exc = e
        time.sleep(poll_s)
    raise AssertionError(
        f"timed out after {timeout_s} s waiting for {what}"
        + (f" (last error: {last_exc})" if last_exc else "")
        + (f"\n{context()}" if context is not None else "")
    )


@dataclass
class Stack:
    kafka: EmbeddedKafka
    redis: EmbeddedRedis

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap_servers

    @property
    def redis_url(self) -> str:
        return self.redis.url


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("stack")
    kafka = EmbeddedKafka(work_dir=work / "kafka")
    red = EmbeddedRedis(work / "redis")
    kafka.start()
    red.start()
    try:
        yield Stack(kafka, red)
    finally:
        red.stop()
        kafka.stop()


@pytest.fixture
def settings(stack: Stack, tmp_path: Path) -> Settings:
    """Settings isolated per test: own topic prefix, consumer group and Redis database keys."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        bootstrap_servers=stack.bootstrap,
        redis_url=stack.redis_url,
        topic_prefix=f"t{tag}.",
        group_id=f"scorer-{tag}",
        topic_partitions=2,
        metrics_port=find_free_port(),
        state_dir=tmp_path / "state",
        batch_max_events=16,
        batch_max_ms=30,
        commit_interval_s=0.2,
        kafka_session_timeout_s=15.0,  # a SIGKILLed scorer's partitions move on quickly
        torch_threads=1,
        # Delivery and rollout tests copy versions around without exporting them: torch needs no
        # artifacts. The default (ONNX) path runs in test_onnx_backend, the ONNX end-to-end test,
        # the demo test (trainer export + canary hot-swap) and the benchmark's quick mode.
        backend="torch",
        log_json=True,
        lib_log_level="INFO",  # rebalances and table recovery in the worker logs a failed test prints
    )


@pytest.fixture
def redis_client(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """A worker's environment: the settings as ``STREAMTUNE_*``, this checkout on PYTHONPATH."""
    return worker_env(settings)


class ScorerProcess:
    """A real ``streamtune scorer`` process."""

    def __init__(self, settings: Settings, log_path: Path, command: str = "scorer") -> None:
        self.settings = settings
        self.log_path = log_path
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ScorerProcess:
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamtune.cli", self.command],
            env=settings_env(self.settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        wait_until(self.ready, 180, f"the {self.command} to start and serve /metrics", poll_s=0.3)
        return self

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.settings.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as r:
            return str(r.read().decode())

    def assert_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.command} exited ({self.proc.returncode}):\n{self.log()[-3000:]}")

    def ready(self) -> bool:
        self.assert_alive()
        try:
            self.metrics()
        except OSError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 8000) -> str:
        return f"--- {self.log_path.name} (last {chars} chars) ---\n{self.log()[-chars:]}"

    def stacks(self) -> str:
        """What a stalled worker is doing, for a timeout's message: every thread's Python stack
        from outside (py-spy: works while the event loop is blocked) and, from inside, every
        asyncio task's (mode's SIGUSR1 handler; needs the loop to run), bounded by 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return ""
        spy = Path(sys.executable).with_name("py-spy")
        try:
            dump = subprocess.run(
                [str(spy), "dump", "--pid", str(self.proc.pid)], capture_output=True, text=True, timeout=30
            )
            threads = dump.stdout + dump.stderr
        except (OSError, subprocess.TimeoutExpired) as e:
            threads = f"(py-spy failed: {e})"
        size = self.log_path.stat().st_size
        try:
            os.kill(self.proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return f"--- {self.log_path.name}: threads ---\n{threads}\n(the process ended meanwhile)"
        deadline, last = time.monotonic() + 10, -1
        while time.monotonic() < deadline:
            now = self.log_path.stat().st_size
            if now > size and now == last:  # the dump started and stopped growing
                break
            last = now
            time.sleep(0.5)
        with self.log_path.open("rb") as f:
            f.seek(size)
            tasks = f.read().decode(errors="replace")
        return f"--- {self.log_path.name}: threads ---\n{threads}\n--- asyncio tasks ---\n{tasks[-20000:]}"

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        return int(self.proc.returncode)


@pytest.fixture
def scorer_factory(tmp_path: Path) -> Iterator[Callable[[Settings], ScorerProcess]]:
    started: list[ScorerProcess] = []

    def make(s: Settings) -> ScorerProcess:
        p = ScorerProcess(s, tmp_path / f"scorer-{len(started)}.log")
        started.append(p)
        return p

    yield make
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.stop()


def consume_all(settings: Settings, topic: str, expected: int, timeout_s: float = 120) -> list[Any]:
    """Read a topic from the beginning until ``expected`` records arrived (bounded)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        settings.topic(topic),
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=1000,
    )
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for msg in consumer:
                records.append(msg)
                if len(records) >= expected:
                    break
    finally:
        consumer.close()
    return records


def read_topic(settings: Settings, topic: str, timeout_s: float = 60) -> list[Any]:
    """Every record a topic holds now: each partition read from its start to its end offset."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False, group_id=None
    )
    try:
        name = settings.topic(topic)
        tps = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read {name} to its end within {timeout_s} s"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def load_json(raw: bytes) -> Any:
    return json.loads(raw)

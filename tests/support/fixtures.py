"""Fixtures of the integration tier: a real Kafka broker and a real Redis on free ports (the
demo's own code starts them), settings isolated per test, and real scorer processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from streamtune.core.settings import Settings
from streamtune.devtools.stack import EmbeddedKafka, EmbeddedRedis, find_free_port
from support.processes import ScorerProcess
from support.registry import pinned_registry


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
        adapter_dir=pinned_registry(tmp_path / "adapters-pinned"),  # each task's v1 (support/registry.py)
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
        # STREAMTUNE_TEST_LOG_LEVEL=DEBUG makes the workers log every batch's partitions and offsets.
        log_level=os.environ.get("STREAMTUNE_TEST_LOG_LEVEL", "INFO"),
        lib_log_level="INFO",  # rebalances and table recovery in the worker logs a failed test prints
    )


@pytest.fixture
def redis_client(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


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

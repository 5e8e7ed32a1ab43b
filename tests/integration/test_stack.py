"""The embedded local stack: a real KRaft broker and a real redis-server, started in temp dirs."""

from __future__ import annotations

import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from streamtune.core.errors import StackError
from streamtune.devtools.stack import (
    EmbeddedKafka,
    EmbeddedRedis,
    ensure_kafka_jars,
    ensure_redis,
    find_free_port,
    kafka_answers,
    redis_answers,
)

# --------------------------------------------------------------------------------------------------
# fixtures (module-local on purpose: the session-wide stack lives in conftest.py)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedKafka]:
    broker = EmbeddedKafka(tmp_path_factory.mktemp("kafka"))
    with broker:
        yield broker
    assert not broker.running


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    with server:
        yield server
    assert not server.running


def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    try:
        producer.send(topic, key=b"k", value=value).get(timeout=15)
    finally:
        producer.close(timeout=5)


def _consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 15.0) -> list[bytes]:
    """Read partition 0 from the beginning (manual assignment: no group rebalance to wait for)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while len(values) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                values.extend(record.value for record in records)
        return values
    finally:
        consumer.close()


def _create_topic(bootstrap: str, topic: str) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics(
            {topic: {"num_partitions": 1, "replication_factor": 1}}, timeout_ms=10_000, wait_for_metadata=True
        )
        assert topic in admin.list_topics()
    finally:
        admin.close()


# --------------------------------------------------------------------------------------------------
# integration: the real servers
# --------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_kafka_roundtrip_and_restart(kafka: EmbeddedKafka) -> None:
    assert kafka.bootstrap_servers == f"127.0.0.1:{kafka.port}"
    assert kafka_answers(kafka.bootstrap_servers)
    topic = f"stack-{uuid.uuid4().hex[:8]}"
    _create_topic(kafka.bootstrap_servers, topic)

    _produce(kafka.bootstrap_servers, topic, b"before-restart")
    assert _consume_all(kafka.bootstrap_servers, topic, expected=1) == [b"before-restart"]

    port, controller_port, pid = kafka.port, kafka.controller_port, kafka.pid
    kafka.restart()
    assert (kafka.port, kafka.controller_port) == (port, controller_port)
    assert kafka.pid != pid
    assert kafka_answers(kafka.bootstrap_servers)
    # Same data dir: the topic and its record survived the restart.
    _produce(kafka.bootstrap_servers, topic, b"after-restart")
    assert _consume_all(kafka.bootstrap_servers, topic, expected=2) == [b"before-restart", b"after-restart"]

    # The broker logs to its file in work_dir, not to our stdout.
    assert "Kafka Server started" in kafka.log_file.read_text()


@pytest.mark.integration
def test_kafka_kill_then_restart(kafka: EmbeddedKafka) -> None:
    kafka.kill()
    assert not kafka.running
    assert not kafka_answers(kafka.bootstrap_servers, timeout_s=1.0)
    kafka.restart()
    assert kafka.running
    assert kafka_answers(kafka.bootstrap_servers)


@pytest.mark.integration
def test_redis_roundtrip_and_restart(redis_server: EmbeddedRedis) -> None:
    url = redis_server.url
    assert url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.Redis.from_url(url)
    try:
        assert client.set("stack:key", "value")
        assert client.get("stack:key") == b"value"
    finally:
        client.close()

    redis_server.restart()
    assert redis_server.url == url
    assert redis_answers(url)
    client = redis.Redis.from_url(url)
    try:
        assert client.get("stack:key") is None  # --save "": nothing persisted
        assert client.set("stack:key", "again")
        assert client.get("stack:key") == b"again"
    finally:
        client.close()

    redis_server.kill()
    assert not redis_answers(url)
    redis_server.restart()
    assert redis_answers(url)


@pytest.mark.integration
def test_ensure_redis_reuses_answering_url_else_starts_one(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    url, embedded = ensure_redis(redis_server.url, tmp_path)
    assert (url, embedded) == (redis_server.url, None)

    dead = f"redis://127.0.0.1:{find_free_port()}/0"
    url, embedded = ensure_redis(dead, tmp_path)
    assert embedded is not None
    try:
        assert url == embedded.url != dead
        assert redis_answers(url)
    finally:
        embedded.stop()
    assert not redis_answers(url)


# --------------------------------------------------------------------------------------------------
# unit: no servers needed
# --------------------------------------------------------------------------------------------------


def test_find_free_port_is_bindable() -> None:
    import socket

    port = find_free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_nothing_answers_on_a_free_port() -> None:
    port = find_free_port()
    assert not redis_answers(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    assert not kafka_answers(f"127.0.0.1:{port}", timeout_s=0.5)


def test_kafka_ports_are_distinct(tmp_path: Path) -> None:
    broker = EmbeddedKafka(tmp_path, port=find_free_port())
    assert broker.port != broker.controller_port
    with pytest.raises(StackError):
        EmbeddedKafka(tmp_path, port=broker.port, controller_port=broker.port)


@pytest.mark.parametrize(
    ("missing", "make", "hint"),
    [
        ("java", lambda p: EmbeddedKafka(p, cache_dir=p), "apt-get install -y openjdk-17-jre-headless"),
        ("redis-server", lambda p: EmbeddedRedis(p), "apt-get install -y redis-server"),
    ],
)
def test_missing_binary_gives_one_line_hint(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    missing: str,
    make: Callable[[Path], EmbeddedKafka | EmbeddedRedis],
    hint: str,
) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == missing else real_which(name))
    with pytest.raises(StackError) as info:
        make(tmp_path).start()
    message = str(info.value)
    assert hint in message and "docker compose up" in message and "\n" not in message


def _fake_mvn(bin_dir: Path, calls: Path, *, fail: bool = False) -> None:
    """A stand-in ``mvn`` that 'copies' one jar into -DoutputDirectory and counts its calls."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "mvn"
    body = "echo boom >&2; exit 3" if fail else 'mkdir -p "$out" && touch "$out/kafka_2.13-3.9.1.jar"'
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'echo call >> "{calls}"\n'
        'for a in "$@"; do case "$a" in -DoutputDirectory=*) out="${a#-DoutputDirectory=}";; esac; done\n'
        f"{body}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_jars_fetched_once_and_half_fetch_redone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    _fake_mvn(tmp_path / "bin", calls)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"

    libs = ensure_kafka_jars(cache)
    assert libs == cache / "kafka-3.9.1" / "libs"
    assert (libs / "kafka_2.13-3.9.1.jar").is_file()
    assert EmbeddedKafka(tmp_path / "w", cache_dir=cache).ensure_jars() == libs
    assert calls.read_text().count("call") == 1  # cached: mvn ran once

    # A fetch that died half-way leaves jars but no marker: it is redone.
    (libs.parent / ".jars-complete").unlink()
    ensure_kafka_jars(cache)
    assert calls.read_text().count("call") == 2
    assert not list(libs.parent.glob("libs.partial-*"))


def test_failed_fetch_raises_and_leaves_no_marker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_mvn(tmp_path / "bin", tmp_path / "calls", fail=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(StackError, match="boom"):
        ensure_kafka_jars(tmp_path / "cache")
    assert not (tmp_path / "cache" / "kafka-3.9.1" / ".jars-complete").exists()
    assert not list((tmp_path / "cache" / "kafka-3.9.1").glob("libs*"))


def test_missing_mvn_gives_one_line_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(StackError) as info:
        EmbeddedKafka.ensure_jars_default(tmp_path / "cache")
    assert "apt-get install -y maven" in str(info.value) and "\n" not in str(info.value)

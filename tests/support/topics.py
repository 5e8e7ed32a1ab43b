"""Reading topics to their end from a test."""

from __future__ import annotations

import json
import time
from typing import Any

from streamtune.core.settings import Settings
from streamtune.kafka.read import read_to_end


def consume_all(settings: Settings, topic: str, expected: int, timeout_s: float = 120) -> list[Any]:
    """Read a topic from the beginning until ``expected`` records arrived (bounded)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        settings.topic(topic),
        bootstrap_servers=settings.kafka.bootstrap_servers,
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
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False, group_id=None
    )
    try:
        return read_to_end(consumer, settings.topic(topic), timeout_s, poll_ms=500)[0]
    finally:
        consumer.close()


def load_json(raw: bytes) -> Any:
    return json.loads(raw)

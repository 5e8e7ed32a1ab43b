"""Read a topic from its start to its end (kafka-python): what it holds now, bounded in time.

One loop for the release log, the chaos suite and the tests' helpers: each partition from its
beginning up to the end offset it had when the read began (records produced meanwhile are left
for a follower), so the read ends even while producers go on.
"""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from streamtune.core.errors import StreamtuneError


class TopicReadTimeout(StreamtuneError):
    """A topic could not be read to its end offsets in time (the broker is slow or away)."""


def read_to_end(
    consumer: KafkaConsumer, topic: str, timeout_s: float, poll_ms: int = 200
) -> tuple[list[Any], dict[TopicPartition, int]]:
    """Every record ``topic`` holds now (kafka-python ``ConsumerRecord`` s, partition by
    partition in offset order within each), and the end offsets read to. ``consumer`` must have
    no group (``group_id=None``); it is assigned the topic's partitions."""
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or set())]
    if not tps:
        return [], {}
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    end: dict[TopicPartition, int] = consumer.end_offsets(tps)
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while any(consumer.position(tp) < end[tp] for tp in tps):
        if time.monotonic() > deadline:
            raise TopicReadTimeout(f"could not read {topic} to its end within {timeout_s:.0f} s")
        for batch in consumer.poll(timeout_ms=poll_ms).values():
            records.extend(batch)
    return records, end

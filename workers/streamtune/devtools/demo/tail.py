"""``streamtune tail``: follow an output topic from the terminal."""

from __future__ import annotations

import json

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from rich.console import Console

from streamtune.core.errors import StartupError
from streamtune.core.settings import Settings
from streamtune.kafka.security import kafka_client_kwargs


def describe(topic: str, value: dict[str, object]) -> str:
    """One readable line per result."""
    adapter = value.get("adapter") or {}
    ver = f"v{adapter.get('version')}" if isinstance(adapter, dict) else "?"
    if "probabilities" in value:
        probs = value["probabilities"]
        ps = " ".join(f"{k}={v:.2f}" for k, v in probs.items()) if isinstance(probs, dict) else ""
        return f"[review] {value['event_id']} product={value['product_id']} → {value['label']} ({ps}) {ver}"
    if "top" in value:
        top = value["top"]
        ts = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in top) if isinstance(top, list) else ""
        return f"[search] {value['event_id']} → {ts} {ver}"
    if "purchase_probability" in value:
        return (
            f"[click] {value['event_id']} session={value['session_id']} views={value['page_views']} "
            f"p(buy)={value['purchase_probability']:.3f} {ver}"
        )
    if "error" in value:
        return f"[dlq] {value['source_topic']}[{value['partition']}]@{value['offset']}: {value['error']}"
    return json.dumps(value)


def run_tail(settings: Settings, topic: str, from_beginning: bool, max_messages: int, raw: bool) -> None:
    console = Console()
    try:
        consumer = KafkaConsumer(
            settings.topic(topic),
            **kafka_client_kwargs(settings),
            auto_offset_reset="earliest" if from_beginning else "latest",
            enable_auto_commit=False,
            group_id=None,
        )
    except (KafkaError, OSError) as e:
        raise StartupError(
            f"cannot reach Kafka at STREAMTUNE_BOOTSTRAP_SERVERS={settings.kafka.bootstrap_servers} ({e})"
        ) from e
    seen = 0
    try:
        for msg in consumer:
            if raw:
                console.print(msg.value.decode("utf-8", "replace"), markup=False, highlight=False)
            else:
                console.print(describe(topic, json.loads(msg.value)), markup=False, highlight=False)
            seen += 1
            if max_messages and seen >= max_messages:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()

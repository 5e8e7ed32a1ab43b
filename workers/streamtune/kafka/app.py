"""The Faust app factory both workers share (scorer and trainer differ only in app id)."""

from __future__ import annotations

from pathlib import Path

import faust

from streamtune.core.settings import Settings
from streamtune.kafka import compat
from streamtune.kafka.security import faust_credentials

# Table keys and values as JSON (readable changelogs, no pickle).
JSON_TABLE: faust.Schema = faust.Schema(key_serializer="json", value_serializer="json")


def worker_app(settings: Settings, app_id: str) -> faust.App:
    """A Faust app with raw topics, in-memory tables recovered from changelogs, acks=all, the
    configured security, a session timeout that bounds how long a crashed worker holds its
    partitions, and the workarounds of :mod:`streamtune.kafka.compat` installed."""
    app = faust.App(
        app_id,
        broker=[f"kafka://{s.strip()}" for s in settings.kafka.bootstrap_servers.split(",")],
        store="memory://",
        datadir=str(Path(settings.ops.state_dir) / app_id),
        web_enabled=False,
        topic_partitions=settings.kafka.topic_partitions,
        topic_replication_factor=settings.kafka.topic_replication,
        topic_disable_leader=True,
        table_standby_replicas=0,
        broker_commit_interval=settings.kafka.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        producer_acks=-1,
        # No linger: a batch waits for its own deliveries only (scorer/app.FaustPublisher.flush),
        # and each of its records goes out at once, not after a linger.
        producer_linger=0.0,
        broker_credentials=faust_credentials(settings),
        broker_session_timeout=settings.kafka.session_timeout_s,
        broker_rebalance_timeout=settings.kafka.session_timeout_s,
        broker_heartbeat_interval=max(1.0, settings.kafka.session_timeout_s / 10),
    )
    compat.install(app)
    return app

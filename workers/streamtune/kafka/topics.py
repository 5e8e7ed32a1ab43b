"""Topic layout and creation (``streamtune topics``; the scorer also creates missing topics at start)."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streamtune.core.errors import StartupError
from streamtune.core.settings import Settings
from streamtune.core.tasks import DLQ_TOPIC, LABELS_TOPIC, RELEASES_TOPIC, TASKS
from streamtune.kafka.security import kafka_client_kwargs

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int
    config: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    p, r = settings.kafka.topic_partitions, settings.kafka.topic_replication
    names = [t.input_topic for t in TASKS.values()] + [t.output_topic for t in TASKS.values()]
    names += [DLQ_TOPIC, LABELS_TOPIC]
    specs = [TopicSpec(settings.topic(n), p, r, {}) for n in names]
    # One record per task (the current release); compaction keeps it forever.
    compact = {"cleanup.policy": "compact"}
    specs.append(TopicSpec(settings.topic(RELEASES_TOPIC), 1, r, compact))
    # Faust table changelogs, created here rather than by Faust at start: a worker then never
    # sees its table's changelog missing from metadata (on a multi-broker cluster topic creation
    # takes a moment to propagate, and Faust fails the table's agent on the partition check).
    specs += [TopicSpec(changelog_topic(settings.kafka.group_id, "sessions"), p, r, compact)]
    specs += [TopicSpec(changelog_topic(settings.trainer.group_id, t), p, r, compact) for t in TRAINER_TABLES]
    return specs


TRAINER_TABLES = ("inputs", "joined", "pending")


def changelog_topic(app_id: str, table: str) -> str:
    """Faust's name for a table's changelog topic."""
    return f"{app_id}-{table}-changelog"


def admin_client(settings: Settings, timeout_s: float = 10.0) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(
            **kafka_client_kwargs(settings),
            client_id="streamtune-admin",
            request_timeout_ms=int(timeout_s * 1000),
            bootstrap_timeout_ms=int(timeout_s * 1000),
        )
    except (KafkaError, OSError, ValueError) as e:
        hint = ""
        if settings.security.kafka_protocol.startswith("SASL"):
            # kafka-python reports a refused login as a failed bootstrap: name what to check.
            hint = (
                f"; with STREAMTUNE_KAFKA_SECURITY_PROTOCOL={settings.security.kafka_protocol}, also check"
                " STREAMTUNE_KAFKA_SASL_MECHANISM, STREAMTUNE_KAFKA_SASL_USERNAME"
                " and STREAMTUNE_KAFKA_SASL_PASSWORD"
            )
        raise StartupError(
            "cannot reach Kafka at"
            f" STREAMTUNE_BOOTSTRAP_SERVERS={settings.kafka.bootstrap_servers} ({e}){hint}"
        ) from e


def ensure_topics(settings: Settings) -> list[str]:
    """Create the missing topics; returns the names created."""
    admin = admin_client(settings)
    try:
        existing = set(admin.list_topics())
        missing = [s for s in topic_specs(settings) if s.name not in existing]
        created = []
        for spec in missing:
            try:
                admin.create_topics(
                    [NewTopic(spec.name, spec.partitions, spec.replication, topic_configs=spec.config)]
                )
                created.append(spec.name)
            except TopicAlreadyExistsError:  # another process won the race
                pass
        if created:
            log.info("topics_created", topics=created)
        return created
    except KafkaError as e:
        raise StartupError(f"cannot create topics on {settings.kafka.bootstrap_servers}: {e}") from e
    finally:
        admin.close()

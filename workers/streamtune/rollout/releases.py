"""The ``adapters.releases`` topic: read the rollout state, announce actions, follow changes."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from pydantic import ValidationError

from streamtune.core.errors import StartupError
from streamtune.core.settings import Settings
from streamtune.core.tasks import RELEASES_TOPIC
from streamtune.kafka.read import TopicReadTimeout, read_to_end
from streamtune.kafka.security import kafka_client_kwargs
from streamtune.rollout.state import Release, current_states

log = structlog.get_logger(__name__)


class ReleaseLog:
    """Synchronous access to the releases topic (kafka-python): CLI, trainer and scorer start-up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(RELEASES_TOPIC)

    def _consumer(self) -> KafkaConsumer:
        try:
            return KafkaConsumer(
                **kafka_client_kwargs(self.settings),
                group_id=None,
                enable_auto_commit=False,
                consumer_timeout_ms=self.settings.scorer.releases_poll_ms,
            )
        except (KafkaError, OSError) as e:
            raise StartupError(
                "cannot reach Kafka at"
                f" STREAMTUNE_BOOTSTRAP_SERVERS={self.settings.kafka.bootstrap_servers} ({e})"
            ) from e

    def read_all(self, timeout_s: float = 30.0) -> tuple[list[Release], dict[TopicPartition, int]]:
        """Every record up to the current end, and the end offsets (to follow from there)."""
        consumer = self._consumer()
        try:
            msgs, end = read_to_end(consumer, self.topic, timeout_s)
        except TopicReadTimeout as e:
            raise StartupError(str(e)) from e
        finally:
            consumer.close()
        return [r for msg in msgs if (r := parse(msg.value)) is not None], end

    def states(self) -> dict[str, Release]:
        return current_states(self.read_all()[0])

    def publish(self, release: Release) -> None:
        try:
            producer = KafkaProducer(**kafka_client_kwargs(self.settings), acks="all")
        except (KafkaError, OSError) as e:
            raise StartupError(
                "cannot reach Kafka at"
                f" STREAMTUNE_BOOTSTRAP_SERVERS={self.settings.kafka.bootstrap_servers} ({e})"
            ) from e
        try:
            producer.send(self.topic, key=release.key(), value=release.model_dump_json().encode()).get(30)
        finally:
            producer.close(timeout=10)
        log.info(
            "release_published",
            task=release.task,
            version=release.version,
            stage=release.stage,
            live=release.live_version,
            canary=release.canary_version,
            fraction=release.canary_fraction,
        )


def parse(raw: bytes | None) -> Release | None:
    if raw is None:
        return None
    try:
        return Release.model_validate_json(raw)
    except ValidationError:
        log.warning("release_record_invalid", raw=raw[:200].decode("utf-8", "replace"))
        return None


class ReleaseFollower:
    """Follows new release records in a background thread and hands each to ``on_release``."""

    def __init__(
        self, settings: Settings, start: dict[TopicPartition, int], on_release: Callable[[Release], object]
    ) -> None:
        self.settings = settings
        self.start_offsets = start
        self.on_release = on_release
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="releases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False once the thread has died (readiness reports it); True before it starts."""
        return self._thread.ident is None or self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        topic = self.settings.topic(RELEASES_TOPIC)
        consumer = KafkaConsumer(
            **kafka_client_kwargs(self.settings),
            group_id=None,
            enable_auto_commit=False,
        )
        try:
            tps = list(self.start_offsets) or [TopicPartition(topic, 0)]
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, self.start_offsets.get(tp, 0))
            while not self._stop.is_set():
                for batch in consumer.poll(timeout_ms=self.settings.scorer.releases_poll_ms).values():
                    for msg in batch:
                        release = parse(msg.value)
                        if release is not None and release.stage != "refused":
                            try:
                                self.on_release(release)
                            except Exception:  # one bad release must not stop following the topic
                                log.exception(
                                    "release_apply_failed", task=release.task, version=release.version
                                )
        except Exception:
            log.exception("release_follower_failed")
            raise
        finally:
            consumer.close()

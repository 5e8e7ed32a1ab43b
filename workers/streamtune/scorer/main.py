"""Scorer lifecycle: check dependencies, load heavy resources, run the Faust worker, clean up."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import faust
import redis
import structlog

from streamtune.errors import StartupError
from streamtune.logs import configure_logging
from streamtune.model.runtime import ModelRuntime
from streamtune.registry import LocalRegistry
from streamtune.scorer.app import ScorerResources, build_app
from streamtune.settings import Settings
from streamtune.tasks import TASK_NAMES
from streamtune.telemetry import ScorerMetrics
from streamtune.topics import ensure_topics

log = structlog.get_logger(__name__)


def check_redis(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except (redis.RedisError, OSError) as e:
        raise StartupError(f"cannot reach Redis at STREAMTUNE_REDIS_URL={settings.redis_url} ({e})") from e
    finally:
        client.close()


def prepare(settings: Settings) -> ScorerResources:
    """Everything that can fail at start, in the order a person would check it."""
    if not settings.adapter_dir.is_dir():
        raise StartupError(f"adapter directory not found: STREAMTUNE_ADAPTER_DIR={settings.adapter_dir}")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(settings)
    check_redis(settings)
    runtime = ModelRuntime(
        settings.base_model, LocalRegistry(settings.adapter_dir), settings.max_seq_len, settings.torch_threads
    )
    runtime.load_latest(TASK_NAMES)
    metrics = ScorerMetrics()
    for task, loaded in runtime.active.items():
        metrics.adapter_version.labels(task).set(loaded.manifest.version)
    metrics.serve(settings.metrics_port, settings.metrics_host)
    # One model thread: batches of all tasks run one at a time, and a swap can only
    # happen between them. torch releases the GIL, so consuming and Redis I/O go on meanwhile.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    return ScorerResources(runtime=runtime, metrics=metrics, model_executor=executor)


def run_scorer(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_json)
    resources = prepare(settings)
    log.info(
        "scorer_starting",
        bootstrap=settings.bootstrap_servers,
        group=settings.group_id,
        adapters={t: a.manifest.version for t, a in resources.runtime.active.items()},
        metrics_port=settings.metrics_port,
    )
    app = build_app(settings, resources)
    worker = faust.Worker(
        app, loglevel=settings.log_level, override_logging=False, redirect_stdouts=False, quiet=True
    )
    try:
        worker.execute_from_commandline()
    finally:
        resources.model_executor.shutdown(wait=True)

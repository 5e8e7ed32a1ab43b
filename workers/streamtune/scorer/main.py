"""Scorer lifecycle: check dependencies, load heavy resources, run the Faust worker, clean up."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import redis
import structlog

from streamtune.core.errors import AdapterError, StartupError
from streamtune.core.settings import Settings
from streamtune.core.tasks import TASK_NAMES
from streamtune.kafka.compat import DrainingWorker
from streamtune.kafka.handover import drain_app
from streamtune.kafka.security import redact_url, redis_client
from streamtune.kafka.topics import ensure_topics
from streamtune.model.onnx_session import ONNX_BACKENDS
from streamtune.model.runtime import ModelRuntime, Route
from streamtune.ops.logs import configure_logging
from streamtune.ops.telemetry import Readiness, ScorerMetrics
from streamtune.rollout.registry import MANIFEST, AdapterStore, registry_for
from streamtune.rollout.releases import ReleaseFollower, ReleaseLog
from streamtune.rollout.state import Release, current_states, promote
from streamtune.scorer.app import ScorerResources, build_app
from streamtune.scorer.swap import (
    Pending,
    Refuse,
    Serve,
    Swapper,
    blocks_live,
    build_route,
    fallback_candidates,
    named_versions,
)

log = structlog.get_logger(__name__)


def check_redis(settings: Settings) -> None:
    try:
        client = redis_client(settings, socket_connect_timeout=3, socket_timeout=3)
    except (redis.RedisError, OSError) as e:  # a cluster client asks its nodes on creation
        url = redact_url(settings.redis.url)
        raise StartupError(f"cannot reach Redis at STREAMTUNE_REDIS_URL={url} ({e})") from e
    try:
        client.ping()
    except (redis.RedisError, OSError) as e:
        url = redact_url(settings.redis.url)
        raise StartupError(f"cannot reach Redis at STREAMTUNE_REDIS_URL={url} ({e})") from e
    finally:
        client.close()


def needs_export(settings: Settings, registry: AdapterStore, task: str, version: int) -> bool:
    """Whether a scorer must export ``task`` v``version``'s artifact before serving it: its
    backend is an ONNX one and the registry has none for it yet."""
    backend = settings.backend_for(task)
    return backend in ONNX_BACKENDS and registry.artifact(task, version, backend) is None


def initial_routes(
    swapper: Swapper,
    states: dict[str, Release],
    prepare_version: Callable[[str, int], object] | None = None,
    tasks: tuple[str, ...] = TASK_NAMES,
) -> None:
    """Serve what ``adapters.releases`` says, checked as every release is (``scorer/swap.py``).
    A task never released serves its newest releasable version, and that choice is announced so
    every scorer (and the CLI) agrees from then on. ``prepare_version`` runs first for each
    version on disk that is to serve (exports missing ONNX artifacts)."""
    runtime, registry = swapper.runtime, swapper.runtime.registry
    for task in tasks:
        state = states.get(task)
        if state is None:
            version = registry.default_version(task, runtime.backend_for(task))
            if version is None:
                raise StartupError(
                    f"no adapter for task {task} in STREAMTUNE_ADAPTER_DIR={registry.root}; "
                    f"run `streamtune train --task {task}`"
                )
            state = promote(task, version, registry.manifest_sha256(task, version), "scorer")  # type: ignore[arg-type]
            if swapper.releases is not None:
                swapper.releases.publish(state)
        start_route(swapper, state, prepare_version)


def start_route(
    swapper: Swapper, state: Release, prepare_version: Callable[[str, int], object] | None = None
) -> None:
    """The first route of a task, from its release ``state``. When the release cannot serve as
    it is: a canary record whose canary is refused or not on disk serves its live version alone
    (the refusal is published; a pending canary joins once its files are there). When the live
    version itself is refused or not on disk, the newest older version that is releasable and
    verifies here serves instead, loudly (log at error, ``streamtune_adapter_fallback``, a
    /readyz reason) until a release of the task is applied: the pending one once its files are
    there, or a newer one. Without such a version the start fails."""
    runtime, registry = swapper.runtime, swapper.runtime.registry
    task, live = state.task, state.live_version
    _prepare(registry, prepare_version, task, named_versions(state))
    decision = swapper.check(state)
    route: Route | None = None
    if isinstance(decision, Serve):
        try:
            route = build_route(runtime, state)
        except AdapterError as e:
            decision = Refuse(str(e))
    if isinstance(decision, Serve):
        assert route is not None
        runtime.set_route(task, route)
        return
    if not blocks_live(state, decision):
        try:
            route = Route(live=runtime.load(task, live))
        except AdapterError as e:
            reason = f"{decision.reason}; {e}" if isinstance(decision, Refuse) else str(e)
            decision = Refuse(reason, live)
    if route is None:
        found = fallback_route(swapper, task, live, prepare_version)
        if found is None:
            raise StartupError(
                f"{decision.reason}; no older releasable version of {task} verifies here to fall back to "
                f"(STREAMTUNE_ADAPTER_DIR={registry.root})"
            )
        route = found
        swapper.fall_back(task, live, route.live.manifest.version, decision.reason)
    runtime.set_route(task, route)
    if isinstance(decision, Pending):
        swapper.pend(state, decision.reason)
    else:
        swapper.refuse(state, decision.reason)


def fallback_route(
    swapper: Swapper, task: str, released: int, prepare_version: Callable[[str, int], object] | None
) -> Route | None:
    """The newest version older than ``released`` that is releasable and loads here, alone."""
    runtime, registry = swapper.runtime, swapper.runtime.registry
    for version in fallback_candidates(registry.versions(task), released):
        try:
            if not registry.manifest(task, version).releasable:
                continue
            _prepare(registry, prepare_version, task, (version,))
            return Route(live=runtime.load(task, version))
        except AdapterError as e:
            log.warning("fallback_candidate_refused", task=task, version=version, reason=str(e))
    return None


def _prepare(
    registry: AdapterStore,
    prepare_version: Callable[[str, int], object] | None,
    task: str,
    versions: tuple[int, ...],
) -> None:
    """Run ``prepare_version`` for each version whose manifest is on disk (nothing to export
    otherwise). A failure is logged: the checks that follow refuse the version or wait for it."""
    if prepare_version is None:
        return
    for version in versions:
        if not (registry.fetch(task, version) / MANIFEST).is_file():
            continue
        try:
            prepare_version(task, version)
        except AdapterError as e:
            log.warning("prepare_version_failed", task=task, version=version, reason=str(e))


def prepare(settings: Settings) -> ScorerResources:
    """Everything that can fail at start, in the order a person would check it."""
    # Thread counts are deliberate: the model's threads (STREAMTUNE_TORCH_THREADS) own the cores;
    # the Rust tokenizer runs on the model thread instead of starting a pool of its own.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not settings.model.adapter_dir.is_dir():
        raise StartupError(
            f"adapter directory not found: STREAMTUNE_ADAPTER_DIR={settings.model.adapter_dir}"
        )
    settings.ops.state_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(settings)
    check_redis(settings)
    release_log = ReleaseLog(settings)
    records, ends = release_log.read_all()
    registry = registry_for(settings.model.adapter_dir, settings.security.manifest_hmac_key)
    runtime = ModelRuntime(
        settings.model.base_model, registry, settings.model.max_seq_len, settings.model.torch_threads,
        batch_size=settings.scorer.model_batch_size, backend=settings.model.backend,
        task_backends=settings.model.task_backends,
        task_batch_sizes=settings.scorer.task_model_batch_size, onnx_spinning=settings.model.onnx_spinning,
    )  # fmt: skip

    def export_missing(task: str, version: int) -> None:
        if not needs_export(settings, registry, task, version):
            return
        from streamtune.model.onnx_export import ensure_artifact  # torch: only when exporting

        ensure_artifact(settings, registry, task, version)

    prepare_version = export_missing if settings.model.export_on_start else None
    metrics = ScorerMetrics()
    # One model thread: batches of all tasks run one at a time, and a swap can only
    # happen between them. torch releases the GIL, so consuming and Redis I/O go on meanwhile.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    swapper = Swapper(
        runtime, executor, metrics, release_log,
        retry_initial_s=settings.scorer.release_retry_initial_s,
        retry_max_s=settings.scorer.release_retry_max_s,
        settle_s=settings.scorer.release_settle_s,
    )  # fmt: skip
    initial_routes(swapper, current_states(records), prepare_version)
    for task in TASK_NAMES:
        swapper.publish_route_metrics(task)
    follower = ReleaseFollower(settings, ends, swapper.apply)
    readiness = Readiness(adapters_loaded=set(runtime.routes) >= set(TASK_NAMES), fallbacks=swapper.fallbacks)
    readiness.extra.append(lambda: None if follower.alive else "release follower stopped")
    metrics.serve(settings.ops.metrics_port, settings.ops.metrics_host, ready=readiness.check)
    return ScorerResources(
        runtime=runtime, metrics=metrics, model_executor=executor, follower=follower, readiness=readiness
    )


def run_scorer(settings: Settings) -> None:
    configure_logging(settings.ops.log_level, settings.ops.log_json, settings.ops.lib_log_level)
    resources = prepare(settings)
    log.info(
        "scorer_starting",
        bootstrap=settings.kafka.bootstrap_servers,
        group=settings.kafka.group_id,
        adapters={t: a.manifest.version for t, a in resources.runtime.active.items()},
        metrics_port=settings.ops.metrics_port,
    )
    app = build_app(settings, resources)
    assert resources.follower is not None
    resources.follower.start()
    worker = DrainingWorker(
        app,
        before_stop=lambda: drain_app(app, resources.gate, settings.scorer.shutdown_grace_s),
        loglevel=settings.ops.log_level,
        override_logging=False,
        redirect_stdouts=False,
        quiet=True,
    )
    try:
        worker.execute_from_commandline()
    finally:
        resources.follower.stop()
        resources.model_executor.shutdown(wait=True)

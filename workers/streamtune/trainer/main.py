"""Trainer lifecycle: check the registry, recover the trigger state from it, load the reference
sets, run the Faust worker; each training run happens in one background thread."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faust
import structlog
import torch

from streamtune.core.errors import AdapterError, StartupError
from streamtune.core.features import FEATURE_DIM
from streamtune.core.settings import Settings
from streamtune.core.tasks import TASK_NAMES, TASKS
from streamtune.drift.served import ServedBook
from streamtune.drift.watch import DriftWatch
from streamtune.kafka.topics import ensure_topics
from streamtune.model.onnx_export import ensure_artifact
from streamtune.model.onnx_session import ONNX_BACKENDS
from streamtune.model.tokens import base_model_sha256
from streamtune.ops.logs import configure_logging
from streamtune.ops.telemetry import Readiness, TrainerMetrics
from streamtune.rollout.registry import AdapterStore, Manifest, registry_for
from streamtune.rollout.releases import ReleaseLog
from streamtune.rollout.state import Release, canary, promote
from streamtune.trainer.app import TrainerResources, TrainerState, build_app
from streamtune.training.candidate import OnlineConfig, Reference, reference_set, train_candidate
from streamtune.training.fast import PATH_FAST, FastConfig, TransformerCache, fast_candidate
from streamtune.training.online import Example, TrainingSet, Watermark

log = structlog.get_logger(__name__)


def last_trainer_manifest(registry: AdapterStore, task: str, path: str | None = None) -> Manifest | None:
    """The newest version this trainer made (released or not); with ``path``, the newest one that
    path made (``fast``, or ``slow``: the fine-tuning runs, whose manifests predate the field).

    A version whose manifest cannot be read is skipped (logged), so one bad version does not
    stop every restart; the older one recovered instead can only make labels fresh again."""
    for version in reversed(registry.versions(task)):
        try:
            m = registry.manifest(task, version)
        except AdapterError as e:
            log.warning("manifest_unreadable_skipped", task=task, version=version, error=str(e))
            continue
        if m.training.get("source") == "trainer" and path in (None, m.training.get("path", "slow")):
            return m
    return None


def recovered_watermarks(registry: AdapterStore, path: str = "slow") -> dict[str, Watermark]:
    """What each task has trained on, as its newest manifest of ``path`` records it: the fast
    and the slow path each keep their own (a fast update's labels are still fresh for the slow
    path, which fine-tunes the transformer on them)."""
    out: dict[str, Watermark] = {}
    for task in TASK_NAMES:
        m = last_trainer_manifest(registry, task, path)
        if m is not None:
            out[task] = int(m.training.get("joined_seq", -1))
    return out


def live_version(
    registry: AdapterStore, states: dict[str, Release], task: str, backend: str | None = None
) -> int:
    """The released live version, else the one a scorer on ``backend`` starts with."""
    state = states.get(task)
    version = state.live_version if state is not None else registry.default_version(task, backend)
    if version is None:
        raise StartupError(
            f"no adapter for task {task} in {registry.root}; run `streamtune train --task {task}`"
        )
    return version


def release_for(settings: Settings, m: Manifest, live: int, sha: str) -> Release | None:
    if settings.trainer.release_stage == "none":
        return None
    if settings.trainer.release_stage == "live":
        return promote(m.task, m.version, sha, by="trainer")
    return canary(m.task, m.version, settings.trainer.canary_fraction, live, sha, by="trainer")


def announce_unreleased(settings: Settings, registry: AdapterStore, releases: ReleaseLog) -> None:
    """A trainer killed between publishing a passing version and announcing it: announce it now."""
    states = releases.states()
    for task in TASK_NAMES:
        m = last_trainer_manifest(registry, task)
        if m is None or not m.releasable:
            continue
        state = states.get(task)
        seen = 0 if state is None else max(state.version, state.live_version, state.canary_version or 0)
        if seen >= m.version:
            continue
        live = live_version(registry, states, task, settings.backend_for(task))
        if m.parent_version != live:  # trained from a version no longer live: superseded
            continue
        release = release_for(settings, m, live, registry.manifest_sha256(task, m.version))
        if release is not None:
            log.warning("announcing_unreleased_candidate", task=task, version=m.version)
            releases.publish(release)


@dataclass(frozen=True)
class FastRun:
    """What a fast-path update came to: the outcome (as the runs metric counts it), the
    candidate's manifest (published unless rejected) and the fast thread's CPU seconds from the
    labels to the announced version (verify, update, gate, publish, release)."""

    outcome: str
    manifest: Manifest | None  # None: deferred before training
    cpu_seconds: float
    why: str = ""


def current_width(task: str, ts: TrainingSet) -> TrainingSet:
    """Session examples joined before the feature vector grew (restored from the trainer's
    changelog with ``BASE_FEATURE_DIM`` columns) cannot be stacked with new ones: they are
    dropped, with a warning, until newer joins replace them."""
    if not TASKS[task].labels_session:
        return ts

    def keep(part: list[Example]) -> list[Example]:
        return [e for e in part if isinstance(e.x, list | tuple) and len(e.x) == FEATURE_DIM]

    out = dataclasses.replace(ts, fresh=keep(ts.fresh), replay=keep(ts.replay), holdout=keep(ts.holdout))
    dropped = sum(len(p) for p in (ts.fresh, ts.replay, ts.holdout)) - sum(
        len(p) for p in (out.fresh, out.replay, out.holdout)
    )
    if dropped:
        log.warning("examples_of_another_width_dropped", task=task, dropped=dropped, width=FEATURE_DIM)
    return out


class TrainJobRunner:
    """What runs in the training thread: pick the live version, train, publish, announce."""

    def __init__(
        self,
        settings: Settings,
        registry: AdapterStore,
        releases: ReleaseLog,
        references: dict[str, Reference],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.releases = releases
        self.references = references
        self._reference_live: dict[tuple[str, int], dict[str, float]] = {}
        self._transformers = TransformerCache(registry, settings.model.base_model, settings.model.max_seq_len)
        self._base_sha256: str | None = None
        self._announcing = threading.Lock()  # the train and fast threads both announce

    def config(self) -> OnlineConfig:
        s = self.settings
        return OnlineConfig(
            epochs=s.trainer.epochs, lr=s.trainer.lr, budget_s=s.trainer.budget_s, margin=s.trainer.margin,
            tolerance=s.trainer.reference_tolerance, max_len=s.model.max_seq_len, seed=s.trainer.seed,
            alpha=s.trainer.gate_alpha,
        )  # fmt: skip

    def __call__(self, task: str, ts: TrainingSet) -> str:
        ts = current_width(task, ts)
        live = live_version(self.registry, self.releases.states(), task, self.settings.backend_for(task))
        outcome = train_candidate(
            task, live, ts, self.references[task], self.registry, self.settings.model.base_model,
            self.config(),
            reference_live=self._reference_live.get((task, live)),
        )  # fmt: skip
        self._reference_live[(task, live)] = dict(outcome.manifest.gate["reference"]["live"])
        if not outcome.verdict.passed:
            return "rejected"
        # Scorers on an ONNX backend need the version's artifact: export it (with its agreement
        # gate) before announcing, so a release never names a version they would refuse.
        art = ensure_artifact(self.settings, self.registry, task, outcome.manifest.version)
        if art is not None and not art.passed:
            why = f"{art.backend} artifact agreement {art.agreement:.4f} < {art.min_agreement}"
            log.warning("candidate_not_released", task=task, version=outcome.manifest.version, reason=why)
            return "artifact_refused"
        return self.announce(outcome.manifest, live)

    def fast_config(self) -> FastConfig:
        s = self.settings.trainer
        return FastConfig(
            margin=s.margin, tolerance=s.reference_tolerance, alpha=s.gate_alpha,
            prior_strength=s.fast_prior_strength, recheck_rows=s.fast_recheck_rows,
        )  # fmt: skip

    def fast(self, task: str, ts: TrainingSet, recheck: bool = False) -> FastRun:
        """One fast-path update (:func:`~streamtune.training.fast.fast_candidate`), announced
        like a slow one when it passed. Runs in the trainer's fast thread."""
        cpu_started = time.thread_time()  # the whole update: verify, update, gate, publish, announce
        if self._base_sha256 is None:
            self._base_sha256 = base_model_sha256(self.settings.model.base_model)
        states = self.releases.states()
        state = states.get(task)
        if state is not None and state.canary_version is not None:
            # A canary is being judged: an update of live now could not be released (and would
            # fill the registry with superseded versions); its labels wait for the verdict.
            why = f"v{state.canary_version} is in canary"
            return FastRun("deferred", None, time.thread_time() - cpu_started, why)
        live = live_version(self.registry, states, task, self.settings.backend_for(task))
        out = fast_candidate(
            task, live, ts, self.references[task], self.registry, self._transformers,
            self.settings.model.base_model, self.settings.model.max_seq_len, self.fast_config(),
            recheck=recheck, base_sha256=self._base_sha256,
            reference_live=self._reference_live.get((task, live)),
        )  # fmt: skip
        self._reference_live[(task, live)] = dict(out.manifest.gate["reference"]["live"])
        if not out.published:
            return FastRun("rejected", out.manifest, time.thread_time() - cpu_started)
        version = out.manifest.version
        backend = self.settings.backend_for(task)
        if backend in ONNX_BACKENDS and self.registry.artifact(task, version, backend) is None:
            # the parent was never exported for this backend: export it once, then share it
            ensure_artifact(self.settings, self.registry, task, live)
            self.registry.inherit_artifacts(task, version, live)
        art = ensure_artifact(self.settings, self.registry, task, version)
        if art is not None and not art.passed:
            return FastRun("artifact_refused", out.manifest, time.thread_time() - cpu_started)
        outcome = self.announce(out.manifest, live)
        return FastRun(outcome, out.manifest, time.thread_time() - cpu_started)

    def announce(self, m: Manifest, parent: int) -> str:
        """Release a passing version, unless the rollout moved on while it trained. The version is
        published either way, so its labels count as used; a failed announce is logged (and
        retried at the next start, see :func:`announce_unreleased`)."""
        with self._announcing:  # read the state and publish as one step: one canary at a time
            return self._announce(m, parent)

    def _announce(self, m: Manifest, parent: int) -> str:
        task = m.task
        try:
            state = self.releases.states().get(task)
            if state is not None and state.live_version != parent:
                why = f"live changed from v{parent} to v{state.live_version} during training"
                log.warning("candidate_not_released", task=task, version=m.version, reason=why)
                return "superseded"
            if state is not None and state.canary_version not in (None, m.version):
                log.warning("candidate_not_released", task=task, version=m.version,
                            reason=f"v{state.canary_version} is still in canary")  # fmt: skip
                return "superseded"
            release = release_for(self.settings, m, parent, self.registry.manifest_sha256(task, m.version))
            if release is not None:
                self.releases.publish(release)
        except Exception as e:  # the broker may be briefly away; the version itself is safe
            log.error("release_announce_failed", task=task, version=m.version, error=str(e))
            return "announce_failed"
        return "released"


def run_trainer(settings: Settings) -> None:
    configure_logging(settings.ops.log_level, settings.ops.log_json, settings.ops.lib_log_level)
    if not settings.model.adapter_dir.is_dir():
        raise StartupError(
            f"adapter directory not found: STREAMTUNE_ADAPTER_DIR={settings.model.adapter_dir}"
        )
    if settings.model.torch_threads > 0:
        torch.set_num_threads(settings.model.torch_threads)
    settings.ops.state_dir.mkdir(parents=True, exist_ok=True)
    registry = registry_for(settings.model.adapter_dir, settings.security.manifest_hmac_key)
    for stale in registry.clean_stale():
        log.warning("stale_publish_dir_removed", path=str(stale))
    ensure_topics(settings)
    releases = ReleaseLog(settings)
    states = releases.states()
    for task in TASK_NAMES:
        live_version(registry, states, task, settings.backend_for(task))  # fails early, naming the task
    announce_unreleased(settings, registry, releases)
    references = {
        t: reference_set(t, settings.model.data_dir, settings.trainer.reference_rows) for t in TASK_NAMES
    }
    exclude: frozenset[str | tuple[float, ...]] = frozenset().union(*(r.keys for r in references.values()))
    metrics = TrainerMetrics()
    state = TrainerState(
        watermarks=recovered_watermarks(registry), fast_watermarks=recovered_watermarks(registry, PATH_FAST)
    )
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train")
    fast_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fast")
    runner = TrainJobRunner(settings, registry, releases, references)
    resources = TrainerResources(
        metrics=metrics,
        executor=executor,
        job=runner,
        fast_job=runner.fast,
        fast_executor=fast_executor,
        state=state,
        exclude_inputs=exclude,
        served=ServedBook(limit=settings.drift.served_max),
        drift=DriftWatch(delta=settings.drift.delta, grace=settings.drift.grace),
    )
    readiness = Readiness(adapters_loaded=True, needs_redis=False)
    resources.readiness = readiness
    metrics.serve(settings.ops.metrics_port, settings.ops.metrics_host, ready=readiness.check)
    log.info("trainer_starting", group=settings.trainer.group_id, watermarks=state.watermarks,
             fast_watermarks=state.fast_watermarks, fast_interval_s=settings.trainer.fast_interval_s,
             min_labels=settings.trainer.min_labels, interval_s=settings.trainer.interval_s)  # fmt: skip
    app = build_app(settings, resources)
    worker = faust.Worker(
        app, loglevel=settings.ops.log_level, override_logging=False, redirect_stdouts=False, quiet=True
    )
    try:
        worker.execute_from_commandline()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        fast_executor.shutdown(wait=False, cancel_futures=True)

"""Hot-swap: apply a release to the running scorer without pausing it for more than a batch.

Off the scoring path (the follower's thread): the release's manifest hash, the manifest, every
file's checksum and the base model are verified. Then one job on the model thread, where batches
also run, loads the adapter, runs the smoke pass and swaps the route: the swap therefore lands
between two batches, a batch never mixes routes, and a refused version leaves the current route
serving untouched.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor

import structlog

from streamtune.core.errors import AdapterError
from streamtune.model.runtime import ModelRuntime, Route
from streamtune.ops.telemetry import ScorerMetrics
from streamtune.rollout.releases import ReleaseLog
from streamtune.rollout.state import Release

log = structlog.get_logger(__name__)


def build_route(runtime: ModelRuntime, release: Release) -> Route:
    live = runtime.load(release.task, release.live_version)
    canary = runtime.load(release.task, release.canary_version) if release.canary_version else None
    return Route(live=live, canary=canary, fraction=release.canary_fraction if canary else 0.0)


class Swapper:
    def __init__(
        self, runtime: ModelRuntime, executor: Executor, metrics: ScorerMetrics, releases: ReleaseLog | None
    ) -> None:
        self.runtime = runtime
        self.executor = executor
        self.metrics = metrics
        self.releases = releases

    def publish_route_metrics(self, task: str) -> None:
        route = self.runtime.routes[task]
        self.metrics.adapter_version.labels(task).set(route.live.manifest.version)
        self.metrics.canary_version.labels(task).set(route.canary.manifest.version if route.canary else 0)
        self.metrics.canary_fraction.labels(task).set(route.fraction)

    def apply(self, release: Release) -> bool:
        """Swap to the route ``release`` describes; False (and a refusal record) when refused."""
        started = time.monotonic()
        try:
            self.verify(release)
        except AdapterError as e:
            self.refuse(release, str(e))
            return False

        def swap() -> None:
            self.runtime.set_route(release.task, build_route(self.runtime, release))

        try:
            self.executor.submit(swap).result(timeout=300)
        except AdapterError as e:
            self.refuse(release, str(e))
            return False
        self.metrics.swap_seconds.labels(release.task).observe(time.monotonic() - started)
        self.publish_route_metrics(release.task)
        log.info("release_applied", task=release.task, stage=release.stage, live=release.live_version,
                 canary=release.canary_version, fraction=release.canary_fraction,
                 seconds=round(time.monotonic() - started, 3))  # fmt: skip
        return True

    def verify(self, release: Release) -> None:
        """Everything that needs no model: the record's manifest hash and each version's files."""
        task = release.task
        served = release.canary_version if release.stage == "canary" else release.live_version
        if served is not None and release.manifest_sha256:
            try:
                actual = self.runtime.registry.manifest_sha256(task, served)
            except OSError as e:
                raise AdapterError(f"{task} v{served}: manifest unreadable: {e}") from e
            if actual != release.manifest_sha256:
                raise AdapterError(
                    f"{task} v{served}: manifest sha256 {actual[:12]} differs from the release's "
                    f"{release.manifest_sha256[:12]}"
                )
        for version in (release.live_version, release.canary_version):
            if version is not None:
                self.runtime.verify(task, version)

    def refuse(self, release: Release, reason: str) -> None:
        """Log and publish the refusal, then count it: once the counter moves, the refusal's
        record is in the release log (operators and tests read its reason there without racing
        its publication). A refusal whose record could not be published is counted all the same.
        """
        live = self.runtime.routes.get(release.task)
        log.error("adapter_refused", task=release.task, version=release.version, stage=release.stage,
                  reason=reason, serving=live.live.manifest.version if live else None)  # fmt: skip
        try:
            if self.releases is not None and live is not None:
                self.releases.publish(
                    release.model_copy(
                        update={
                            "stage": "refused",
                            "reason": reason,
                            "live_version": live.live.manifest.version,
                        }
                    )
                )
        finally:
            self.metrics.refusals.labels(release.task).inc()

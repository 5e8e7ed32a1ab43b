"""Hot-swap: apply a release to the running scorer without pausing it for more than a batch.

Loading, verification (checksums, base model, labels) and the smoke pass happen in a job on the
model thread, where batches also run: the swap therefore lands between two batches, a batch never
mixes routes, and a refused version leaves the current route serving untouched.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor

import structlog

from streamtune.errors import AdapterError
from streamtune.model.runtime import ModelRuntime, Route
from streamtune.releases import ReleaseLog
from streamtune.rollout import Release
from streamtune.telemetry import ScorerMetrics

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

    def refuse(self, release: Release, reason: str) -> None:
        self.metrics.refusals.labels(release.task).inc()
        live = self.runtime.routes.get(release.task)
        log.error("adapter_refused", task=release.task, version=release.version, stage=release.stage,
                  reason=reason, serving=live.live.manifest.version if live else None)  # fmt: skip
        if self.releases is not None and live is not None:
            self.releases.publish(
                release.model_copy(
                    update={"stage": "refused", "reason": reason, "live_version": live.live.manifest.version}
                )
            )

"""Hot-swap: apply a release to the running scorer without pausing it for more than a batch.

A release is checked where it is served, against this scorer's own disk: :func:`observe` looks
at each version the record names, :func:`decide` (pure) says serve, refuse or wait. The record
must carry the served version's manifest sha256 and it must equal the manifest on disk; that
manifest must be releasable (bootstrap, or its gate passed) unless the record is ``forced`` (an
operator's ``--force``). A version whose directory, files or ONNX artifact are not on this disk
yet makes the release *pending*: what serves keeps serving, the release is retried with
back-off on a thread of its own, and applied once the files are there (a replicated registry or
volume lags behind the release log). A newer record of the task replaces a pending one.

Then, still off the scoring path (the follower's or the retry thread), every file's checksum
and the base model are verified. Then one job on the model thread, where batches also run,
loads the adapter, runs the smoke pass and swaps the route: the swap therefore lands between
two batches, a batch never mixes routes, and a refused version leaves the current route serving
untouched. A refusal is logged, counted and published as a ``refused`` record with its reason.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import structlog

from streamtune.core.errors import AdapterError, FileMismatch
from streamtune.model.onnx_session import ONNX_BACKENDS
from streamtune.model.runtime import ModelRuntime, Route
from streamtune.ops.telemetry import ScorerMetrics
from streamtune.rollout.registry import ARTIFACT_MANIFEST, ARTIFACTS_LOCK, MANIFEST, AdapterStore
from streamtune.rollout.releases import ReleaseLog
from streamtune.rollout.state import Release

log = structlog.get_logger(__name__)

PENDING_LOG_EVERY_S = 600.0  # a release still pending is logged again at most this often
SWAP_TIMEOUT_S = 300.0  # how long apply waits for the model thread before handing the swap off
# "swapping": the swap job is queued on the model thread behind a slow batch, and finishes later
Outcome = Literal["applied", "pending", "refused", "swapping"]


# -- the decision: a pure function of the record and of what the disk holds -------------------


@dataclass(frozen=True, slots=True)
class OnDisk:
    """What this scorer's registry holds of one version (presence, not checksums: those are
    verified once everything is there)."""

    version: int
    manifest_sha256: str = ""  # of the manifest on disk; "" while there is none
    releasable: bool = False
    gate_reason: str = ""
    missing: str = ""  # what of it is not on disk yet: a reason to wait
    unreadable: str = ""  # why its manifest or artifact record cannot be read: a reason to refuse


@dataclass(frozen=True, slots=True)
class Serve:
    """The record checks out and every file is on disk: verify checksums, load, swap."""


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str
    version: int | None = None  # the version at fault; None: the record itself


@dataclass(frozen=True, slots=True)
class Pending:
    reason: str
    versions: tuple[int, ...] = ()  # those not (wholly) on disk yet


Decision = Serve | Refuse | Pending


def served_version(release: Release) -> int | None:
    """The version a record vouches for: its canary, else its live version."""
    return release.canary_version if release.stage == "canary" else release.live_version


def named_versions(release: Release) -> tuple[int, ...]:
    """Every version of the route a record describes (what :func:`build_route` loads)."""
    if release.canary_version is None:
        return (release.live_version,)
    return (release.live_version, release.canary_version)


def decide(release: Release, disk: Mapping[int, OnDisk]) -> Decision:
    """Serve, refuse or wait, from the record and ``disk`` (one entry per :func:`named_versions`).

    The served version's manifest hash must be in the record and equal the manifest on disk,
    and that manifest must be releasable unless the record is ``forced``. The live version of a
    canary record was vouched for by an earlier record (perhaps a forced one): here it only has
    to be on disk. A refusal wins over waiting: a record that can never be served is refused at
    once, even while another of its versions is still missing."""
    task = release.task
    served = served_version(release)
    if served is None:
        return Refuse(f"{task}: a canary record without a canary version")
    if not release.manifest_sha256:
        return Refuse(f"{task} v{served}: the release record carries no manifest sha256 to check it against")
    for version in named_versions(release):
        if disk[version].unreadable:
            return Refuse(disk[version].unreadable, version)
    here = disk[served]
    if here.manifest_sha256:
        if here.manifest_sha256 != release.manifest_sha256:
            return Refuse(
                f"{task} v{served}: manifest sha256 {here.manifest_sha256[:12]} differs from the release's "
                f"{release.manifest_sha256[:12]}",
                served,
            )
        if not here.releasable and not release.forced:
            return Refuse(
                f"{task} v{served}: its release gate rejected it ({here.gate_reason}); only a forced "
                "release serves it (`streamtune adapters promote --force`)",
                served,
            )
    missing = [disk[v] for v in named_versions(release) if disk[v].missing]
    if missing:
        return Pending(
            "; ".join(f"{task} v{d.version}: {d.missing}" for d in missing), tuple(d.version for d in missing)
        )
    return Serve()


def blocks_live(release: Release, decision: Refuse | Pending) -> bool:
    """Whether the record's live version cannot serve on its own (start-up). A canary record's
    live version serves alone while its canary is refused or pending; a live or rolled-back
    record vouches for its live version itself, so anything wrong with the record blocks it."""
    if release.stage != "canary":
        return True
    if isinstance(decision, Refuse):
        return decision.version == release.live_version
    return release.live_version in decision.versions


def fallback_candidates(versions: Iterable[int], released: int) -> list[int]:
    """Versions a scorer may serve while the released live version cannot (start-up), in the
    order to try them: older ones only, newest first. A newer version was never released as
    live, or was rolled back."""
    return sorted((v for v in versions if v < released), reverse=True)


def observe(registry: AdapterStore, task: str, version: int, backend: str) -> OnDisk:
    """What this scorer's disk holds of ``version``: its manifest (hash, gate verdict), whether
    every file it lists is there, and on an ONNX backend the artifact's record and files."""
    directory = registry.fetch(task, version)
    if not (directory / MANIFEST).is_file():
        return OnDisk(version, missing=f"not on this scorer's disk yet (no {directory / MANIFEST})")
    try:
        manifest = registry.manifest(task, version)
        sha = registry.manifest_sha256(task, version)
    except AdapterError as e:
        return OnDisk(version, unreadable=str(e))
    except OSError as e:
        return OnDisk(version, unreadable=f"{task} v{version}: manifest unreadable: {e}")
    seen = OnDisk(version, sha, manifest.releasable, str(manifest.gate.get("reason", "no reason given")))
    absent = sorted(name for name in manifest.files if not (directory / name).is_file())
    if absent:
        return replace(seen, missing=f"file(s) {', '.join(absent)} not on disk yet")
    if backend in ONNX_BACKENDS:
        try:
            art = registry.artifact(task, version, backend)
        except AdapterError as e:
            return replace(seen, unreadable=str(e))
        if art is None:
            return replace(
                seen,
                missing=f"no {backend} artifact yet (`streamtune adapters export --task {task} "
                f"--version {version} --backend {backend}`)",
            )
        art_dir = registry.artifact_dir(task, version, backend)
        absent = sorted(name for name in art.files if not (art_dir / name).is_file())
        if art.passed and absent:
            return replace(seen, missing=f"{backend} artifact file(s) {', '.join(absent)} not on disk yet")
    return seen


FileStats = dict[str, tuple[int, int]]  # relative path -> (size, mtime in ns)
SETTLE_S = 120.0  # a file changed this recently (wall clock) may still be being written


def file_stats(directory: Path) -> FileStats:
    """Size and modification time of every file under ``directory`` (a version, with its
    artifacts); empty when it is not there."""
    if not directory.is_dir():
        return {}
    out: FileStats = {}
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):  # gone between the listing and the stat
            if path.is_file():
                st = path.stat()
                out[str(path.relative_to(directory))] = (st.st_size, st.st_mtime_ns)
    return out


# A fresh manifest (a version just published, or copied) says nothing of its data files.
_RECORDS = frozenset({MANIFEST, ARTIFACT_MANIFEST, ARTIFACTS_LOCK})


def still_written(before: FileStats, after: FileStats, now: float, settle_s: float = SETTLE_S) -> str:
    """Why a checksum that failed between ``before`` and ``after`` may be a copy in progress
    rather than a bad file: a file changed during the check, or was modified less than
    ``settle_s`` before ``now`` (epoch seconds; manifests and locks aside; a modification time
    ahead of ``now``, a clock mismatch, does not count as fresh, or it could hold a release for
    ever). "" when every file stood still: the failure
    is the file's own, and the version is refused."""
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    if changed:
        return f"file(s) {', '.join(changed)} changed while their checksums were computed"
    recent = sorted(
        name
        for name, (_, mtime_ns) in after.items()
        if 0 <= now - mtime_ns / 1e9 < settle_s and Path(name).name not in _RECORDS
    )
    if recent:
        return f"file(s) {', '.join(recent)} modified less than {settle_s:.0f} s ago"
    return ""


def build_route(runtime: ModelRuntime, release: Release) -> Route:
    live = runtime.load(release.task, release.live_version)
    canary = runtime.load(release.task, release.canary_version) if release.canary_version else None
    return Route(live=live, canary=canary, fraction=release.canary_fraction if canary else 0.0)


# -- applying releases -----------------------------------------------------------------------


@dataclass
class _Waiting:
    """A pending release and its back-off."""

    release: Release
    reason: str
    since: float
    delay: float
    next_at: float
    logged_at: float


class Swapper:
    """Applies releases (the follower thread calls :meth:`apply`), retries pending ones (a
    thread of its own, started with the first), and keeps the route metrics, the pending gauge
    and the fallback reasons (``fallbacks``, which the scorer's readiness reads) current.

    Every application and retry runs under one lock, so a retry and a new record of the same
    task never interleave, and the newest record wins."""

    def __init__(
        self,
        runtime: ModelRuntime,
        executor: Executor,
        metrics: ScorerMetrics,
        releases: ReleaseLog | None,
        retry_initial_s: float = 2.0,
        retry_max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
        wall_clock: Callable[[], float] = time.time,
        settle_s: float = SETTLE_S,
        swap_timeout_s: float = SWAP_TIMEOUT_S,
    ) -> None:
        self.runtime = runtime
        self.executor = executor
        self.metrics = metrics
        self.releases = releases
        self.retry_initial_s = min(retry_initial_s, retry_max_s)
        self.retry_max_s = retry_max_s
        self.clock = clock
        self.background = background  # False: no retry thread (tests call retry_due themselves)
        self.wall_clock = wall_clock  # compared with file modification times
        self.settle_s = settle_s
        self.swap_timeout_s = swap_timeout_s
        # task -> why it serves a version other than the released one (a start-up fallback)
        self.fallbacks: dict[str, str] = {}
        self._pending: dict[str, _Waiting] = {}
        self._swapping: dict[str, Release] = {}  # swaps handed off to finish on the model thread
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish_route_metrics(self, task: str) -> None:
        route = self.runtime.routes[task]
        self.metrics.adapter_version.labels(task).set(route.live.manifest.version)
        self.metrics.canary_version.labels(task).set(route.canary.manifest.version if route.canary else 0)
        self.metrics.canary_fraction.labels(task).set(route.fraction)
        self._publish_pending(task)
        self.metrics.adapter_fallback.labels(task).set(1 if task in self.fallbacks else 0)

    def _publish_pending(self, task: str) -> None:
        """The pending gauge: 1 while a release of ``task`` waits for files or for its swap."""
        waiting = task in self._pending or task in self._swapping
        self.metrics.releases_pending.labels(task).set(1 if waiting else 0)

    @property
    def pending(self) -> dict[str, Release]:
        """The pending release of each task that has one."""
        with self._lock:
            return {task: w.release for task, w in self._pending.items()}

    def apply(self, release: Release) -> bool:
        """Swap to the route ``release`` describes. True once it serves; False when it was
        refused (a refusal record) or is pending (retried until its files are on disk)."""
        with self._lock:
            self._pending.pop(release.task, None)  # a newer record replaces a pending one
            self._swapping.pop(release.task, None)  # ... and supersedes a swap still queued
            outcome = self._apply(release)
            self._publish_pending(release.task)
            return outcome == "applied"

    def check(self, release: Release) -> Decision:
        """:func:`decide` over what the disk holds and, when it says serve, every checksum, the
        base model and the artifact (:meth:`ModelRuntime.verify`): all that needs no model.
        A failed checksum makes it pending, not refused, while the copy may still be in
        progress: a file gone missing during the checks, or one that changed during them or
        less than ``settle_s`` ago (:func:`still_written`: a file overwritten in place). A file
        that stays wrong once it has stood still for ``settle_s`` is refused."""
        task = release.task
        backend = self.runtime.backend_for(task)

        def look() -> Decision:
            disk = {v: observe(self.runtime.registry, task, v, backend) for v in named_versions(release)}
            return decide(release, disk)

        decision = look()
        if not isinstance(decision, Serve):
            return decision
        for version in named_versions(release):
            directory = self.runtime.registry.fetch(task, version)
            before = file_stats(directory)
            try:
                self.runtime.verify(task, version)
            except AdapterError as e:
                again = look()
                if isinstance(again, Pending):
                    return again
                # only a file's content can be a copy in progress: a bad signature, another base
                # model or an unreadable manifest are refused at once, however fresh the files
                moving = isinstance(e, FileMismatch) and still_written(
                    before, file_stats(directory), self.wall_clock(), self.settle_s
                )
                if moving:
                    return Pending(f"{task} v{version}: {e}, but {moving} (a copy in progress?)", (version,))
                return Refuse(str(e), version)
        return decision

    def _apply(self, release: Release) -> Outcome:
        started = time.monotonic()
        decision = self.check(release)
        if isinstance(decision, Pending):
            self.pend(release, decision.reason)
            return "pending"
        if isinstance(decision, Refuse):
            self.refuse(release, decision.reason)
            return "refused"

        def swap() -> None:
            self.runtime.set_route(release.task, build_route(self.runtime, release))

        job = self.executor.submit(swap)
        try:
            job.result(timeout=self.swap_timeout_s)
        except AdapterError as e:
            self.refuse(release, str(e))
            return "refused"
        except FutureTimeout:
            # The model thread is still busy (a slow batch): the job stays queued and will swap
            # the route when it runs, so it cannot be taken back. Hand its outcome to a thread
            # that records it then (metrics, fallback, or the refusal of a late AdapterError);
            # meanwhile the release counts as pending. A newer record queues behind it and wins.
            log.warning("release_swap_slow", task=release.task, version=release.version,
                        waited_s=round(time.monotonic() - started, 1))  # fmt: skip
            self._swapping[release.task] = release
            job.add_done_callback(lambda done: self._finish_later(release, done, started))
            return "swapping"
        self._applied(release, started)
        return "applied"

    def _applied(self, release: Release, started: float, late: bool = False) -> None:
        if self.fallbacks.pop(release.task, None) is not None:
            log.warning("adapter_fallback_ended", task=release.task, live=release.live_version)
        self.metrics.swap_seconds.labels(release.task).observe(time.monotonic() - started)
        self.publish_route_metrics(release.task)
        event = "release_applied_late" if late else "release_applied"
        log.info(event, task=release.task, stage=release.stage, live=release.live_version,
                 canary=release.canary_version, fraction=release.canary_fraction,
                 seconds=round(time.monotonic() - started, 3))  # fmt: skip

    def _finish_later(self, release: Release, done: Future[None], started: float) -> None:
        """Done-callback of a swap handed off: it runs on the model thread, which must not wait
        for the lock (the follower may hold it while waiting on the model thread), so the
        bookkeeping runs on a thread of its own."""
        threading.Thread(
            target=self._finish, args=(release, done, started), name="swap-finish", daemon=True
        ).start()

    def _finish(self, release: Release, done: Future[None], started: float) -> None:
        with self._lock:
            # a newer record of the task was applied since: its swap queued behind this one and
            # decides the route; this one is only logged (a refusal is still published: true)
            superseded = self._swapping.get(release.task) is not release
            if not superseded:
                del self._swapping[release.task]
            try:
                if done.cancelled():  # the model thread shut down first: nothing was swapped
                    log.warning("release_swap_cancelled", task=release.task, version=release.version)
                    return
                error = done.exception()
                if isinstance(error, AdapterError):
                    self.refuse(release, str(error))
                elif error is not None:
                    log.error("release_swap_failed", task=release.task, version=release.version,
                              error=repr(error))  # fmt: skip
                elif superseded:
                    log.info("release_applied_late_superseded", task=release.task, version=release.version)
                else:
                    self._applied(release, started, late=True)
            finally:  # whatever happened above (a refusal that could not be published), the gauge
                self._publish_pending(release.task)

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

    # -- pending releases ---------------------------------------------------------------------

    def pend(self, release: Release, reason: str) -> None:
        """Hold ``release`` until its files are on disk: what serves keeps serving, and it is
        retried after ``retry_initial_s``, then twice as long each time up to ``retry_max_s``.
        Logged when it starts waiting, when the reason changes, and at most every
        :data:`PENDING_LOG_EVERY_S` while it waits."""
        with self._lock:
            now = self.clock()
            task = release.task
            w = self._pending.get(task)
            if w is None or w.release != release:
                w = _Waiting(release, reason, now, self.retry_initial_s, now + self.retry_initial_s, now)
                log.warning("release_pending", task=task, version=release.version, stage=release.stage,
                            live=release.live_version, canary=release.canary_version, reason=reason,
                            retry_in_s=w.delay)  # fmt: skip
            else:
                w.delay = min(w.delay * 2, self.retry_max_s)
                w.next_at = now + w.delay
                if reason != w.reason or now - w.logged_at >= PENDING_LOG_EVERY_S:
                    log.warning("release_still_pending", task=task, version=release.version, reason=reason,
                                waited_s=round(now - w.since), retry_in_s=w.delay)  # fmt: skip
                    w.logged_at = now
                w.reason = reason
            self._pending[task] = w
            self.metrics.releases_pending.labels(task).set(1)
            if self.background and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="release-retry", daemon=True)
                self._thread.start()
        self._wake.set()

    def retry_due(self) -> None:
        """Retry every pending release whose time has come: applied, refused, or pending again
        (with a longer wait). The retry thread calls this; tests call it with their own clock."""
        with self._lock:
            now = self.clock()
            for task, w in list(self._pending.items()):
                if w.next_at > now:
                    continue
                try:
                    outcome = self._apply(w.release)
                except Exception:  # e.g. the model thread timed out: try again later, never spin
                    log.exception("release_retry_failed", task=task, version=w.release.version)
                    w.delay = min(w.delay * 2, self.retry_max_s)
                    w.next_at = self.clock() + w.delay  # from now: the attempt itself may have taken minutes
                    continue
                if outcome != "pending":
                    if self._pending.get(task) is w:
                        del self._pending[task]
                    if outcome == "applied":
                        log.warning("release_pending_applied", task=task, version=w.release.version,
                                    waited_s=round(self.clock() - w.since, 1))  # fmt: skip
                self._publish_pending(task)

    def next_retry_at(self) -> float | None:
        with self._lock:
            return min((w.next_at for w in self._pending.values()), default=None)

    def _run(self) -> None:
        while not self._stop.is_set():
            due = self.next_retry_at()
            self._wake.wait(None if due is None else max(0.0, due - self.clock()))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.retry_due()
            except Exception:  # the thread must outlive any one retry
                log.exception("release_retry_failed")

    def close(self) -> None:
        """Stop the retry thread (pending releases are dropped with it)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- start-up fallback --------------------------------------------------------------------

    def fall_back(self, task: str, released: int, serving: int, reason: str) -> None:
        """Record, loudly, that ``task`` serves ``serving`` instead of the released live version
        (log at error, ``streamtune_adapter_fallback``, a /readyz reason); it ends when a release
        of the task is applied (a pending one, once its files are there, or a newer one)."""
        self.fallbacks[task] = f"v{serving} instead of the released v{released} ({reason})"
        self.metrics.adapter_fallback.labels(task).set(1)
        log.error("adapter_fallback", task=task, released=released, serving=serving, reason=reason)

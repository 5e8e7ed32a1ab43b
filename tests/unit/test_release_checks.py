"""Releases are checked where they are served: the pure decision (serve / refuse / pending) over
a release record and what the scorer's disk holds, and the swapper and start-up around it,
with a tiny synthetic registry and a runtime that loads nothing (no model)."""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs
from typer.testing import CliRunner

from streamtune.core.errors import AdapterError, StartupError
from streamtune.core.settings import Settings
from streamtune.model.runtime import LoadedAdapter, ModelRuntime, Route
from streamtune.ops.telemetry import Readiness, ScorerMetrics
from streamtune.rollout.registry import BaseModelRef, LocalRegistry, Manifest
from streamtune.rollout.releases import ReleaseLog
from streamtune.rollout.state import Release, canary, promote, rollback
from streamtune.scorer.main import initial_routes
from streamtune.scorer.swap import (
    OnDisk,
    Pending,
    Refuse,
    Serve,
    Swapper,
    blocks_live,
    decide,
    fallback_candidates,
    observe,
    still_written,
)
from support.registry import pinned_registry
from support.waiting import wait_until

TASK = "review_sentiment"
SHA = "a" * 64
OTHER = "b" * 64


# -- the pure decision -------------------------------------------------------------------------


def disk(*entries: OnDisk) -> dict[int, OnDisk]:
    return {d.version: d for d in entries}


def here(version: int, sha: str = SHA, releasable: bool = True, **kw: Any) -> OnDisk:
    return OnDisk(version, sha, releasable, kw.pop("gate_reason", "gain +0.001 < margin 0.01"), **kw)


def test_a_release_that_checks_out_on_disk_is_served() -> None:
    assert decide(promote(TASK, 2, SHA), disk(here(2))) == Serve()
    assert decide(canary(TASK, 3, 0.2, 2, SHA), disk(here(2, OTHER), here(3))) == Serve()
    assert decide(rollback(TASK, 3, 2, SHA), disk(here(2))) == Serve()


def test_a_record_without_a_manifest_hash_is_refused() -> None:
    """Before: an empty hash skipped the check, and the version served unchecked."""
    d = decide(promote(TASK, 2, ""), disk(here(2)))
    assert isinstance(d, Refuse) and "carries no manifest sha256" in d.reason and d.version is None


def test_a_manifest_hash_other_than_the_one_on_disk_is_refused() -> None:
    d = decide(promote(TASK, 2, OTHER), disk(here(2)))
    assert isinstance(d, Refuse) and "differs from the release's" in d.reason and d.version == 2
    d = decide(canary(TASK, 3, 0.2, 2, OTHER), disk(here(2), here(3)))  # the canary's hash
    assert isinstance(d, Refuse) and d.version == 3


def test_an_unreleasable_manifest_is_refused_unless_the_release_is_forced() -> None:
    """Before: the scorer never looked at the gate verdict of what it was told to serve."""
    rejected = here(2, releasable=False)
    for record in (promote(TASK, 2, SHA), canary(TASK, 2, 0.1, 1, SHA), rollback(TASK, 3, 2, SHA)):
        d = decide(record, disk(here(1), rejected))
        assert isinstance(d, Refuse) and d.version == 2, record.stage
        assert "release gate rejected it (gain +0.001 < margin 0.01)" in d.reason and "--force" in d.reason
    assert decide(promote(TASK, 2, SHA, forced=True), disk(rejected)) == Serve()
    assert decide(rollback(TASK, 3, 2, SHA, forced=True), disk(rejected)) == Serve()
    # The live version of a canary record was released before (maybe forced): not re-judged.
    assert decide(canary(TASK, 3, 0.1, 2, SHA), disk(here(2, OTHER, releasable=False), here(3))) == Serve()


def test_a_version_not_on_disk_yet_is_pending() -> None:
    absent = OnDisk(3, missing="not on this scorer's disk yet")
    d = decide(promote(TASK, 3, SHA), disk(absent))
    assert isinstance(d, Pending) and d.versions == (3,) and "review_sentiment v3: not on" in d.reason
    d = decide(canary(TASK, 3, 0.1, 2, SHA), disk(here(2, OTHER), absent))
    assert isinstance(d, Pending) and d.versions == (3,)
    d = decide(canary(TASK, 3, 0.1, 2, SHA), disk(OnDisk(2, missing="files"), here(3)))
    assert isinstance(d, Pending) and d.versions == (2,)
    # Manifest there, a file not yet: the hash is checked already, the files are waited for.
    d = decide(promote(TASK, 3, SHA), disk(here(3, missing="file(s) head.safetensors not on disk yet")))
    assert isinstance(d, Pending)


def test_a_refusal_wins_over_waiting() -> None:
    """A record that can never serve is refused at once, not after its other version arrives."""
    d = decide(canary(TASK, 3, 0.1, 2, OTHER), disk(OnDisk(2, missing="not on disk"), here(3)))
    assert isinstance(d, Refuse) and d.version == 3
    d = decide(promote(TASK, 3, SHA), disk(here(3, OTHER, missing="files")))
    assert isinstance(d, Refuse) and "differs" in d.reason
    d = decide(promote(TASK, 3, ""), disk(OnDisk(3, missing="not on disk")))
    assert isinstance(d, Refuse)
    d = decide(promote(TASK, 3, SHA), disk(OnDisk(3, unreadable="review_sentiment v3: manifest invalid")))
    assert d == Refuse("review_sentiment v3: manifest invalid", 3)


def test_a_canary_record_without_a_canary_is_refused() -> None:
    record = Release(task=TASK, version=3, stage="canary", live_version=2, manifest_sha256=SHA)
    assert isinstance(decide(record, disk(here(2))), Refuse)


def test_which_problems_block_the_live_version_at_start() -> None:
    can = canary(TASK, 3, 0.1, 2, SHA)
    assert not blocks_live(can, Refuse("bad canary", 3))
    assert not blocks_live(can, Refuse("record", None))
    assert blocks_live(can, Refuse("bad live", 2))
    assert not blocks_live(can, Pending("canary missing", (3,)))
    assert blocks_live(can, Pending("live missing", (2,)))
    assert blocks_live(promote(TASK, 3, SHA), Pending("missing", (3,)))
    assert blocks_live(promote(TASK, 3, SHA), Refuse("record", None))


def test_fallback_candidates_are_older_versions_newest_first() -> None:
    assert fallback_candidates([1, 2, 3, 5, 6], 5) == [3, 2, 1]
    assert fallback_candidates([4, 5], 3) == []  # newer ones: never live, or rolled back


# -- what the disk holds ------------------------------------------------------------------------


def _manifest(version: int, gate: dict[str, Any] | None = None) -> Manifest:
    return Manifest(
        task=TASK, version=version, kind="text-lora", base_model=BaseModelRef(name="base", sha256="c" * 64),
        labels=["negative", "neutral", "positive"], created_at=datetime.now(UTC), gate=gate or {},
    )  # fmt: skip


def publish(reg: LocalRegistry, version: int, gate: dict[str, Any] | None = None) -> str:
    build = reg.root.parent / f"build-{reg.root.name}-{version}"
    build.mkdir(parents=True)
    (build / "adapter_model.safetensors").write_bytes(b"weights %d" % version)
    (build / "head.safetensors").write_bytes(b"head")
    reg.publish(build, _manifest(version, gate))
    return reg.manifest_sha256(TASK, version)


def arrive(source: LocalRegistry, target: LocalRegistry, version: int) -> None:
    """The version reaches this scorer's disk (a replicated registry catching up)."""
    shutil.copytree(source.fetch(TASK, version), target.fetch(TASK, version))


REJECTED = {"passed": False, "reason": "gain +0.001 < margin 0.01"}


def test_observe_tells_missing_from_present(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    sha = publish(reg, 1)
    publish(reg, 2, REJECTED)
    assert observe(reg, TASK, 1, "torch") == OnDisk(1, sha, True, "no reason given")
    assert not observe(reg, TASK, 2, "torch").releasable
    assert "not on this scorer's disk yet" in observe(reg, TASK, 3, "torch").missing
    (reg.fetch(TASK, 1) / "head.safetensors").unlink()
    seen = observe(reg, TASK, 1, "torch")
    assert seen.manifest_sha256 == sha and "head.safetensors not on disk yet" in seen.missing
    assert "no onnx-fp32 artifact yet" in observe(reg, TASK, 2, "onnx-fp32").missing
    (reg.fetch(TASK, 2) / "manifest.json").write_text("{not json")
    assert "manifest invalid" in observe(reg, TASK, 2, "torch").unreadable


# -- the swapper, with a runtime that loads nothing ------------------------------------------


class FakeRuntime:
    """What the swapper and start-up use of ModelRuntime; a load is the registry's verify."""

    def __init__(self, registry: LocalRegistry, broken: frozenset[int] = frozenset()) -> None:
        self.registry = registry
        self.routes: dict[str, Route] = {}
        self.broken = broken  # versions whose load fails (as a failing smoke test would)

    def backend_for(self, task: str) -> str:
        return "torch"

    def verify(self, task: str, version: int) -> Manifest:
        return self.registry.verify(task, version)

    def load(self, task: str, version: int) -> LoadedAdapter:
        if version in self.broken:
            raise AdapterError(f"{task} v{version}: smoke forward pass gave non-finite output")
        return LoadedAdapter(manifest=self.verify(task, version))

    def set_route(self, task: str, route: Route) -> None:
        self.routes[task] = route

    def serving(self, task: str = TASK) -> tuple[int, int | None]:
        route = self.routes[task]
        return route.live.manifest.version, route.canary.manifest.version if route.canary else None


class Inline(Executor):
    """The model thread, run in the caller's."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        done: Future[Any] = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except Exception as e:
            done.set_exception(e)
        return done


class FakeLog:
    def __init__(self) -> None:
        self.published: list[Release] = []

    def publish(self, release: Release) -> None:
        self.published.append(release)

    @property
    def refusals(self) -> list[Release]:
        return [r for r in self.published if r.stage == "refused"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gauge(metrics: ScorerMetrics, name: str, task: str = TASK) -> float:
    value = metrics.registry.get_sample_value(name, {"task": task})
    return 0.0 if value is None else value


def make_swapper(
    reg: LocalRegistry, clock: Clock | None = None, background: bool = False, **kw: Any
) -> tuple[Swapper, FakeRuntime, FakeLog]:
    runtime, releases = FakeRuntime(reg, **kw), FakeLog()
    swapper = Swapper(
        cast(ModelRuntime, runtime), Inline(), ScorerMetrics(), cast(ReleaseLog, releases),
        retry_initial_s=2.0, retry_max_s=16.0, clock=clock or Clock(), background=background,
    )  # fmt: skip
    return swapper, runtime, releases


@pytest.fixture
def regs(tmp_path: Path) -> tuple[LocalRegistry, LocalRegistry]:
    """(the trainer's registry, this scorer's disk), both holding v1 and v2."""
    source, scorer = LocalRegistry(tmp_path / "source"), LocalRegistry(tmp_path / "scorer")
    for v in (1, 2):
        publish(source, v)
        arrive(source, scorer, v)
    return source, scorer


def test_an_unreleasable_or_unhashed_release_is_refused_and_published(
    regs: tuple[LocalRegistry, LocalRegistry],
) -> None:
    source, reg = regs
    sha3 = publish(source, 3, REJECTED)
    arrive(source, reg, 3)
    swapper, runtime, releases = make_swapper(reg)
    assert swapper.apply(promote(TASK, 2, reg.manifest_sha256(TASK, 2)))
    assert not swapper.apply(promote(TASK, 3, sha3))
    assert runtime.serving() == (2, None)
    [refusal] = releases.refusals
    assert "release gate rejected it" in refusal.reason and refusal.live_version == 2 and refusal.version == 3
    assert not swapper.apply(promote(TASK, 2, ""))
    assert "carries no manifest sha256" in releases.refusals[-1].reason
    assert gauge(swapper.metrics, "streamtune_adapter_refusals_total") == 2
    assert runtime.serving() == (2, None)
    assert swapper.apply(promote(TASK, 3, sha3, forced=True))  # the operator's --force
    assert runtime.serving() == (3, None)


def test_a_release_whose_files_are_missing_is_retried_and_served_when_they_arrive(
    regs: tuple[LocalRegistry, LocalRegistry],
) -> None:
    """Before: refused once (or, at start, its canary skipped) and never tried again."""
    source, reg = regs
    clock = Clock()
    swapper, runtime, releases = make_swapper(reg, clock)
    assert swapper.apply(promote(TASK, 1, reg.manifest_sha256(TASK, 1)))
    sha3 = publish(source, 3)
    release = canary(TASK, 3, 0.3, 1, sha3)
    assert not swapper.apply(release)
    assert swapper.pending == {TASK: release} and releases.refusals == []
    assert gauge(swapper.metrics, "streamtune_releases_pending") == 1
    assert runtime.serving() == (1, None)
    assert swapper.next_retry_at() == clock.now + 2.0
    clock.now += 1.0
    swapper.retry_due()  # not due yet
    assert swapper.next_retry_at() == 1002.0
    clock.now += 1.0
    swapper.retry_due()  # due, still missing: waits twice as long
    assert swapper.next_retry_at() == clock.now + 4.0 and runtime.serving() == (1, None)
    arrive(source, reg, 3)
    clock.now += 4.0
    swapper.retry_due()
    assert runtime.serving() == (1, 3) and swapper.pending == {}
    assert gauge(swapper.metrics, "streamtune_releases_pending") == 0
    assert gauge(swapper.metrics, "streamtune_canary_version") == 3
    assert releases.refusals == []


def test_a_newer_release_replaces_a_pending_one(regs: tuple[LocalRegistry, LocalRegistry]) -> None:
    source, reg = regs
    swapper, runtime, _ = make_swapper(reg)
    assert swapper.apply(promote(TASK, 1, reg.manifest_sha256(TASK, 1)))
    assert not swapper.apply(promote(TASK, 3, publish(source, 3)))
    assert swapper.apply(promote(TASK, 2, reg.manifest_sha256(TASK, 2)))
    assert swapper.pending == {} and runtime.serving() == (2, None)
    assert gauge(swapper.metrics, "streamtune_releases_pending") == 0
    arrive(source, reg, 3)
    swapper.retry_due()
    assert runtime.serving() == (2, None)  # the replaced release is not applied late


def test_a_pending_release_logs_a_bounded_number_of_lines(regs: tuple[LocalRegistry, LocalRegistry]) -> None:
    source, reg = regs
    clock = Clock()
    swapper, _, _ = make_swapper(reg, clock)
    assert swapper.apply(promote(TASK, 1, reg.manifest_sha256(TASK, 1)))
    with capture_logs() as logs:
        swapper.apply(promote(TASK, 3, publish(source, 3)))
        for _ in range(200):  # well over an hour of retries at the longest back-off
            clock.now += 16.0
            swapper.retry_due()
    events = [e["event"] for e in logs if e["event"].startswith("release_")]
    assert events[0] == "release_pending"
    assert 1 <= events.count("release_still_pending") <= 200 * 16 / 600 + 1
    assert swapper.next_retry_at() == clock.now + 16.0  # the back-off stops growing at its maximum


def test_the_retry_thread_applies_a_pending_release_once_its_files_arrive(
    regs: tuple[LocalRegistry, LocalRegistry],
) -> None:
    source, reg = regs
    runtime, releases = FakeRuntime(reg), FakeLog()
    swapper = Swapper(cast(ModelRuntime, runtime), Inline(), ScorerMetrics(), cast(ReleaseLog, releases),
                      retry_initial_s=0.01, retry_max_s=0.05)  # fmt: skip
    try:
        assert swapper.apply(promote(TASK, 1, reg.manifest_sha256(TASK, 1)))
        assert not swapper.apply(promote(TASK, 3, publish(source, 3)))
        arrive(source, reg, 3)
        wait_until(lambda: runtime.serving() == (3, None), 10, "the retry thread to serve v3")
        assert swapper.pending == {}
    finally:
        swapper.close()


class BusyModelThread:
    """The real single model thread, held by a slow batch until ``release()``."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1)
        self._go = threading.Event()
        self.executor.submit(self._go.wait, 30)

    def release(self) -> None:
        self._go.set()

    def close(self) -> None:
        self._go.set()
        self.executor.shutdown(wait=True)


def _slow_swapper(
    reg: LocalRegistry, busy: BusyModelThread, **kw: Any
) -> tuple[Swapper, FakeRuntime, FakeLog]:
    runtime, releases = FakeRuntime(reg, **kw), FakeLog()
    swapper = Swapper(cast(ModelRuntime, runtime), busy.executor, ScorerMetrics(), cast(ReleaseLog, releases),
                      background=False, swap_timeout_s=0.05)  # fmt: skip
    return swapper, runtime, releases


def test_a_swap_that_outlasts_its_wait_is_finished_and_recorded_when_the_model_thread_frees(
    regs: tuple[LocalRegistry, LocalRegistry],
) -> None:
    """Before: the wait timed out on the follower, the release was neither pending nor refused,
    and the queued swap later changed the route with the metrics and fallback left stale."""
    _, reg = regs
    busy = BusyModelThread()
    try:
        swapper, runtime, releases = _slow_swapper(reg, busy)
        runtime.set_route(TASK, Route(live=runtime.load(TASK, 1)))
        swapper.fall_back(TASK, 2, 1, "v2 not on disk at start")
        with capture_logs() as logs:
            assert not swapper.apply(promote(TASK, 2, reg.manifest_sha256(TASK, 2)))
        assert [e["event"] for e in logs if e["event"].startswith("release_")] == ["release_swap_slow"]
        assert runtime.serving() == (1, None)
        assert gauge(swapper.metrics, "streamtune_releases_pending") == 1  # waiting for its swap
        busy.release()
        wait_until(lambda: gauge(swapper.metrics, "streamtune_releases_pending") == 0, 10, "the late swap")
        assert runtime.serving() == (2, None) and swapper.fallbacks == {}
        assert gauge(swapper.metrics, "streamtune_adapter_version") == 2
        assert gauge(swapper.metrics, "streamtune_adapter_fallback") == 0
        assert releases.refusals == []
    finally:
        busy.close()


def test_a_newer_release_supersedes_a_swap_still_queued(regs: tuple[LocalRegistry, LocalRegistry]) -> None:
    """The late swap lands first (FIFO model thread), the newer one after it and decides the
    route; the late one is logged as superseded, not as applied."""
    _, reg = regs
    busy = BusyModelThread()
    try:
        swapper, runtime, _ = _slow_swapper(reg, busy)
        runtime.set_route(TASK, Route(live=runtime.load(TASK, 1)))
        assert not swapper.apply(promote(TASK, 2, reg.manifest_sha256(TASK, 2)))
        swapper.swap_timeout_s = 10.0
        with capture_logs() as logs:
            threading.Timer(0.2, busy.release).start()
            assert swapper.apply(promote(TASK, 1, reg.manifest_sha256(TASK, 1)))
            wait_until(lambda: any(e["event"] == "release_applied_late_superseded" for e in logs), 10,
                       "the superseded swap to be recorded")  # fmt: skip
        assert runtime.serving() == (1, None)
        assert gauge(swapper.metrics, "streamtune_releases_pending") == 0
        assert gauge(swapper.metrics, "streamtune_adapter_version") == 1
        assert not [e for e in logs if e["event"] == "release_applied_late"]
    finally:
        busy.close()


def test_a_late_swap_that_fails_is_refused_and_published(regs: tuple[LocalRegistry, LocalRegistry]) -> None:
    _, reg = regs
    busy = BusyModelThread()
    try:
        swapper, runtime, releases = _slow_swapper(reg, busy, broken=frozenset({2}))
        runtime.set_route(TASK, Route(live=runtime.load(TASK, 1)))
        assert not swapper.apply(promote(TASK, 2, reg.manifest_sha256(TASK, 2)))
        busy.release()
        # the counter moves after the refusal is published (Swapper.refuse): wait on it
        wait_until(
            lambda: gauge(swapper.metrics, "streamtune_adapter_refusals_total") == 1, 10, "the late refusal"
        )
        [refusal] = releases.refusals
        assert "non-finite" in refusal.reason and refusal.live_version == 1
        wait_until(
            lambda: gauge(swapper.metrics, "streamtune_releases_pending") == 0, 10, "the gauge to clear"
        )
        assert runtime.serving() == (1, None)
    finally:
        busy.close()


def _backdate(directory: Path, seconds: float) -> None:
    for path in directory.rglob("*"):
        st = path.stat()
        os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def _serving_v1_with_v3_on_disk(
    regs: tuple[LocalRegistry, LocalRegistry], clock: Clock
) -> tuple[Swapper, FakeRuntime, FakeLog, Path, str]:
    """A swapper serving v1, with v3 published and copied to this disk: (..., v3's directory, its hash)."""
    source, reg = regs
    swapper, runtime, releases = make_swapper(reg, clock)
    assert swapper.apply(promote(TASK, 1, reg.manifest_sha256(TASK, 1)))
    sha3 = publish(source, 3)
    arrive(source, reg, 3)
    return swapper, runtime, releases, reg.fetch(TASK, 3), sha3


def test_a_file_still_being_written_in_place_holds_the_release_instead_of_refusing_it(
    regs: tuple[LocalRegistry, LocalRegistry],
) -> None:
    """Before: every file present but one half-copied (written in place, not renamed in)
    failed its checksum and the release was refused for good. Now it stays pending while the
    file is fresh, and serves once the copy completes."""
    clock = Clock()
    swapper, runtime, releases, v3, sha3 = _serving_v1_with_v3_on_disk(regs, clock)
    weights = v3 / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:3])  # the copy has written three bytes so far
    release = promote(TASK, 3, sha3)
    with capture_logs() as logs:
        assert not swapper.apply(release)
    assert swapper.pending == {TASK: release} and releases.refusals == []
    assert runtime.serving() == (1, None)
    [pending] = [e for e in logs if e["event"] == "release_pending"]
    assert "checksum mismatch" in pending["reason"] and "modified less than 120 s ago" in pending["reason"]
    weights.write_bytes(whole)  # the copy completes
    clock.now += 2.0
    swapper.retry_due()
    assert runtime.serving() == (3, None) and swapper.pending == {} and releases.refusals == []


def test_a_wrong_file_that_stood_still_is_refused_at_once(regs: tuple[LocalRegistry, LocalRegistry]) -> None:
    swapper, runtime, releases, v3, sha3 = _serving_v1_with_v3_on_disk(regs, Clock())
    (v3 / "head.safetensors").write_bytes(b"tampered")
    _backdate(v3, 3600)
    assert not swapper.apply(promote(TASK, 3, sha3))
    [refusal] = releases.refusals
    assert "checksum mismatch" in refusal.reason and swapper.pending == {}
    assert runtime.serving() == (1, None)


def test_a_fresh_wrong_file_is_refused_once_it_has_stood_still(
    regs: tuple[LocalRegistry, LocalRegistry],
) -> None:
    """A copy that stopped half-way (or a bad file just written) is waited for, not for ever."""
    clock = Clock()
    swapper, runtime, releases, v3, sha3 = _serving_v1_with_v3_on_disk(regs, clock)
    (v3 / "head.safetensors").write_bytes(b"hea")
    assert not swapper.apply(promote(TASK, 3, sha3)) and releases.refusals == []
    _backdate(v3, 121)  # two minutes on, nothing has moved
    clock.now += 2.0
    swapper.retry_due()
    assert len(releases.refusals) == 1 and swapper.pending == {} and runtime.serving() == (1, None)


def test_a_fresh_version_failing_for_another_reason_than_its_files_is_refused_at_once(
    regs: tuple[LocalRegistry, LocalRegistry],
) -> None:
    """Settling is for a copy in progress: a bad signature (or base model) on files written a
    moment ago is refused at once, not after release_settle_s."""
    swapper, runtime, releases, _, sha3 = _serving_v1_with_v3_on_disk(regs, Clock())

    def unsigned(task: str, version: int) -> Manifest:
        if version == 3:
            raise AdapterError(f"{task} v3: manifest unsigned or tampered")
        return runtime.registry.verify(task, version)

    runtime.verify = unsigned  # type: ignore[method-assign]
    assert not swapper.apply(promote(TASK, 3, sha3))
    [refusal] = releases.refusals
    assert "unsigned" in refusal.reason and swapper.pending == {}


def test_still_written_names_what_moved_or_is_fresh() -> None:
    before = {"a": (10, 1_000 * 10**9), "b": (4, 1_000 * 10**9)}
    assert still_written(before, before, now=2_000.0, settle_s=120) == ""
    assert still_written(before, before, now=1_100.0, settle_s=120) == (
        "file(s) a, b modified less than 120 s ago"
    )
    grown = {**before, "a": (20, 1_000 * 10**9)}
    assert still_written(before, grown, now=2_000.0, settle_s=120) == (
        "file(s) a changed while their checksums were computed"
    )
    assert "file(s) c changed" in still_written(before, {**before, "c": (1, 0)}, now=2_000.0)
    assert still_written(before, before, now=1_100.0, settle_s=0) == ""
    from_the_future = {"a": (10, 9_000 * 10**9)}  # another clock: not "fresh", or it holds for ever
    assert still_written(from_the_future, from_the_future, now=2_000.0, settle_s=120) == ""
    fresh_manifest = {
        **before,
        "manifest.json": (9, 1_099 * 10**9),
        "artifacts/onnx-fp32/artifact.json": (9, 1_099 * 10**9),
    }
    assert still_written(fresh_manifest, fresh_manifest, now=1_100.0, settle_s=50) == ""


# -- start-up -------------------------------------------------------------------------------


def test_a_live_version_missing_at_start_falls_back_then_moves_to_it(
    regs: tuple[LocalRegistry, LocalRegistry],
) -> None:
    """Before: StartupError, a crash loop until the files arrived."""
    source, reg = regs
    clock = Clock()
    swapper, runtime, releases = make_swapper(reg, clock)
    sha3 = publish(source, 3)
    readiness = Readiness(adapters_loaded=True, partitions_assigned=True, needs_redis=False,
                          fallbacks=swapper.fallbacks)  # fmt: skip
    readiness.beat()
    with capture_logs() as logs:
        initial_routes(swapper, {TASK: promote(TASK, 3, sha3)}, tasks=(TASK,))
    assert runtime.serving() == (2, None)  # the newest older version on disk
    assert gauge(swapper.metrics, "streamtune_adapter_fallback") == 1
    assert gauge(swapper.metrics, "streamtune_releases_pending") == 1
    ok, why = readiness.check()
    assert not ok and "review_sentiment serves a fallback: v2 instead of the released v3" in why
    assert any(e["event"] == "adapter_fallback" and e["log_level"] == "error" for e in logs)
    assert releases.refusals == []
    arrive(source, reg, 3)
    clock.now += 2.0
    swapper.retry_due()
    assert runtime.serving() == (3, None)
    assert gauge(swapper.metrics, "streamtune_adapter_fallback") == 0
    assert readiness.check() == (True, "ready")


def test_a_canary_missing_at_start_serves_live_alone_and_joins_later(
    regs: tuple[LocalRegistry, LocalRegistry],
) -> None:
    source, reg = regs
    clock = Clock()
    swapper, runtime, releases = make_swapper(reg, clock)
    initial_routes(swapper, {TASK: canary(TASK, 3, 0.5, 2, publish(source, 3))}, tasks=(TASK,))
    assert runtime.serving() == (2, None) and swapper.fallbacks == {} and TASK in swapper.pending
    arrive(source, reg, 3)
    clock.now += 2.0
    swapper.retry_due()
    assert runtime.serving() == (2, 3) and releases.refusals == []


def test_a_refused_live_version_at_start_falls_back_and_publishes_the_refusal(
    regs: tuple[LocalRegistry, LocalRegistry],
) -> None:
    source, reg = regs
    sha3 = publish(source, 3, REJECTED)
    arrive(source, reg, 3)
    swapper, runtime, releases = make_swapper(reg)
    initial_routes(swapper, {TASK: promote(TASK, 3, sha3)}, tasks=(TASK,))
    assert runtime.serving() == (2, None) and TASK in swapper.fallbacks and swapper.pending == {}
    [refusal] = releases.refusals
    assert "release gate rejected it" in refusal.reason and refusal.live_version == 2


def test_a_broken_canary_at_start_is_refused_and_live_serves_alone(
    regs: tuple[LocalRegistry, LocalRegistry],
) -> None:
    source, reg = regs
    sha3 = publish(source, 3)
    arrive(source, reg, 3)
    swapper, runtime, releases = make_swapper(reg, broken=frozenset({3}))
    initial_routes(swapper, {TASK: canary(TASK, 3, 0.5, 2, sha3)}, tasks=(TASK,))
    assert runtime.serving() == (2, None) and swapper.fallbacks == {}
    assert "smoke forward pass" in releases.refusals[0].reason


def test_no_version_to_fall_back_to_stops_the_start(regs: tuple[LocalRegistry, LocalRegistry]) -> None:
    source, reg = regs
    swapper, _, _ = make_swapper(reg, broken=frozenset({1}))
    shutil.rmtree(reg.fetch(TASK, 2))
    with pytest.raises(StartupError, match=r"v2: not on this scorer's disk yet.*no older releasable version"):
        initial_routes(swapper, {TASK: promote(TASK, 2, source.manifest_sha256(TASK, 2))}, tasks=(TASK,))


def test_a_task_never_released_is_announced_with_its_hash(regs: tuple[LocalRegistry, LocalRegistry]) -> None:
    _, reg = regs
    swapper, runtime, releases = make_swapper(reg)
    initial_routes(swapper, {}, tasks=(TASK,))
    [announced] = releases.published
    assert announced.live_version == 2 and announced.manifest_sha256 == reg.manifest_sha256(TASK, 2)
    assert runtime.serving() == (2, None)


# -- the operator's escape hatch -------------------------------------------------------------


def test_the_cli_marks_a_forced_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--force`` of a rejected version writes ``forced`` into the record: scorers serve it."""
    import json

    import streamtune.rollout.cli as cli

    root = tmp_path / "adapters"
    pinned_registry(root)
    v2 = root / TASK / "2"
    shutil.copytree(root / TASK / "1", v2, ignore=shutil.ignore_patterns("artifacts"))
    manifest = json.loads((v2 / "manifest.json").read_text())
    manifest.update(version=2, parent_version=1, gate=REJECTED)
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    published = FakeLog()

    class Log(FakeLog):
        def __init__(self, settings: Settings) -> None:
            self.published = published.published

        def states(self) -> dict[str, Release]:
            return {}

    monkeypatch.setattr(cli, "ReleaseLog", Log)
    env = {"STREAMTUNE_ADAPTER_DIR": str(root), "STREAMTUNE_BACKEND": "torch"}
    for args in (["promote", TASK, "2", "--force"], ["canary", TASK, "2", "--force"], ["promote", TASK, "1"]):
        result = CliRunner().invoke(cli.adapters, args, env=env)
        assert result.exit_code == 0, result.output
    forced_promote, forced_canary, plain = published.published
    assert forced_promote.forced and forced_canary.forced and not plain.forced
    assert forced_promote.manifest_sha256 == LocalRegistry(root).manifest_sha256(TASK, 2)

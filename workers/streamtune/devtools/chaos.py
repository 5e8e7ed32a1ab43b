"""Fault-tolerance suite: real brokers, Redis and scorer processes, faults injected mid-stream.

Each scenario streams known events (real data) while a fault happens, waits (bounded) until
every valid event is scored, then audits Redis (:mod:`streamtune.devtools.audit`): events in, results
out, lost, double counted, longest gap between results, and how long the stream took to
produce a new result after the fault ended. A scenario fails on any loss or double count.

``streamtune chaos --quick`` (CI, via ``tests/integration/test_chaos.py``) runs every scenario short;
``make chaos`` runs them longer and writes ``docs/chaos.md`` and ``docs/chaos.json``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import structlog

from streamtune.core.errors import AdapterError, StreamtuneError
from streamtune.core.settings import Settings
from streamtune.devtools.audit import Audit, audit, event_id
from streamtune.devtools.demo.replay import Outgoing, plan, replay
from streamtune.devtools.stack import EmbeddedKafka, EmbeddedRedis, KafkaCluster, find_free_port
from streamtune.devtools.workers import Worker
from streamtune.kafka.topics import DLQ_TOPIC, ensure_topics
from streamtune.rollout.registry import LocalRegistry, Manifest
from streamtune.scorer.sink import score_key

log = structlog.get_logger(__name__)

TASKS = ["review_sentiment", "query_class", "purchase_intent"]


class ChaosError(StreamtuneError):
    """A scenario could not run (not: it ran and lost events; that is a failed report)."""


@dataclass(frozen=True)
class ChaosConfig:
    quick: bool = True
    per_task: int = 0  # 0: 40 quick, 200 full
    rate: float = 0.0  # events/s while faults happen; 0: 12 quick, 20 full
    outage_s: float = 0.0  # how long Redis stays down; 0: 5 quick, 10 full
    timeout_s: float = 300.0  # bound on every wait

    @property
    def events(self) -> int:
        return self.per_task or (40 if self.quick else 200)

    @property
    def events_per_s(self) -> float:
        return self.rate or (12.0 if self.quick else 20.0)

    @property
    def outage(self) -> float:
        return self.outage_s or (5.0 if self.quick else 10.0)


@dataclass
class ScenarioReport:
    name: str
    fault: str
    events_in: int = 0
    results_out: int = 0
    lost: int = 0
    double_counted: int = 0
    undercounted: int = 0
    dead_letters: int = 0
    longest_gap_s: float = 0.0
    recovery_s: float | None = None
    seconds: float = 0.0
    passed: bool = False
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Run:
    """One scenario's world: settings with their own topics and group, workers, a producer."""

    def __init__(
        self, root: Path, bootstrap: str, redis_url: str, base: Settings, replication: int = 1
    ) -> None:
        tag = uuid.uuid4().hex[:8]
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.settings = base.model_copy(
            update={
                "bootstrap_servers": bootstrap,
                "redis_url": redis_url,
                "topic_prefix": f"chaos{tag}.",
                "group_id": f"chaos-scorer-{tag}",
                "topic_replication": replication,
                "state_dir": root / "state",
                "kafka_session_timeout_s": 10.0,
                "log_json": True,
            }
        )
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.workers: list[Worker] = []
        self._producer: threading.Thread | None = None
        self._produce_error: list[BaseException] = []
        self._stop = threading.Event()

    def scorer(self, name: str, **overrides: Any) -> Worker:
        s = self.settings.model_copy(update={"metrics_port": find_free_port(), **overrides})
        w = Worker("scorer", s, self.root / f"{name}.log").wait_ready()
        self.workers.append(w)
        return w

    def plan(self, per_task: int, malformed: float, seed: int) -> list[Outgoing]:
        return list(plan(self.settings.data_dir, TASKS, per_task, malformed, seed))

    def produce(self, per_task: int, rate: float, malformed: float, seed: int) -> None:
        def run() -> None:
            try:
                replay(
                    self.settings, TASKS, limit=per_task, rate=rate, malformed_share=malformed, seed=seed,
                    should_stop=self._stop.is_set,
                )  # fmt: skip
            except BaseException as e:  # reported by wait_produced
                self._produce_error.append(e)

        self._producer = threading.Thread(target=run, daemon=True)
        self._producer.start()

    def wait_produced(self, timeout_s: float) -> None:
        assert self._producer is not None
        self._producer.join(timeout_s)
        if self._producer.is_alive():
            raise ChaosError(f"producer still sending after {timeout_s:.0f} s")
        if self._produce_error:
            raise ChaosError(f"producer failed: {self._produce_error[0]}") from self._produce_error[0]

    def scored(self, outs: list[Outgoing]) -> int:
        keys = [score_key(o.task, event_id(o)) for o in outs if o.valid]
        return int(sum(self.redis.exists(*keys[i : i + 500]) for i in range(0, len(keys), 500)))

    def wait(
        self, cond: Callable[[], bool], timeout_s: float, what: str, alive: list[Worker] | None = None
    ) -> float:
        """Poll ``cond`` (bounded); the workers in ``alive`` must stay up meanwhile. Returns seconds."""
        started = time.monotonic()
        while not cond():
            for w in alive or []:
                w.check_alive()
            if time.monotonic() - started > timeout_s:
                raise ChaosError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.1)
        return time.monotonic() - started

    def recovery(self, outs: list[Outgoing], timeout_s: float, alive: list[Worker]) -> float | None:
        """Seconds until a result newer than now appears (None: everything was already scored)."""
        before = self.scored(outs)
        total = sum(o.valid for o in outs)
        if before >= total:
            return None
        return self.wait(
            lambda: self.scored(outs) > before, timeout_s, "a first result after the fault", alive
        )

    def dead_letters(self) -> int:
        from kafka import KafkaConsumer, TopicPartition

        c = KafkaConsumer(bootstrap_servers=self.settings.bootstrap_servers, group_id=None)
        try:
            name = self.settings.topic(DLQ_TOPIC)
            tps = [TopicPartition(name, p) for p in c.partitions_for_topic(name) or []]
            return int(sum(c.end_offsets(tps).values()))
        finally:
            c.close()

    def close(self) -> None:
        self._stop.set()
        if self._producer is not None:
            self._producer.join(30)
        for w in self.workers:
            w.stop()
        self.redis.close()


def finish(
    report: ScenarioReport, run: Run, outs: list[Outgoing], cfg: ChaosConfig, alive: list[Worker]
) -> None:
    """Wait until every valid event is scored (bounded), then audit."""
    with contextlib.suppress(ChaosError):  # a timeout is reported as losses by the audit below
        run.wait(
            lambda: run.scored(outs) >= sum(o.valid for o in outs), cfg.timeout_s, "every event scored", alive
        )
    a: Audit = audit(run.redis, outs)
    report.events_in = a.expected
    report.results_out = a.scored
    report.lost = len(a.missing)
    report.double_counted = len(a.double_counted)
    report.undercounted = len(a.undercounted)
    report.longest_gap_s = round(a.longest_gap_s, 3)
    report.passed = a.ok
    problems = a.missing[:5] + a.double_counted[:5] + a.undercounted[:5]
    if problems:
        report.detail = "; ".join(problems)


# -- scenarios ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def single_stack(root: Path, persist_redis: bool = False) -> Iterator[tuple[EmbeddedKafka, EmbeddedRedis]]:
    kafka = EmbeddedKafka(root / "kafka").start()
    red = EmbeddedRedis(root / "redis", persist=persist_redis)
    try:
        red.start()
        yield kafka, red
    finally:
        red.stop()
        kafka.stop()


Inject = Callable[[Run, list[Worker]], list[Worker]]


def stream_with_fault(
    report: ScenarioReport, run: Run, cfg: ChaosConfig, seed: int, scorers: list[str], inject: Inject
) -> list[Worker]:
    """Start the scorers, stream known events at a steady rate, inject the fault once a quarter
    of them is scored, then measure recovery and audit. ``inject`` returns the scorers that run
    from then on. Returns them."""
    ensure_topics(run.settings)
    outs = run.plan(cfg.events, 0.0, seed)
    workers = [run.scorer(name) for name in scorers]
    run.produce(cfg.events, cfg.events_per_s, 0.0, seed)
    run.wait(lambda: run.scored(outs) >= len(outs) // 4, cfg.timeout_s, "a quarter scored", workers)
    alive = inject(run, workers)
    report.recovery_s = run.recovery(outs, cfg.timeout_s, alive)
    run.wait_produced(cfg.timeout_s)
    finish(report, run, outs, cfg, alive)
    return alive


def _single(
    root: Path, base: Settings, cfg: ChaosConfig, report: ScenarioReport, seed: int, scorers: list[str],
    inject: Callable[[Run, list[Worker], EmbeddedKafka, EmbeddedRedis], list[Worker]],
    persist_redis: bool = False,
) -> ScenarioReport:  # fmt: skip
    """A scenario on one broker and one Redis of its own."""
    with single_stack(root, persist_redis) as (kafka, red):
        run = Run(root / "run", kafka.bootstrap_servers, red.url, base)
        try:
            stream_with_fault(report, run, cfg, seed, scorers, lambda r, ws: inject(r, ws, kafka, red))
        finally:
            run.close()
    return report


def _kill(run: Run, w: Worker) -> None:
    w.proc.kill()
    w.proc.wait(30)
    run.workers.remove(w)


def scorer_sigkill(root: Path, base: Settings, cfg: ChaosConfig) -> ScenarioReport:
    def inject(run: Run, ws: list[Worker], kafka: EmbeddedKafka, red: EmbeddedRedis) -> list[Worker]:
        _kill(run, ws[0])
        return [run.scorer("scorer-2")]

    report = ScenarioReport("scorer_sigkill", "scorer killed with SIGKILL mid-stream, restarted")
    return _single(root, base, cfg, report, 31, ["scorer-1"], inject)


def redis_outage(root: Path, base: Settings, cfg: ChaosConfig) -> ScenarioReport:
    def inject(run: Run, ws: list[Worker], kafka: EmbeddedKafka, red: EmbeddedRedis) -> list[Worker]:
        red.stop()
        time.sleep(cfg.outage)  # the fault's duration, not a wait for a condition
        ws[0].check_alive()  # paused and retrying, not crashed
        red.start()
        return ws

    report = ScenarioReport(
        "redis_outage", f"Redis stopped for {cfg.outage:.0f} s mid-stream, then restarted"
    )
    _single(root, base, cfg, report, 32, ["scorer"], inject, persist_redis=True)
    log_dir = root / "run"
    retries = sum(
        line.count('"redis_unavailable"')
        for line in (log_dir / "scorer.log").read_text(errors="replace").splitlines()
    )
    report.extra["redis_retries"] = retries
    if not retries:
        report.passed = False
        report.detail += " the scorer never retried: the outage did not hit it"
    return report


def broker_restart(root: Path, base: Settings, cfg: ChaosConfig) -> ScenarioReport:
    def inject(run: Run, ws: list[Worker], kafka: EmbeddedKafka, red: EmbeddedRedis) -> list[Worker]:
        kafka.restart()
        return ws

    report = ScenarioReport("broker_restart", "the broker restarted mid-stream")
    return _single(root, base, cfg, report, 33, ["scorer"], inject)


def rebalance(root: Path, base: Settings, cfg: ChaosConfig) -> ScenarioReport:
    def inject(run: Run, ws: list[Worker], kafka: EmbeddedKafka, red: EmbeddedRedis) -> list[Worker]:
        _kill(run, ws[0])
        return [ws[1], run.scorer("scorer-c")]

    report = ScenarioReport("rebalance", "two scorers in one group; one killed, then a third added")
    return _single(root, base, cfg, report, 34, ["scorer-a", "scorer-b"], inject)


def _throughput(run: Run, outs: list[Outgoing], cfg: ChaosConfig, seed: int, malformed: float) -> float:
    """Valid events per second from the first to the last result, events produced at full speed."""
    scorer = run.scorer(f"scorer-{seed}")
    started = time.monotonic()
    run.produce(cfg.events, 0.0, malformed, seed)
    run.wait_produced(cfg.timeout_s)
    run.wait(
        lambda: run.scored(outs) >= sum(o.valid for o in outs), cfg.timeout_s, "every event scored", [scorer]
    )
    seconds = time.monotonic() - started
    scorer.stop()
    run.workers.remove(scorer)
    return sum(o.valid for o in outs) / seconds


def malformed_flood(root: Path, base: Settings, cfg: ChaosConfig) -> ScenarioReport:
    report = ScenarioReport("malformed_flood", "10% malformed events at full rate, against a clean run")
    with single_stack(root) as (kafka, red):
        clean = Run(root / "clean", kafka.bootstrap_servers, red.url, base)
        # Its own Redis database: entity views are keyed by product and session, not by run.
        flood = Run(root / "flood", kafka.bootstrap_servers, red.url.rsplit("/", 1)[0] + "/1", base)
        try:
            ensure_topics(clean.settings)
            ensure_topics(flood.settings)
            clean_outs = clean.plan(cfg.events, 0.0, seed=35)
            clean_rate = _throughput(clean, clean_outs, cfg, 35, 0.0)
            outs = flood.plan(cfg.events, 0.1, seed=36)
            flood_rate = _throughput(flood, outs, cfg, 36, 0.1)
            finish(report, flood, outs, cfg, [])
            report.dead_letters = flood.dead_letters()
            bad = sum(not o.valid for o in outs)
            ratio = flood_rate / clean_rate
            report.extra = {
                "malformed_sent": bad,
                "valid_events_per_s_clean": round(clean_rate, 2),
                "valid_events_per_s_flood": round(flood_rate, 2),
                "flood_over_clean": round(ratio, 3),
            }
            if report.dead_letters != bad:
                report.passed = False
                report.detail += f" {report.dead_letters} dead letters for {bad} malformed events"
        finally:
            clean.close()
            flood.close()
    return report


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def registry_full(root: Path, base: Settings, cfg: ChaosConfig) -> ScenarioReport:
    """Publishing into a full, then a read-only registry: a clear error, no partial version, and
    the scorer serving from that registry goes on scoring with its live version."""
    report = ScenarioReport("registry_full", "registry disk full, then read-only, during a publish")
    mount = root / "registry"
    if not _mount_tmpfs(mount, "8m"):
        report.detail = "not run: mounting a small tmpfs needs root (mount -t tmpfs)"
        report.extra["skipped"] = True
        return report
    try:
        shutil.copytree(base.adapter_dir, mount, dirs_exist_ok=True)
        with single_stack(root) as (kafka, red):
            run = Run(root / "run", kafka.bootstrap_servers, red.url, base)
            try:
                ensure_topics(run.settings)
                outs = run.plan(cfg.events, 0.0, seed=37)
                scorer = run.scorer("scorer", adapter_dir=mount)
                run.produce(cfg.events, cfg.events_per_s, 0.0, seed=37)
                registry = LocalRegistry(mount)
                task = "review_sentiment"
                live = registry.latest(task)
                assert live is not None
                build = root / "build"
                shutil.copytree(registry.fetch(task, live), build)
                manifest = Manifest.model_validate_json((build / "manifest.json").read_text())
                (build / "manifest.json").unlink()
                errors: dict[str, str] = {}
                filler = mount / "filler"
                with contextlib.suppress(OSError), filler.open("wb") as f:
                    while True:
                        f.write(b"\0" * (1 << 20))
                for state in ("full", "read-only"):
                    if state == "read-only":
                        filler.unlink()
                        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
                    try:
                        registry.publish(build, manifest.model_copy(update={"version": live + 1}))
                        errors[state] = "published (expected a refusal)"
                    except AdapterError as e:
                        errors[state] = str(e)
                leftovers = [
                    p.name
                    for p in (mount / task).iterdir()
                    if p.name not in {str(v) for v in registry.versions(task)}
                ]
                report.extra = {"errors": errors, "leftovers": leftovers, "versions": registry.versions(task)}
                run.wait_produced(cfg.timeout_s)
                finish(report, run, outs, cfg, [scorer])
                refused = all("publishing" in e and "failed" in e for e in errors.values())
                if not refused or leftovers or registry.latest(task) != live:
                    report.passed = False
                    report.detail += f" publish outcome: {errors}, leftovers: {leftovers}"
            finally:
                run.close()
    finally:
        _umount(mount)
    return report


def broker_failure_cluster(root: Path, base: Settings, cfg: ChaosConfig) -> ScenarioReport:
    report = ScenarioReport(
        "broker_failure_cluster", "3 KRaft brokers (RF 3, min ISR 2): one killed with SIGKILL mid-stream"
    )
    cluster = KafkaCluster(root / "cluster", size=3).start()
    red = EmbeddedRedis(root / "redis").start()
    try:
        run = Run(root / "run", cluster.bootstrap_servers, red.url, base, replication=3)

        def topics_created() -> bool:
            try:
                ensure_topics(run.settings)
            except StreamtuneError:  # the new quorum may still be settling: try again
                return False
            return True

        run.wait(topics_created, 90.0, "topics created on the cluster")

        def inject(run: Run, ws: list[Worker]) -> list[Worker]:
            cluster.nodes[1].kill()
            return ws

        try:
            stream_with_fault(report, run, cfg, 38, ["scorer"], inject)
        finally:
            run.close()
    finally:
        red.stop()
        cluster.stop()
    return report


SCENARIOS: dict[str, Callable[[Path, Settings, ChaosConfig], ScenarioReport]] = {
    "scorer_sigkill": scorer_sigkill,
    "redis_outage": redis_outage,
    "broker_restart": broker_restart,
    "rebalance": rebalance,
    "malformed_flood": malformed_flood,
    "registry_full": registry_full,
    "broker_failure_cluster": broker_failure_cluster,
}


def run_scenarios(
    base: Settings, cfg: ChaosConfig, work: Path, names: list[str] | None = None
) -> list[ScenarioReport]:
    reports = []
    for name in names or list(SCENARIOS):
        if name not in SCENARIOS:
            raise ChaosError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        started = time.monotonic()
        where = work / name
        shutil.rmtree(where, ignore_errors=True)
        log.info("chaos_scenario_start", scenario=name, quick=cfg.quick)
        try:
            report = SCENARIOS[name](where, base, cfg)
        except Exception as e:  # any error is this scenario's failure; the others still run
            log.exception("chaos_scenario_crashed", scenario=name)
            detail = f"could not complete: {type(e).__name__}: {e}"
            report = ScenarioReport(name, "", passed=False, detail=detail)
        report.seconds = round(time.monotonic() - started, 1)
        log.info("chaos_scenario_done", **{k: v for k, v in asdict(report).items() if k != "extra"})
        reports.append(report)
    return reports


def markdown(reports: list[ScenarioReport], cfg: ChaosConfig) -> str:
    lines = [
        "# Fault-tolerance report",
        "",
        f"`streamtune chaos{' --quick' if cfg.quick else ''}`: {cfg.events} events per task at "
        f"{cfg.events_per_s:.0f} events/s, real Apache Kafka, Redis and scorer processes on this machine.",
        "A scenario passes when every valid event has a result and no entity view counts an event "
        "twice (or misses one).",
        "",
        "| scenario | fault | in | out | lost | double counted | longest gap (s) | recovery (s) | passed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        rec = "" if r.recovery_s is None else f"{r.recovery_s:.2f}"
        lines.append(
            f"| {r.name} | {r.fault} | {r.events_in} | {r.results_out} | {r.lost} | {r.double_counted} | "
            f"{r.longest_gap_s:.2f} | {rec} | {'yes' if r.passed else 'NO'} |"
        )
    notes = [
        f"- **{r.name}**: {r.detail.strip()} {json.dumps(r.extra) if r.extra else ''}".rstrip()
        for r in reports
        if r.detail.strip() or r.extra
    ]
    if notes:
        lines += ["", "Details:", "", *notes]
    return "\n".join(lines) + "\n"

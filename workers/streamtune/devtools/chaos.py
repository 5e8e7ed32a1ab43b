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
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import structlog

from streamtune.core.errors import AdapterError, StreamtuneError
from streamtune.core.events import LabelEvent
from streamtune.core.settings import Settings
from streamtune.core.tasks import CLICK, LABELS_TOPIC, QUERY, REVIEW
from streamtune.datasets import loaders as data
from streamtune.devtools.audit import Audit, audit, event_id
from streamtune.devtools.demo.replay import Outgoing, plan, replay, review_events
from streamtune.devtools.poison import hostile_reviews, poison_records
from streamtune.devtools.stack import EmbeddedKafka, EmbeddedRedis, KafkaCluster, find_free_port
from streamtune.devtools.workers import Worker, json_record
from streamtune.kafka.group_offsets import GroupStartOffsets
from streamtune.kafka.read import read_to_end
from streamtune.kafka.topics import DLQ_TOPIC, ensure_topics
from streamtune.rollout.registry import LocalRegistry, Manifest
from streamtune.rollout.releases import ReleaseLog
from streamtune.rollout.state import promote
from streamtune.scorer.sink import product_key, score_key

log = structlog.get_logger(__name__)

TASKS: list[str] = [REVIEW.name, QUERY.name, CLICK.name]


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
    # False for the trainer's scenarios: their events are labels, nothing is scored or audited
    # in Redis ("in" counts the labels, "lost" the labels orphaned or dropped).
    audited: bool = True
    measured: str = ""  # the day the scenario ran (UTC, ISO date)


class Run:
    """One scenario's world: settings with their own topics and group, workers, a producer."""

    def __init__(
        self, root: Path, bootstrap: str, redis_url: str, base: Settings, replication: int = 1,
        **overrides: Any,
    ) -> None:  # fmt: skip
        tag = uuid.uuid4().hex[:8]
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.settings = base.replace(
            bootstrap_servers=bootstrap,
            redis_url=redis_url,
            topic_prefix=f"chaos{tag}.",
            group_id=f"chaos-scorer-{tag}",
            topic_replication=replication,
            state_dir=root / "state",
            kafka_session_timeout_s=10.0,
            log_json=True,
            **overrides,
        )
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.workers: list[Worker] = []
        self._producer: threading.Thread | None = None
        self._produce_error: list[BaseException] = []
        self._stop = threading.Event()
        self.produced: Any = None  # the replay's report once it is done
        self.timeout_s = 120.0

    def scorer(self, name: str, **overrides: Any) -> Worker:
        return self.worker("scorer", name, **overrides)

    def worker(self, command: str, name: str, **overrides: Any) -> Worker:
        s = self.settings.replace(metrics_port=find_free_port(), **overrides)
        w = Worker(command, s, self.root / f"{name}.log").wait_ready()
        self.workers.append(w)
        return w

    def plan(self, per_task: int, malformed: float, seed: int) -> list[Outgoing]:
        return list(plan(self.settings.model.data_dir, TASKS, per_task, malformed, seed))

    def produce(self, per_task: int, rate: float, malformed: float, seed: int, labels: bool = False) -> None:
        def run() -> None:
            try:
                self.produced = replay(
                    self.settings, TASKS, limit=per_task, rate=rate, malformed_share=malformed, seed=seed,
                    should_stop=self._stop.is_set, labels=labels, label_delay_s=1.0 if labels else 0.0,
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

    def read(self, topic: str) -> list[Any]:
        """Every record ``topic`` holds now."""
        from kafka import KafkaConsumer

        c = KafkaConsumer(bootstrap_servers=self.settings.kafka.bootstrap_servers, group_id=None)
        try:
            return read_to_end(c, self.settings.topic(topic), self.timeout_s)[0]
        finally:
            c.close()

    def lag(self, group: str, topics: list[str]) -> int:
        """Records of ``topics`` that ``group`` has not committed yet."""
        from kafka import KafkaConsumer, TopicPartition

        c = KafkaConsumer(bootstrap_servers=self.settings.kafka.bootstrap_servers, group_id=None)
        try:
            names = [self.settings.topic(t) for t in topics]
            tps = [TopicPartition(n, p) for n in names for p in c.partitions_for_topic(n) or []]
            starts = GroupStartOffsets(self.settings, group).starts_sync(
                {(tp.topic, tp.partition) for tp in tps}
            )
            ends = c.end_offsets(tps)
            return sum(max(0, ends[tp] - starts[(tp.topic, tp.partition)]) for tp in tps)
        finally:
            c.close()

    def dead_letters(self) -> int:
        from kafka import KafkaConsumer, TopicPartition

        c = KafkaConsumer(bootstrap_servers=self.settings.kafka.bootstrap_servers, group_id=None)
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
    if not a.ok:  # what the workers warned about: the report is often all a CI run keeps
        report.extra["worker_warnings"] = worker_warnings(run.root)


def worker_warnings(log_dir: Path, limit: int = 40) -> list[str]:
    """The last ``limit`` warning and error lines of the worker logs in ``log_dir`` (JSON lines),
    each as ``log name: event (fields)``, cut to 300 characters."""
    lines: list[tuple[str, str]] = []
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            rec = json_record(line)
            if rec is not None and rec.get("level") in ("warning", "error", "critical"):
                stamp = str(rec.get("timestamp", ""))
                lines.append((stamp, f"{path.stem}: {json.dumps(rec, default=str)[:300]}"))
    return [text for _, text in sorted(lines)[-limit:]]


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
    persist_redis: bool = False, overrides: dict[str, Any] | None = None,
) -> ScenarioReport:  # fmt: skip
    """A scenario on one broker and one Redis of its own."""
    with single_stack(root, persist_redis) as (kafka, red):
        run = Run(root / "run", kafka.bootstrap_servers, red.url, base, **(overrides or {}))
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
        shutil.copytree(base.model.adapter_dir, mount, dirs_exist_ok=True)
        with single_stack(root) as (kafka, red):
            run = Run(root / "run", kafka.bootstrap_servers, red.url, base)
            try:
                ensure_topics(run.settings)
                outs = run.plan(cfg.events, 0.0, seed=37)
                scorer = run.scorer("scorer", adapter_dir=mount)
                run.produce(cfg.events, cfg.events_per_s, 0.0, seed=37)
                registry = LocalRegistry(mount)
                task = REVIEW.name
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


def metric(w: Worker, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (0 when it has none yet)."""
    total = 0.0
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in w.metrics().splitlines():
        if line.startswith((name + "{", name + " ")) and all(x in line for x in want):
            total += float(line.rsplit(" ", 1)[1])
    return total


def poison_mix(root: Path, base: Settings, cfg: ChaosConfig) -> ScenarioReport:
    """Every kind of hostile record in one full-rate stream of all three tasks: out-of-range
    values and times, a 900 kB invalid record, ids that break Redis Cluster hash tags, and a
    product whose view in Redis holds a string (its reviews fail at the sink while Redis answers:
    retried, then isolated by bisection). Each poison record must be dead-lettered exactly once
    with its stage, every other event scored once, no result published twice."""
    report = ScenarioReport(
        "poison_mix",
        "poison at full rate: 1e39/Infinity/year-1/10-days-ahead values, 900 kB invalid, cluster-breaking "
        "ids, a product view of the wrong type in Redis",
    )
    with single_stack(root) as (kafka, red):
        run = Run(root / "run", kafka.bootstrap_servers, red.url, base)
        try:
            ensure_topics(run.settings)
            outs = run.plan(cfg.events, 0.0, seed=39)
            bad = poison_records(outs)
            hostile = [
                Outgoing(REVIEW.name, str(r["product_id"]), json.dumps(r).encode(), valid=True)
                for r in hostile_reviews(outs)
            ]
            reviews = [o for o in outs if o.task == REVIEW.name]
            victim = str(json.loads(reviews[len(reviews) // 2].value)["product_id"])
            run.redis.set(product_key(victim), "not a hash")
            sunk = [o for o in reviews if json.loads(o.value)["product_id"] == victim]
            clean = [o for o in outs if o not in sunk] + hostile
            from kafka import KafkaProducer

            scorer = run.scorer("scorer")
            started = time.monotonic()
            p = KafkaProducer(
                bootstrap_servers=run.settings.kafka.bootstrap_servers, max_request_size=2_000_000
            )
            try:
                for rec in bad:
                    p.send(run.settings.topic(rec.topic), key=rec.key, value=rec.value)
                for o in hostile:
                    p.send(run.settings.topic("events.review"), key=o.key.encode(), value=o.value)
                p.flush(30)
            finally:
                p.close(10)
            run.produce(cfg.events, 0.0, 0.0, seed=39)
            run.wait_produced(cfg.timeout_s)
            finish(report, run, clean, cfg, [scorer])
            seconds = time.monotonic() - started
            letters = [json.loads(m.value) for m in run.read(DLQ_TOPIC)]
            stages = dict(sorted(Counter(d["stage"] for d in letters).items()))
            expected = dict(sorted(Counter([r.stage for r in bad] + ["sink"] * len(sunk)).items()))
            twice = 0
            for topic in ("scores.review", "scores.search", "scores.click"):
                ids = Counter(json.loads(m.value)["event_id"] for m in run.read(topic))
                twice += sum(1 for n in ids.values() if n > 1)
            report.dead_letters = len(letters)
            report.extra = {
                "poison_sent": len(bad) + len(sunk),
                "dead_letters_by_stage": stages,
                "published_twice": twice,
                "isolated": metric(scorer, "streamtune_isolated_records_total"),
                "batch_retries": metric(scorer, "streamtune_batch_retries_total"),
                "seconds_to_all_scored": round(seconds, 1),
            }
            if stages != expected or twice:
                report.passed = False
                report.detail += (
                    f" dead letters by stage {stages} (expected {expected}); {twice} published twice"
                )
        finally:
            run.close()
    return report


def redis_outage_past_session_timeout(root: Path, base: Settings, cfg: ChaosConfig) -> ScenarioReport:
    """Redis away for twice the session inactivity: session expiry follows the stream's event
    time, so sessions in flight when Redis went are still live when it is back (a view going
    backwards would show as an undercount in the audit)."""
    inactivity = 15.0 if cfg.quick else 30.0
    outage = 2 * inactivity

    def inject(run: Run, ws: list[Worker], kafka: EmbeddedKafka, red: EmbeddedRedis) -> list[Worker]:
        red.stop()
        time.sleep(outage)  # the fault's duration, not a wait for a condition
        ws[0].check_alive()
        red.start()
        return ws

    report = ScenarioReport(
        "redis_outage_past_session_timeout",
        f"Redis stopped for {outage:.0f} s, twice the session inactivity ({inactivity:.0f} s)",
    )
    _single(root, base, cfg, report, 41, ["scorer"], inject, persist_redis=True,
            overrides={"session_inactivity_s": inactivity})  # fmt: skip
    return report


def trainer_down(root: Path, base: Settings, cfg: ChaosConfig) -> ScenarioReport:
    """The trainer killed (SIGKILL) while events and labels flow, restarted after three times
    the label wait: the labels whose inputs are in the backlog must all join (orphan timing is
    stream time, not the wall clock), none is left pending."""
    wait_s = 4.0
    down = 3 * wait_s if cfg.quick else 60.0
    report = ScenarioReport(
        "trainer_down", f"trainer killed while traffic and labels flow, restarted {down:.0f} s later",
        audited=False,
    )  # fmt: skip
    with single_stack(root) as (kafka, red):
        run = Run(
            root / "run", kafka.bootstrap_servers, red.url, base,
            trainer_min_labels=1_000_000,  # the join is under test, not the training
            trainer_label_wait_s=wait_s, trainer_check_s=0.5,
        )  # fmt: skip
        group = f"{run.settings.kafka.group_id}-trainer"
        run.settings = run.settings.replace(trainer_group_id=group)
        try:
            ensure_topics(run.settings)
            first = run.worker("trainer", "trainer-1")
            run.produce(cfg.events, cfg.events_per_s, 0.0, seed=42, labels=True)
            quarter = cfg.events * len(TASKS) / 4
            run.wait(lambda: metric(first, "streamtune_trainer_labels_joined_total") >= quarter,
                     cfg.timeout_s, "a quarter of the labels joined", [first])  # fmt: skip
            orphans_before = metric(first, "streamtune_trainer_labels_orphan_total")
            _kill(run, first)
            time.sleep(down)  # the fault's duration: traffic and labels go on meanwhile
            second = run.worker("trainer", "trainer-2")
            run.wait_produced(cfg.timeout_s)
            topics = ["events.review", "events.search", "events.click", LABELS_TOPIC]
            run.wait(lambda: run.lag(group, topics) == 0, cfg.timeout_s, "the trainer through its backlog",
                     [second])  # fmt: skip
            run.wait(lambda: metric(second, "streamtune_trainer_labels_pending") == 0, 30.0,
                     "no label waiting", [second])  # fmt: skip
            orphans = metric(second, "streamtune_trainer_labels_orphan_total")
            dropped = metric(second, "streamtune_trainer_labels_dropped_total")
            labels = int(run.produced.labels) if run.produced else 0
            report.events_in = labels
            report.lost = int(orphans + dropped)
            report.extra = {
                "labels_sent": labels,
                "orphans_before_kill": orphans_before,
                "orphans_after_restart": orphans,
                "joined_after_restart": metric(second, "streamtune_trainer_labels_joined_total"),
                "duplicates_after_restart": metric(second, "streamtune_trainer_labels_duplicate_total"),
            }
            report.passed = orphans == 0 and dropped == 0 and orphans_before == 0
            if not report.passed:
                report.detail = f"{orphans_before + orphans} orphans, {dropped} dropped"
        finally:
            run.close()
    return report


def _copy_version(src: Path, dst: Path, version: int, parent: int) -> None:
    """A new immutable version with the parent's weights (the rollout is under test, not training)."""
    shutil.copytree(src / str(parent), dst / str(version), ignore=shutil.ignore_patterns("artifacts"))
    m = json.loads((dst / str(version) / "manifest.json").read_text())
    m.update(version=version, parent_version=parent)
    (dst / str(version) / "manifest.json").write_text(json.dumps(m))


def release_late_files(root: Path, base: Settings, cfg: ChaosConfig) -> ScenarioReport:
    """Two scorers with registries of their own; a release is announced whose files reach the
    second one late (a slow sync). It must hold the release as pending (live keeps serving), then
    serve it within the retry bound once the files are there; nothing is lost meanwhile."""
    delay = 10.0 if cfg.quick else 120.0
    task = REVIEW.name
    report = ScenarioReport(
        "release_late_files", f"a release whose files reach one of two scorers {delay:.0f} s late (torch)"
    )
    with single_stack(root) as (kafka, red):
        # torch: the version directory is the release's whole file set (an ONNX backend would also
        # wait for an exported artifact, which this scenario does not make)
        run = Run(root / "run", kafka.bootstrap_servers, red.url, base, backend="torch")
        try:
            regs = [root / "registry-a", root / "registry-b"]
            for reg in regs:
                shutil.copytree(base.model.adapter_dir, reg)
            ensure_topics(run.settings)
            outs = run.plan(cfg.events, 0.0, seed=43)
            a, b = (run.scorer(f"scorer-{n}", adapter_dir=reg) for n, reg in zip("ab", regs, strict=True))
            run.produce(cfg.events, cfg.events_per_s, 0.0, seed=43)
            run.wait(lambda: run.scored(outs) >= len(outs) // 4, cfg.timeout_s, "a quarter scored", [a, b])
            live = LocalRegistry(regs[0]).latest(task)
            assert live is not None
            new = live + 1
            _copy_version(regs[0] / task, regs[0] / task, new, live)
            sha = LocalRegistry(regs[0]).manifest_sha256(task, new)
            ReleaseLog(run.settings).publish(promote(REVIEW.name, new, sha))
            run.wait(lambda: metric(a, "streamtune_adapter_version", task=task) == new, cfg.timeout_s,
                     "scorer a serving the release", [a, b])  # fmt: skip
            run.wait(lambda: metric(b, "streamtune_releases_pending", task=task) == 1, cfg.timeout_s,
                     "scorer b holding the release as pending", [a, b])  # fmt: skip
            time.sleep(delay)  # the fault's duration: the files are late
            served_live = metric(b, "streamtune_adapter_version", task=task)
            staging = root / "sync" / str(new)
            shutil.copytree(regs[0] / task / str(new), staging)
            staging.rename(regs[1] / task / str(new))  # arrives whole, as a sync tool renames
            arrived = time.monotonic()
            run.wait(lambda: metric(b, "streamtune_adapter_version", task=task) == new, cfg.timeout_s,
                     "scorer b serving the release once its files are there", [a, b])  # fmt: skip
            report.recovery_s = round(time.monotonic() - arrived, 2)
            run.wait_produced(cfg.timeout_s)
            finish(report, run, outs, cfg, [a, b])
            report.extra = {
                "served_while_pending": served_live,
                "served_after_files_s": report.recovery_s,
                "retry_bound_s": run.settings.scorer.release_retry_max_s,
            }
            if served_live != live:
                report.passed = False
                report.detail += f" scorer b served v{served_live:.0f} while the files were missing"
        finally:
            run.close()
    return report


def label_poisoning(root: Path, base: Settings, cfg: ChaosConfig) -> ScenarioReport:
    """Labels poisoned at the source: a third flipped, a tenth dated minutes ahead (valid, but
    they must not own the holdout), a few dated three days ahead (beyond the default one-day
    skew: invalid, dead-lettered). The real trainer fine-tunes on them; the gate must refuse the
    candidate: it is kept in the registry as not releasable, and nothing is released."""
    task = REVIEW.name
    n = 60 if cfg.quick else 200
    report = ScenarioReport(
        "label_poisoning", "30 % flipped review labels, 10 % dated minutes ahead, 3 dated three days ahead",
        audited=False,
    )  # fmt: skip
    with single_stack(root) as (kafka, red):
        registry = root / "registry"
        shutil.copytree(base.model.adapter_dir, registry)
        run = Run(
            root / "run", kafka.bootstrap_servers, red.url, base,
            adapter_dir=registry, trainer_min_labels=n // 2, trainer_interval_s=3600.0,
            trainer_label_wait_s=20.0, trainer_budget_s=30.0, trainer_epochs=1,
            trainer_reference_rows=30, trainer_check_s=0.5, max_seq_len=64,
        )  # fmt: skip
        run.settings = run.settings.replace(trainer_group_id=f"{run.settings.kafka.group_id}-trainer")
        try:
            ensure_topics(run.settings)
            before = LocalRegistry(registry).versions(task)
            trainer = run.worker("trainer", "trainer")
            pct = data.HELD_OUT_PERCENT[task]
            rows = [
                (ev, lab)
                for ev, lab in review_events(base.model.data_dir)
                if not data.is_held_out(ev.event_id.removeprefix("review-"), pct)
            ][:n]
            rng = random.Random(44)
            flip = {1: 5, 2: 5, 3: 1, 4: 1, 5: 1}
            now = datetime.now(UTC)
            from kafka import KafkaProducer

            p = KafkaProducer(bootstrap_servers=run.settings.kafka.bootstrap_servers, acks="all")
            flipped = ahead = far = 0
            try:
                for ev, _ in rows:
                    p.send(run.settings.topic("events.review"), key=ev.product_id.encode(),
                           value=ev.model_dump_json().encode())  # fmt: skip
                p.flush(30)
                for i, (ev, lab) in enumerate(rows):
                    label: LabelEvent = lab
                    if rng.random() < 0.3:
                        label = label.model_copy(update={"label": flip[int(label.label)]})
                        flipped += 1
                    if i < 3:
                        label = label.model_copy(update={"ts": now + timedelta(days=3)})
                        far += 1
                    elif rng.random() < 0.1:
                        label = label.model_copy(update={"ts": now + timedelta(minutes=2)})
                        ahead += 1
                    p.send(run.settings.topic(LABELS_TOPIC), key=ev.event_id.encode(),
                           value=label.model_dump_json().encode())  # fmt: skip
                p.flush(30)
            finally:
                p.close(10)

            def ran() -> bool:
                return metric(trainer, "streamtune_trainer_runs_total", task=task) > 0

            run.wait(ran, cfg.timeout_s, "a training run on the poisoned labels", [trainer])
            outcomes = {
                o: metric(trainer, "streamtune_trainer_runs_total", task=task, outcome=o)
                for o in ("released", "rejected", "skipped", "failed", "artifact_refused")
            }
            reg = LocalRegistry(registry)
            after = reg.versions(task)
            releasable = [v for v in after if v not in before and reg.manifest(task, v).releasable]
            record = ReleaseLog(run.settings).states().get(task)  # None: nothing was ever released
            live = before[-1] if record is None else record.live_version
            invalid = metric(trainer, "streamtune_trainer_labels_invalid_total")
            report.events_in = len(rows)
            report.extra = {
                "labels": len(rows), "flipped": flipped, "minutes_ahead": ahead, "day_ahead": far,
                "labels_invalid": invalid, "runs": {k: v for k, v in outcomes.items() if v},
                "versions_before": before, "versions_after": after, "new_releasable": releasable,
                "live_after": live,
            }  # fmt: skip
            report.passed = (
                outcomes["rejected"] >= 1
                and outcomes["released"] == 0
                and not releasable
                and live == before[-1]
            )
            if invalid != far:
                report.passed = False
                report.detail += f" {invalid:.0f} labels refused as invalid for {far} dated days ahead"
            if not report.passed:
                report.detail += (
                    f" run outcomes {outcomes}, releasable new versions {releasable}, live v{live}"
                )
        finally:
            run.close()
    return report


SCENARIOS: dict[str, Callable[[Path, Settings, ChaosConfig], ScenarioReport]] = {
    "scorer_sigkill": scorer_sigkill,
    "redis_outage": redis_outage,
    "broker_restart": broker_restart,
    "rebalance": rebalance,
    "malformed_flood": malformed_flood,
    "registry_full": registry_full,
    "broker_failure_cluster": broker_failure_cluster,
    "poison_mix": poison_mix,
    "redis_outage_past_session_timeout": redis_outage_past_session_timeout,
    "trainer_down": trainer_down,
    "release_late_files": release_late_files,
    "label_poisoning": label_poisoning,
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
        report.measured = datetime.now(UTC).date().isoformat()
        log.info("chaos_scenario_done", **{k: v for k, v in asdict(report).items() if k != "extra"})
        reports.append(report)
    return reports


FIRST_FULL_RUN = "2026-11-29"  # the day of the first full run, whose records do not say it


def merge_reports(previous: list[dict[str, Any]], new: list[ScenarioReport]) -> list[ScenarioReport]:
    """The reports of a run of some scenarios over those of an earlier full run (``chaos.json``):
    scenarios run now replace their earlier rows, the others keep theirs (with the day they were
    measured); in the suite's order."""
    by_name: dict[str, ScenarioReport] = {}
    for d in previous:
        known = {k: v for k, v in d.items() if k in ScenarioReport.__dataclass_fields__}
        r = ScenarioReport(**known)
        r.measured = r.measured or FIRST_FULL_RUN
        by_name[r.name] = r
    by_name.update({r.name: r for r in new})
    order = {name: i for i, name in enumerate(SCENARIOS)}
    return sorted(by_name.values(), key=lambda r: order.get(r.name, len(order)))


def markdown(reports: list[ScenarioReport], cfg: ChaosConfig) -> str:
    lines = [
        "# Fault-tolerance report",
        "",
        f"`streamtune chaos{' --quick' if cfg.quick else ''}`: {cfg.events} events per task at "
        f"{cfg.events_per_s:.0f} events/s, real Apache Kafka, Redis and scorer processes on this machine.",
        "A scenario passes when every valid event has a result and no entity view counts an event "
        'twice (or misses one). The trainer\'s scenarios (no "out") count labels: "lost" is '
        "labels orphaned or dropped.",
        "",
        "| scenario | fault | in | out | lost | double counted | longest gap (s) | recovery (s) | passed "
        "| measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        rec = "" if r.recovery_s is None else f"{r.recovery_s:.2f}"
        out, twice, gap = (
            (r.results_out, r.double_counted, f"{r.longest_gap_s:.2f}") if r.audited else ("", "", "")
        )
        lines.append(
            f"| {r.name} | {r.fault} | {r.events_in} | {out} | {r.lost} | {twice} | "
            f"{gap} | {rec} | {'yes' if r.passed else 'NO'} | {r.measured} |"
        )
    notes = [
        f"- **{r.name}**: {r.detail.strip()} {json.dumps(r.extra) if r.extra else ''}".rstrip()
        for r in reports
        if r.detail.strip() or r.extra
    ]
    if notes:
        lines += ["", "Details:", "", *notes]
    return "\n".join(lines) + "\n"

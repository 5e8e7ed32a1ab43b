"""``streamtune demo``: the whole system on the embedded stack, with a live terminal view.

Starts Kafka (KRaft, from the Maven jars) and Redis, copies the adapter registry into
``var/demo`` (the committed versions stay untouched), starts a scorer and a trainer, and
replays the three data sets with a share of malformed events and labels that arrive late.

Online phase: after ``drift_after`` seconds, and once ``drift_min_reviews`` reviews have gone
out (the scorer's detectors need a reference window before a change can show), the review stream
drifts to a "critical wave"
(:mod:`streamtune.devtools.demo.drift`). The view shows labels joining, the trainer's runs and gate
verdicts, the new version going canary and then live (a small operator promotes the canary
when its accuracy on labelled traffic holds up, or rolls it back), and the accuracy of each
version on the drifted traffic. Stops on Ctrl-C, SIGTERM or SIGHUP (a closed terminal), or
after ``duration`` seconds, and prints the timeline. Without the live view it prints a progress
line every :data:`PROGRESS_EVERY_S` seconds and each timeline event as it happens.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import signal
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from streamtune.core.settings import REPO_ROOT, Settings
from streamtune.core.tasks import REVIEW, TASK_NAMES, TASKS
from streamtune.datasets.loaders import sentiment_of_rating
from streamtune.devtools.demo.tail import describe
from streamtune.devtools.demo.view import (
    AccuracyBook,
    Timeline,
    TrainerView,
    Update,
    accuracy_over_time,
    export_progress,
    fast_update_of,
    judge_canary,
    progress_line,
    scrape_trainer,
)
from streamtune.devtools.stack import EmbeddedKafka, ensure_redis, find_free_port
from streamtune.devtools.workers import LogTail, Worker
from streamtune.kafka.security import redact_url
from streamtune.rollout.registry import LocalRegistry
from streamtune.rollout.releases import ReleaseLog
from streamtune.rollout.state import promote, rollback

PROGRESS_EVERY_S = 5.0
ACCURACY_WINDOW_S = 30.0  # the view's accuracy-over-time windows
TRAINER_NICE = 10  # the trainer yields the shared cores to the scorer (issue 13: click latency)
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals() -> Iterator[Callable[[], None]]:
    """SIGTERM and SIGHUP stop the demo as Ctrl-C does: the first of the three raises
    KeyboardInterrupt in the main thread. The context yields ``shield``, which makes all three
    ignored: the demo calls it before it stops the stack, so a signal while it shuts down (a
    terminal closed 15 s after Ctrl-C) cannot cut the shutdown short and leave the broker,
    Redis or a worker running (the workers run in their own sessions: only the demo stops them).
    The previous handlers are restored on exit. Off the main thread, where Python allows no
    handlers, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS}

    def shield() -> None:
        for s in _STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def interrupt(signum: int, frame: object) -> None:
        shield()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for s in _STOP_SIGNALS:
        signal.signal(s, interrupt)
    try:
        yield shield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass
class Snapshot:
    """Counters scraped from the scorer's /metrics at one instant."""

    at: float
    scored: dict[str, float] = field(default_factory=dict)
    dead: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # task -> (le, count)
    versions: dict[str, float] = field(default_factory=dict)
    canary: dict[str, float] = field(default_factory=dict)
    canary_fraction: dict[str, float] = field(default_factory=dict)
    drift: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (task, signal, detail)


def scrape(port: int) -> Snapshot:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    snap = Snapshot(at=time.monotonic())
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            task = s.labels.get("task", "")
            if s.name == "streamtune_events_scored_total":
                snap.scored[task] = s.value
            elif s.name == "streamtune_dead_letters_total":
                snap.dead[task] = s.value
            elif s.name == "streamtune_event_to_redis_seconds_bucket":
                snap.buckets.setdefault(task, []).append((float(s.labels["le"]), s.value))
            elif s.name == "streamtune_adapter_version":
                snap.versions[task] = s.value
            elif s.name == "streamtune_canary_version":
                snap.canary[task] = s.value
            elif s.name == "streamtune_canary_fraction":
                snap.canary_fraction[task] = s.value
            elif s.name == "streamtune_drift_detected_total":
                snap.drift[(task, s.labels["signal"], s.labels["detail"])] = s.value
    return snap


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the histogram bucket holding quantile ``q`` (Prometheus-style, coarse)."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    for le, count in buckets:
        if count >= q * total:
            return le
    return None


def _delta(now: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    prev = dict(before)
    return [(le, c - prev.get(le, 0.0)) for le, c in now]


@dataclass
class DemoOptions:
    duration: float = 0.0  # 0: until Ctrl-C
    rate: float = 20.0
    malformed: float = 0.02
    drift_after: float = 15.0
    # Reviews sent before the drift, whatever ``drift_after`` says: ADWIN finds a change when the
    # window's two parts differ beyond a Hoeffding bound, and with ~50 observations before the
    # change that bound (~0.45 on a class share) is wider than the wave's shift (~0.3).
    drift_min_reviews: int = 250
    second_drift_after: float = 150.0  # s after the first drift: reviews from other sites (0: none)
    fast_interval: float = 30.0  # the trainer's fast path (STREAMTUNE_TRAINER_FAST_INTERVAL_S)
    label_delay: float = 5.0
    train_after: int = 300  # new joined labels that start a training run
    train_budget: float = 90.0
    canary_fraction: float = 0.5
    judge_min: int = 100  # labelled results per version (since the canary began) before deciding
    live_view: bool = True
    until: Callable[[DemoState], bool] | None = None  # stop early once this holds (tests)


@dataclass
class DemoState:
    phase: str = "natural"
    book: AccuracyBook = field(default_factory=AccuracyBook)
    timeline: Timeline = field(default_factory=Timeline)
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=6))
    runs_seen: dict[tuple[str, str], float] = field(default_factory=dict)
    canary_seen: dict[str, float] = field(default_factory=dict)
    canary_since: dict[str, float] = field(default_factory=dict)
    trainer: TrainerView = field(default_factory=TrainerView)
    drift_seen: dict[tuple[str, str, str], float] = field(default_factory=dict)
    drift_onset: float | None = None  # monotonic time the replay switched to the drifted wave
    speeds: dict[tuple[str, str], Update] = field(default_factory=dict)  # (task, fast|slow) -> last
    story: dict[str, float] = field(default_factory=dict)  # what happened first, monotonic times
    started: float = field(default_factory=time.monotonic)

    def mark(self, what: str, at: float | None = None) -> None:
        """The first time of ``what`` (later ones are not the story's)."""
        self.story.setdefault(what, time.monotonic() if at is None else at)

    def since_drift(self, at: float | None = None) -> str:
        if self.drift_onset is None:
            return ""
        t = (time.monotonic() if at is None else at) - self.drift_onset
        return f", {t:,.0f} s after the drift began" if t >= 0 else ""

    def detector(self, task: str) -> str:
        """The task's detector state for the view: its detections so far, by signal."""
        mine = {(sig, det): n for (t, sig, det), n in self.drift_seen.items() if t == task and n}
        if not mine:
            return "watching"
        return ", ".join(f"{sig} {det}".strip() + f" ×{n:.0f}" for (sig, det), n in sorted(mine.items()))


def _fmt_ms(v: float | None) -> str:
    return "–" if v is None else ("> 30000" if v == float("inf") else f"≤ {v * 1000:,.0f}")


def accuracy_line(book: AccuracyBook) -> str:
    acc = book.by_version()
    return "   ".join(f"v{v}: {ok / n:.3f} ({n} judged)" for v, (ok, n) in sorted(acc.items()))


def render(first: Snapshot, prev: Snapshot, cur: Snapshot, st: DemoState, elapsed: float) -> Group:
    table = Table(title=f"streamtune demo — {elapsed:,.0f} s — review stream: {st.phase}", expand=True)
    for col in (
        "task",
        "adapter",
        "scored",
        "events/s",
        "p50 ms",
        "p99 ms",
        "dead letters",
        "labels joined",
        "training",
        "drift detector",
    ):
        table.add_column(
            col,
            justify="left" if col in ("task", "adapter", "training", "drift detector") else "right",
            no_wrap=True,
        )
    dt = max(cur.at - prev.at, 1e-6)
    for task in TASK_NAMES:
        rate = (cur.scored.get(task, 0) - prev.scored.get(task, 0)) / dt
        window = _delta(cur.buckets.get(task, []), first.buckets.get(task, []))
        ver, can = cur.versions.get(task), cur.canary.get(task)
        adapter = f"v{ver:.0f}" if ver else "–"
        if can:
            adapter += f" + canary v{can:.0f} ({cur.canary_fraction.get(task, 0):.0%})"
        training = (
            "training…" if st.trainer.training.get(task) else f"{st.trainer.fresh.get(task, 0):,.0f} fresh"
        )
        table.add_row(
            task,
            adapter,
            f"{cur.scored.get(task, 0):,.0f}",
            f"{rate:,.1f}",
            _fmt_ms(quantile(window, 0.5)),
            _fmt_ms(quantile(window, 0.99)),
            f"{cur.dead.get(task, 0):,.0f}",
            f"{st.trainer.joined.get(task, 0):,.0f}",
            training,
            st.detector(task),
        )
    acc = st.book.by_version()
    acc_line = (
        "   ".join(f"v{v}: {ok / n:.3f} ({n} judged)" for v, (ok, n) in sorted(acc.items()))
        or "waiting for labels…"
    )
    over_time = accuracy_over_time(st.book.over_time(st.started, ACCURACY_WINDOW_S, time.monotonic()))
    online = Panel(
        f"review accuracy on drifted traffic, per version — {acc_line}\n"
        f"on fresh labelled traffic per {ACCURACY_WINDOW_S:.0f} s, oldest first — "
        + ("   ".join(over_time) or "waiting for labels…")
        + "\n"
        f"labels: {st.trainer.duplicates:,.0f} duplicates dropped, {st.trainer.orphans:,.0f} orphans\n\n"
        + ("\n".join(st.timeline.lines) or "no training run yet"),
        title="online learning",
        expand=True,
    )
    results = Panel("\n".join(st.recent) or "waiting for results…", title="recent results", expand=True)
    return Group(table, speeds_table(st), online, results)


def speeds_table(st: DemoState) -> Table:
    """The two speeds as rows: each path's last update of each text task, and its gate verdict."""
    table = Table(title="two speeds", expand=True)
    for col in ("task", "path", "what it updates", "last update", "version", "labels", "cost", "gate"):
        table.add_column(col, no_wrap=col != "gate")
    now = time.monotonic()
    what = {"fast": "linear stage, every interval and at once on drift", "slow": "LoRA fine-tune"}
    for task in (t for t, spec in TASKS.items() if spec.is_text):
        for path in ("fast", "slow"):
            up = st.speeds.get((task, path))
            if up is None:
                table.add_row(task, path, what[path], "–", "–", "–", "–", "no update yet")
                continue
            verdict = ("PASSED " if up.passed else "REJECTED ") + up.reason
            version = f"v{up.version}" if up.passed else "–"
            table.add_row(task, path, what[path], f"{now - up.at:,.0f} s ago", version, f"{up.labels:,}",
                          up.cost, verdict[:90])  # fmt: skip
    return table


def _follow(settings: Settings, st: DemoState, stop: threading.Event) -> None:
    topics = [settings.topic(t.output_topic) for t in TASKS.values()] + [settings.topic("events.dlq")]
    consumer = KafkaConsumer(
        *topics,
        bootstrap_servers=settings.kafka.bootstrap_servers.split(","),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=500,
    )
    review_topic = settings.topic("scores.review")
    try:
        while not stop.is_set():
            for msg in consumer:
                value = json.loads(msg.value)
                st.recent.append(describe(msg.topic, value)[:160])
                if msg.topic == review_topic:
                    st.book.result(value["event_id"], int(value["adapter"]["version"]), value["label"])
                if stop.is_set():
                    break
    finally:
        consumer.close()


def _replay_phases(settings: Settings, opts: DemoOptions, st: DemoState, stop: threading.Event) -> None:
    from streamtune.core.events import LabelEvent
    from streamtune.devtools.demo.replay import replay

    began = time.monotonic()

    reviews_out = [0]  # reviews whose label went out (each follows its event)

    def on_label(lab: LabelEvent) -> None:
        if lab.task == REVIEW.name:
            reviews_out[0] += 1
        if lab.task == REVIEW.name and lab.event_id is not None:
            name = sentiment_of_rating(lab.label) if isinstance(lab.label, int) else str(lab.label)
            st.book.label(lab.event_id, name, drifted=st.phase != "natural")

    # Both phases: all tasks, paced, labels following their events after the delay.
    phase = functools.partial(
        replay, settings, list(TASK_NAMES), 1_000_000, opts.rate, opts.malformed,
        labels=True, label_delay_s=opts.label_delay, on_label=on_label, cycle_queries=True,
    )  # fmt: skip

    def drift_due() -> bool:
        return time.monotonic() - began > opts.drift_after and reviews_out[0] >= opts.drift_min_reviews

    first = phase(should_stop=lambda: stop.is_set() or drift_due())
    if stop.is_set():
        return
    st.phase = "drifted"
    st.drift_onset = time.monotonic()
    st.story["drift"] = st.drift_onset
    st.timeline.add("the review stream drifts: a critical wave (a third negative, a third neutral)")
    second_at = st.drift_onset + opts.second_drift_after

    def second_due() -> bool:
        return bool(opts.second_drift_after) and time.monotonic() >= second_at

    wave = phase(skip=max(first.sent.values()), should_stop=lambda: stop.is_set() or second_due(),
                 reviews="critical")  # fmt: skip
    if stop.is_set() or not opts.second_drift_after:
        return
    st.phase = "other sites"
    st.story["second_drift"] = time.monotonic()
    st.timeline.add(
        "the review stream drifts again: reviews from other sites (Amazon, IMDB, Yelp sentences), "
        "a kind the live version never saw"
    )
    done = {t: first.sent.get(t, 0) + wave.sent.get(t, 0) for t in TASK_NAMES}
    phase(skip={**done, REVIEW.name: 0}, should_stop=stop.is_set, reviews="other_sites")


def _observe(
    settings: Settings,
    registry: LocalRegistry,
    releases: ReleaseLog,
    cur: Snapshot,
    st: DemoState,
    opts: DemoOptions,
    trainer_log: LogTail,
) -> None:
    """Turn metric changes and the trainer's fast updates into timeline lines, and act as the
    canary's operator."""
    now = time.monotonic()
    for (task, outcome), n in st.trainer.runs.items():
        if n > st.runs_seen.get((task, outcome), 0):
            st.runs_seen[(task, outcome)] = n
            if outcome == "failed":
                st.timeline.add(f"trainer: {task} run failed (see var/demo/trainer.log)")
                continue
            version = registry.latest(task)
            if version is None:
                continue
            m = registry.manifest(task, version)
            tr = m.training
            if tr.get("path") == "fast":  # the slow run's version was not the newest one: find it
                slow = [
                    v
                    for v in registry.versions(task)
                    if registry.manifest(task, v).training.get("path") != "fast"
                ]
                m = registry.manifest(task, slow[-1])
                tr = m.training
            passed, fresh = bool(m.gate.get("passed")), int(tr.get("fresh_labels") or 0)
            reason = str(m.gate.get("reason"))
            st.speeds[(task, "slow")] = Update(
                now, m.version, passed, reason, fresh, f"{tr.get('fit_seconds')} s"
            )
            st.timeline.add(
                f"trainer (slow): {task} v{m.version} from v{m.parent_version}, {fresh} fresh "
                f"+ {tr.get('replay_labels')} replayed labels, {tr.get('fit_seconds')} s; gate "
                f"{'PASSED' if passed else 'REJECTED'}: {m.gate.get('reason')}{st.since_drift()}"
            )
    for record in trainer_log.records():  # the fast path's updates, passed or refused
        up = fast_update_of(record, now)
        if up is None:
            continue
        task = str(record.get("task"))
        st.speeds[(task, "fast")] = up
        verdict = "PASSED" if up.passed else "REJECTED"
        what = f"v{up.version}" if up.passed else "update"
        st.timeline.add(
            f"trainer (fast): {task} {what}, linear stage on {up.labels} fresh labels, {up.cost}; "
            f"gate {verdict} ({up.reason}){st.since_drift()}"
        )
    for task, n in sorted(st.trainer.drift.items()):  # the trainer's, on labelled traffic
        first = n > 0 and not st.drift_seen.get((task, "error_rate", ""))
        st.drift_seen[(task, "error_rate", "")] = n
        if first:
            if st.drift_onset is not None:
                st.mark("detected")
            st.timeline.add(f"detector: {task} drift in error_rate on labelled traffic{st.since_drift()}")
    for key, n in sorted(cur.drift.items()):  # a signal's first detection goes on the timeline
        first = n > 0 and not st.drift_seen.get(key)
        st.drift_seen[key] = n
        if first:
            task, what = key[0], f"{key[1]} {key[2]}".strip()
            if st.drift_onset is not None:
                st.mark("detected")
            st.timeline.add(f"detector: {task} drift in {what}{st.since_drift()}")
    for task in TASK_NAMES:
        can = cur.canary.get(task, 0.0)
        if can != st.canary_seen.get(task, 0.0):
            st.canary_seen[task] = can
            if can:
                st.canary_since[task] = now
                share = cur.canary_fraction.get(task, 0)
                path = _path_of(registry, task, int(can))
                if st.drift_onset is not None:
                    st.mark(f"{path}_canary")
                st.timeline.add(
                    f"scorer: {task} v{can:.0f} ({path} update) in canary for {share:.0%} of entities "
                    f"(stable hash){st.since_drift()}"
                )
        if not can:
            continue
        live = int(cur.versions.get(task, 0))
        acc = st.book.by_version(drifted_only=False, since=st.canary_since.get(task))
        if task == REVIEW.name:  # the accuracy book holds review labels only
            verdict, why = judge_canary(
                acc.get(live, (0, 0)), acc.get(int(can), (0, 0)), opts.judge_min, 0.02
            )
        else:  # no per-result labels in the view for these: promote after a clean minute
            clean = now - st.canary_since.get(task, now) > 60
            verdict, why = (
                ("promote", "a minute of canary (no per-result labels here)") if clean else ("wait", "")
            )
        if verdict == "wait":
            continue
        sha = registry.manifest_sha256(task, int(can))
        if verdict == "promote":
            releases.publish(promote(task, int(can), sha, by="demo-operator"))  # type: ignore[arg-type]
            path = _path_of(registry, task, int(can))
            if st.drift_onset is not None:
                st.mark(f"{path}_live")
            st.timeline.add(
                f"operator: promoted {task} v{can:.0f} ({path} update) to live — {why}{st.since_drift()}"
            )
        else:
            live_sha = registry.manifest_sha256(task, live)
            releases.publish(rollback(task, int(can), live, live_sha, reason=why, by="demo-operator"))  # type: ignore[arg-type]
            st.timeline.add(f"operator: rolled {task} back to v{live} — {why}")
        st.canary_seen[task] = 0.0


def _path_of(registry: LocalRegistry, task: str, version: int) -> str:
    """Which speed made a version: fast, slow, or shipped (not the trainer's)."""
    try:
        tr = registry.manifest(task, version).training
    except Exception:
        return "unknown"
    if tr.get("source") != "trainer":
        return "shipped"
    return str(tr.get("path", "slow"))


def story_line(st: DemoState) -> str:
    """The run as one sentence: drift at t, detected at t+x, fast update live at t+y, slow at t+z."""
    onset = st.story.get("drift")
    if onset is None:
        return "story: the stream never drifted"
    parts = [f"drift at {onset - st.started:,.0f} s"]
    steps = (
        ("detected", "detected"), ("fast_canary", "fast update in canary"), ("fast_live", "fast update live"),
        ("slow_canary", "slow update in canary"), ("slow_live", "slow update live"),
        ("second_drift", "second drift (other sites)"),
    )  # fmt: skip
    for key, what in steps:
        at = st.story.get(key)
        parts.append(f"{what} +{at - onset:,.0f} s" if at is not None else f"{what}: not reached")
    return "story: " + "; ".join(parts)


def planned_exports(settings: Settings, registry: LocalRegistry) -> int:
    """How many ONNX artifacts the demo's scorer exports before it serves: one per task whose
    version to serve (no release yet: the default one) needs one (``scorer.main.needs_export``)."""
    from streamtune.scorer.main import needs_export

    defaults = [(t, registry.default_version(t, settings.backend_for(t))) for t in TASK_NAMES]
    return sum(v is not None and needs_export(settings, registry, t, v) for t, v in defaults)


class _StartupLog:
    """Follows the scorer's log while it starts, printing its export progress."""

    def __init__(self, path: Path, planned: int, say: Callable[[str], None]) -> None:
        self.tail, self.planned, self.say = LogTail(path), planned, say
        self.done = 0

    def poll(self) -> None:
        for rec in self.tail.records():
            line, self.done = export_progress(rec, self.done, self.planned)
            if line is not None:
                self.say(line)


def run_demo(base: Settings, opts: DemoOptions) -> DemoState:
    with stop_signals() as shield:
        return _run_demo(base, opts, shield)


def _run_demo(base: Settings, opts: DemoOptions, shield: Callable[[], None]) -> DemoState:
    from rich.console import Console

    from streamtune.ops.logs import configure_logging
    from streamtune.training.bootstrap import TrainConfig, train_task

    console = Console()

    def say(line: str) -> None:
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            console.print(line, highlight=False, markup=False, soft_wrap=True)

    work = REPO_ROOT / "var" / "demo"
    shutil.rmtree(work, ignore_errors=True)  # every demo starts from a clean broker and registry
    work.mkdir(parents=True)
    configure_logging("ERROR", json=False)
    console.print("[bold]streamtune demo[/] — starting the embedded stack (Kafka 3.9 KRaft, Redis)…")
    committed = LocalRegistry(base.model.adapter_dir)
    for task in TASK_NAMES:
        if committed.latest(task) is None:
            console.print(f"  training version 1 of {task} (first run only)…")
            train_task(task, base.model.base_model, base.model.data_dir, committed, TrainConfig())
    shutil.copytree(base.model.adapter_dir, work / "adapters", ignore=shutil.ignore_patterns(".*"))
    kafka = EmbeddedKafka(work_dir=work / "kafka")
    workers: list[Worker] = []
    redis_srv = None
    stop = threading.Event()
    st = DemoState()
    try:
        kafka.start()
        redis_url, redis_srv = ensure_redis(base.redis.url, work / "redis")
        settings = base.replace(
            bootstrap_servers=kafka.bootstrap_servers,
            redis_url=redis_url,
            metrics_port=find_free_port(),
            adapter_dir=work / "adapters",
            state_dir=work / "state",
            trainer_min_labels=opts.train_after,
            trainer_interval_s=3600.0,
            trainer_budget_s=opts.train_budget,
            trainer_epochs=1,
            trainer_reference_rows=150,
            trainer_release_stage="canary",
            trainer_canary_fraction=opts.canary_fraction,
            trainer_check_s=1.0,
            trainer_label_wait_s=30.0,
            trainer_holdout_max=100,
            trainer_fast_interval_s=opts.fast_interval,
            # Two workers share two cores: one torch thread each, or they thrash.
            torch_threads=1,
        )
        trainer_settings = settings.replace(metrics_port=find_free_port())
        registry = LocalRegistry(settings.model.adapter_dir)
        console.print(
            f"  Kafka {settings.kafka.bootstrap_servers}  Redis {redact_url(redis_url)}  "
            f"registry {settings.model.adapter_dir}"
        )
        planned = planned_exports(settings, registry)
        console.print(
            "  starting a scorer and a trainer (loading the model"
            + (f"; {planned} ONNX export(s) first, about a minute each)…" if planned else ")…")
        )
        scorer = Worker("scorer", settings, work / "scorer.log")
        workers.append(scorer)
        scorer.wait_ready(progress=_StartupLog(scorer.log, planned, say).poll)
        trainer = Worker("trainer", trainer_settings, work / "trainer.log", nice=TRAINER_NICE)
        trainer_log = LogTail(work / "trainer.log")
        workers.append(trainer)
        trainer.wait_ready()
        releases = ReleaseLog(settings)
        threading.Thread(target=_follow, args=(settings, st, stop), daemon=True).start()
        threading.Thread(target=_replay_phases, args=(settings, opts, st, stop), daemon=True).start()
        st.timeline.add(
            f"replaying at {opts.rate:.0f} events/s, labels {opts.label_delay:.0f} s late; drift after "
            f"{opts.drift_after:.0f} s and {opts.drift_min_reviews} reviews; training after "
            f"{opts.train_after} new labels (the trainer shares the cores "
            f"with the scorer, at nice {TRAINER_NICE})"
        )
        started = st.started = time.monotonic()  # the story's clock starts with the replay
        first = prev = last_line = scrape(settings.ops.metrics_port)
        printed = 0  # timeline lines printed so far (without the live view)
        view = Live(render(first, prev, prev, st, 0), console=console, refresh_per_second=2)
        live_ctx = view if opts.live_view else contextlib.nullcontext()
        with live_ctx as live:
            while not opts.duration or time.monotonic() - started < opts.duration:
                if opts.until is not None and opts.until(st):
                    break
                scorer.check_alive()
                trainer.check_alive()
                stop.wait(1.0)
                cur = scrape(settings.ops.metrics_port)
                with contextlib.suppress(OSError):
                    st.trainer = scrape_trainer(trainer.metrics())
                _observe(settings, registry, releases, cur, st, opts, trainer_log)
                if live is not None:
                    live.update(render(first, prev, cur, st, time.monotonic() - started))
                else:
                    for line in st.timeline.all[printed:]:
                        say(line)
                    printed = len(st.timeline.all)
                    if cur.at - last_line.at >= PROGRESS_EVERY_S:
                        say(_progress(cur, last_line, st, time.monotonic() - started))
                        last_line = cur
                prev = cur
    except KeyboardInterrupt as e:
        shield()
        say(f"stopping ({e or 'Ctrl-C'})…")
    finally:
        shield()  # from here on no signal can cut the shutdown short
        stop.set()
        for w in workers:
            w.terminate()  # all at once, then wait for each
        for w in workers:
            w.stop()
        if redis_srv is not None:
            redis_srv.stop()
        kafka.stop()
    say("\ntimeline")
    for line in st.timeline.all:
        say("  " + line)
    say(f"review accuracy on drifted traffic: {accuracy_line(st.book)}")
    say(story_line(st))
    say("demo stopped; stack shut down.")
    return st


def _progress(cur: Snapshot, before: Snapshot, st: DemoState, elapsed: float) -> str:
    dt = max(cur.at - before.at, 1e-6)
    rates = {t: (cur.scored.get(t, 0) - before.scored.get(t, 0)) / dt for t in TASK_NAMES}
    dead, joined = sum(cur.dead.values()), sum(st.trainer.joined.values())
    return progress_line(elapsed, TASK_NAMES, cur.scored, rates, cur.versions, dead, joined)

"""The demo's online-learning view: fresh-traffic accuracy per adapter version, the trainer's
progress, and a small operator that promotes or rolls back the trainer's canary.

Pure bookkeeping (:class:`AccuracyBook`, :func:`judge_canary`) plus scraping helpers; the demo
loop in :mod:`streamtune.devtools.demo.main` does the I/O.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

Verdict = Literal["promote", "rollback", "wait"]


@dataclass
class AccuracyBook:
    """Joins review results (version, predicted label) with the true labels the replay sent."""

    results: dict[str, tuple[int, str, float]] = field(default_factory=dict)  # version, label, seen at
    truth: dict[str, str] = field(default_factory=dict)
    drifted: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def result(self, event_id: str, version: int, label: str, at: float | None = None) -> None:
        with self.lock:
            self.results[event_id] = (version, label, time.monotonic() if at is None else at)

    def label(self, event_id: str, label: str, drifted: bool) -> None:
        with self.lock:
            self.truth[event_id] = label
            if drifted:
                self.drifted.add(event_id)

    def by_version(self, drifted_only: bool = True, since: float | None = None) -> dict[int, tuple[int, int]]:
        """version -> (correct, judged) over events whose label arrived (results seen after
        ``since``, a monotonic time, when given: compare versions on the same traffic)."""
        out: dict[int, tuple[int, int]] = {}
        with self.lock:
            for eid, (version, pred, at) in self.results.items():
                true = self.truth.get(eid)
                if (
                    true is None
                    or (drifted_only and eid not in self.drifted)
                    or (since is not None and at < since)
                ):
                    continue
                ok, n = out.get(version, (0, 0))
                out[version] = (ok + (pred == true), n + 1)
        return out

    def over_time(self, start: float, window_s: float, now: float) -> dict[int, list[tuple[int, int]]]:
        """Accuracy on fresh traffic per version, over time: for each version, (correct, judged)
        in each ``window_s`` window of result times from ``start`` to ``now`` (all labelled
        traffic, drifted or not)."""
        n_windows = max(1, math.ceil((now - start) / window_s))
        out: dict[int, list[tuple[int, int]]] = {}
        with self.lock:
            for eid, (version, pred, at) in self.results.items():
                true = self.truth.get(eid)
                if true is None or at < start:
                    continue
                w = min(int((at - start) // window_s), n_windows - 1)
                cells = out.setdefault(version, [(0, 0)] * n_windows)
                ok, n = cells[w]
                cells[w] = (ok + (pred == true), n + 1)
        return out


def accuracy_over_time(cells: dict[int, list[tuple[int, int]]], last: int = 8) -> list[str]:
    """One line per version: its accuracy in the last ``last`` windows ("·" where it served no
    labelled traffic)."""
    lines = []
    for version, row in sorted(cells.items()):
        shown = " ".join(f"{ok / n:.2f}" if n else "  · " for ok, n in row[-last:])
        lines.append(f"v{version}: {shown}")
    return lines


@dataclass
class Update:
    """A trainer's last update on one path, for the view: fast (the linear stage) or slow (the
    fine-tune)."""

    at: float  # monotonic time it was seen
    version: int
    passed: bool
    reason: str
    labels: int
    cost: str  # e.g. "3.4 s CPU" or "95 s"


def fast_update_of(record: dict[str, object], now: float) -> Update | None:
    """The trainer log's ``fast_update_done`` record as an :class:`Update` (None: another record)."""
    if record.get("event") != "fast_update_done" or record.get("outcome") == "deferred":
        return None  # deferred: not run (a canary was being judged)
    outcome = str(record.get("outcome"))
    passed = outcome not in ("rejected", "failed", "artifact_refused")
    version = record.get("version")
    return Update(
        at=now,
        version=int(version) if isinstance(version, int) else 0,
        passed=passed,
        reason=f"{outcome}: {record.get('reason')}",
        labels=int(record.get("fresh") or 0),  # type: ignore[call-overload]
        cost=f"{float(record.get('cpu_seconds') or 0.0):.1f} s CPU",  # type: ignore[arg-type]
    )


def judge_canary(
    live: tuple[int, int], canary: tuple[int, int], min_judged: int, margin: float, give_up_after: int = 5
) -> tuple[Verdict, str]:
    """Compare canary and live accuracy on the same labelled traffic ((correct, judged) each).

    Waits until both arms have ``min_judged`` rows. Rolls back when the canary is worse than
    live by more than ``margin`` with two standard errors to spare; promotes when it is no worse
    than ``margin``; otherwise waits, and rolls back (the conservative side) once both arms
    have ``give_up_after`` times ``min_judged`` rows without a decision.
    """
    (lok, ln), (cok, cn) = live, canary
    if ln < min_judged or cn < min_judged:
        return "wait", f"judged live {ln}, canary {cn} of {min_judged}"
    la, ca = lok / ln, cok / cn
    se = math.sqrt(la * (1 - la) / ln + ca * (1 - ca) / cn)
    why = f"accuracy on the same labelled traffic: canary {ca:.3f} ({cn}) vs live {la:.3f} ({ln})"
    if ca - la + 2 * se < -margin:
        return "rollback", why + ", worse beyond noise"
    if ca >= la - margin:
        return "promote", why
    if min(ln, cn) >= give_up_after * min_judged:
        return "rollback", why + ", no better after long observation"
    return "wait", why


@dataclass
class TrainerView:
    joined: dict[str, float] = field(default_factory=dict)
    fresh: dict[str, float] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)
    runs: dict[tuple[str, str], float] = field(default_factory=dict)
    orphans: float = 0.0
    duplicates: float = 0.0
    drift: dict[str, float] = field(default_factory=dict)  # error-rate changes found, per task
    fast: dict[tuple[str, str], float] = field(default_factory=dict)  # fast-path updates, by outcome


def scrape_trainer(text: str) -> TrainerView:
    v = TrainerView()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            task = s.labels.get("task", "")
            if s.name == "streamtune_trainer_labels_joined_total":
                v.joined[task] = s.value
            elif s.name == "streamtune_trainer_fresh_labels":
                v.fresh[task] = s.value
            elif s.name == "streamtune_trainer_training":
                v.training[task] = s.value
            elif s.name == "streamtune_trainer_runs_total":
                v.runs[(task, s.labels["outcome"])] = s.value
            elif s.name == "streamtune_trainer_labels_orphan_total":
                v.orphans += s.value
            elif s.name == "streamtune_trainer_labels_duplicate_total":
                v.duplicates += s.value
            elif s.name == "streamtune_trainer_drift_detected_total":
                v.drift[task] = s.value
            elif s.name == "streamtune_trainer_fast_updates_total":
                v.fast[(task, s.labels["outcome"])] = s.value
    return v


@dataclass
class Timeline:
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=10))
    all: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        line = f"{datetime.now().strftime('%H:%M:%S')}  {text}"
        self.lines.append(line)
        self.all.append(line)


def export_progress(event: Mapping[str, object], done: int, planned: int) -> tuple[str | None, int]:
    """What one scorer log record says about its start-up exports, as a line for the console
    (None: nothing), and the count of exports done after it. The scorer exports the ONNX
    artifacts its versions lack before it serves (``export_on_start``), about a minute each on
    two cores; ``planned`` is how many the demo expects (:func:`planned_exports`)."""
    what = f"{event.get('task')} v{event.get('version')} ({event.get('backend')})"
    if event.get("event") == "export_started":
        return f"  exporting {what}: export {done + 1} of {max(planned, done + 1)}…", done
    if event.get("event") == "export_done":
        verdict = "passed" if event.get("passed") else "REFUSED (served in torch)"
        return (
            f"  exported {what} in {event.get('seconds')} s, agreement {event.get('agreement')}: {verdict}",
            done + 1,
        )
    return None, done


def progress_line(
    elapsed: float,
    tasks: Sequence[str],
    scored: dict[str, float],
    rates: dict[str, float],
    versions: dict[str, float],
    dead: float,
    joined: float,
) -> str:
    """The one line the demo prints every few seconds without its live view: per task its
    serving version, results so far and their rate."""
    parts = "  ".join(
        f"{task} v{versions.get(task, 0):.0f} {scored.get(task, 0):,.0f} ({rates.get(task, 0):.1f}/s)"
        for task in tasks
    )
    return f"[{elapsed:5.0f} s] {parts}  dead letters {dead:,.0f}  labels joined {joined:,.0f}"

"""The demo's online-learning view: fresh-traffic accuracy per adapter version, the trainer's
progress, and a small operator that promotes or rolls back the trainer's canary.

Pure bookkeeping (:class:`AccuracyBook`, :func:`judge_canary`) plus scraping helpers; the demo
loop in :mod:`streamtune.demo` does the I/O.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

Verdict = Literal["promote", "rollback", "wait"]


@dataclass
class AccuracyBook:
    """Joins review results (version, predicted label) with the true labels the replay sent."""

    results: dict[str, tuple[int, str]] = field(default_factory=dict)
    truth: dict[str, str] = field(default_factory=dict)
    drifted: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def result(self, event_id: str, version: int, label: str) -> None:
        with self.lock:
            self.results[event_id] = (version, label)

    def label(self, event_id: str, label: str, drifted: bool) -> None:
        with self.lock:
            self.truth[event_id] = label
            if drifted:
                self.drifted.add(event_id)

    def by_version(self, drifted_only: bool = True) -> dict[int, tuple[int, int]]:
        """version -> (correct, judged) over events whose label arrived."""
        out: dict[int, tuple[int, int]] = {}
        with self.lock:
            for eid, (version, pred) in self.results.items():
                true = self.truth.get(eid)
                if true is None or (drifted_only and eid not in self.drifted):
                    continue
                ok, n = out.get(version, (0, 0))
                out[version] = (ok + (pred == true), n + 1)
        return out


def judge_canary(
    live: tuple[int, int], canary: tuple[int, int], min_judged: int, margin: float
) -> tuple[Verdict, str]:
    """Promote a canary whose accuracy on labelled traffic is at least the live one's minus
    ``margin``; roll it back when it is worse by more; wait until both have ``min_judged`` rows."""
    (lok, ln), (cok, cn) = live, canary
    if ln < min_judged or cn < min_judged:
        return "wait", f"judged live {ln}, canary {cn} of {min_judged}"
    la, ca = lok / ln, cok / cn
    why = f"accuracy on labelled traffic: canary {ca:.3f} ({cn}) vs live {la:.3f} ({ln})"
    if ca >= la - margin:
        return "promote", why
    return "rollback", why


@dataclass
class TrainerView:
    joined: dict[str, float] = field(default_factory=dict)
    fresh: dict[str, float] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)
    runs: dict[tuple[str, str], float] = field(default_factory=dict)
    orphans: float = 0.0
    duplicates: float = 0.0


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
    return v


@dataclass
class Timeline:
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=10))
    all: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        line = f"{datetime.now().strftime('%H:%M:%S')}  {text}"
        self.lines.append(line)
        self.all.append(line)

"""Pure decisions of the online trainer: label normalisation, joins, when to train, what to train
on, and the release gate. No I/O here; :mod:`streamtune.trainer` supplies the state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from streamtune.core import tasks
from streamtune.core.events import LabelEvent
from streamtune.core.tasks import TASKS
from streamtune.datasets.reference import input_key

# The metric each task's gate compares (higher is better for all of them).
GATE_METRIC: dict[str, str] = {name: spec.gate_metric for name, spec in TASKS.items()}
CLICK_LABELS: list[str] = list(tasks.CLICK_LABELS)


def label_name(label: LabelEvent) -> str:
    """The label as the class name the task's model predicts."""
    return TASKS[label.task].label_of(label.label)


def label_key(label: LabelEvent) -> str:
    """Join key: the labelled event (text tasks) or session (purchase intent), per task."""
    return f"{label.task}:{label.event_id or label.session_id}"


@dataclass(frozen=True, slots=True)
class Example:
    """One joined label: the model input and the class name, where the label came from, and its
    join sequence number (the order in which the trainer joined it: what "fresh" is measured by,
    since a label that waited for its input joins after labels with higher offsets)."""

    key: str
    x: str | list[float]
    y: str
    partition: int
    offset: int
    ts: float  # label time, epoch seconds
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "x": self.x, "y": self.y, "p": self.partition, "o": self.offset, "t": self.ts,
            "s": self.seq,
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Example:
        return cls(d["key"], d["x"], d["y"], int(d["p"]), int(d["o"]), float(d["t"]), int(d.get("s", 0)))


Watermark = int  # the highest join sequence number already trained on (-1: none)


def is_fresh(ex: Example, watermark: Watermark) -> bool:
    return ex.seq > watermark


def advance(watermark: Watermark, examples: Iterable[Example]) -> Watermark:
    return max([watermark, *(e.seq for e in examples)])


@dataclass(frozen=True, slots=True)
class Trigger:
    min_labels: int  # M
    interval_s: float  # T
    interval_min_labels: int


def should_train(fresh: int, since_last_s: float, trigger: Trigger) -> str | None:
    """Why to train now ("count" or "interval"), or None."""
    if fresh >= trigger.min_labels:
        return "count"
    if since_last_s >= trigger.interval_s and fresh >= trigger.interval_min_labels:
        return "interval"
    return None


@dataclass(frozen=True)
class TrainingSet:
    fresh: list[Example]  # trained on
    replay: list[Example]  # older labels mixed in against forgetting
    holdout: list[Example]  # the newest fresh labels, never trained on in this run
    watermark: Watermark  # after this run: every fresh and held-out label counts as used
    excluded: int = 0  # labels dropped because their input is in the reference set

    @property
    def train(self) -> list[Example]:
        return self.fresh + self.replay


def select(
    examples: Iterable[Example],
    watermark: Watermark,
    holdout_fraction: float,
    replay_ratio: float,
    seed: int,
    exclude_inputs: frozenset[str | tuple[float, ...]] = frozenset(),
    holdout_max: int | None = None,
) -> TrainingSet:
    """Split joined labels into fresh / replay / holdout.

    Fresh labels are ordered by label time (then partition, offset); the newest
    ``holdout_fraction`` of them (at least one, at most ``holdout_max``) is the holdout. Replay
    is a seeded sample of older labels, ``replay_ratio`` per fresh label. Inputs in
    ``exclude_inputs`` (the reference set) are never trained on.
    """
    every = list(examples)
    all_ex = [e for e in every if input_key(e.x) not in exclude_inputs]
    fresh = sorted((e for e in all_ex if is_fresh(e, watermark)), key=lambda e: (e.ts, e.partition, e.offset))
    old = sorted((e for e in all_ex if not is_fresh(e, watermark)), key=lambda e: e.key)
    n_hold = min(len(fresh), max(1, math.ceil(len(fresh) * holdout_fraction))) if fresh else 0
    if holdout_max is not None:
        n_hold = min(n_hold, holdout_max)
    train_fresh, holdout = fresh[: len(fresh) - n_hold], fresh[len(fresh) - n_hold :]
    n_replay = min(len(old), round(len(train_fresh) * replay_ratio))
    replay = random.Random(seed).sample(old, n_replay) if n_replay else []
    used = advance(watermark, (e for e in every if is_fresh(e, watermark)))
    return TrainingSet(train_fresh, replay, holdout, used, excluded=len(every) - len(all_ex))


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def gate(
    task: str,
    holdout_live: Mapping[str, float],
    holdout_candidate: Mapping[str, float],
    reference_live: Mapping[str, float],
    reference_candidate: Mapping[str, float],
    margin: float,
    tolerance: float,
    holdout_rows: int,
    reference_rows: int,
) -> GateVerdict:
    """Release only if the candidate beats live on the fresh holdout by ``margin`` and is not
    worse than live by more than ``tolerance`` on the fixed reference set."""
    metric = GATE_METRIC[task]
    hl, hc = holdout_live.get(metric), holdout_candidate.get(metric)
    rl, rc = reference_live.get(metric), reference_candidate.get(metric)
    details: dict[str, Any] = {
        "metric": metric,
        "margin": margin,
        "reference_tolerance": tolerance,
        "holdout": {"rows": holdout_rows, "live": dict(holdout_live), "candidate": dict(holdout_candidate)},
        "reference": {
            "rows": reference_rows,
            "live": dict(reference_live),
            "candidate": dict(reference_candidate),
        },
    }
    if not (_finite(hl) and _finite(hc)):
        return GateVerdict(False, f"{metric} undefined on the holdout ({holdout_rows} rows)", details)
    if not (_finite(rl) and _finite(rc)):
        return GateVerdict(False, f"{metric} undefined on the reference set", details)
    assert hl is not None and hc is not None and rl is not None and rc is not None
    details["holdout_gain"] = hc - hl
    details["reference_change"] = rc - rl
    if hc - hl < margin:
        return GateVerdict(
            False,
            f"holdout {metric} {hc:.4f} vs live {hl:.4f}: gain {hc - hl:+.4f} < margin {margin}",
            details,
        )
    if rc < rl - tolerance:
        return GateVerdict(
            False, f"reference {metric} {rc:.4f} vs live {rl:.4f}: worse by more than {tolerance}", details
        )
    return GateVerdict(True, f"holdout {metric} {hc:.4f} vs live {hl:.4f} ({hc - hl:+.4f})", details)


def known_labels(task: str, names: list[str]) -> frozenset[str]:
    """Class names a task's label may take: the task's fixed classes, else the model's ``names``
    (query classes come from the model)."""
    fixed = TASKS[task].labels
    return frozenset(names) if fixed is None else frozenset(fixed)

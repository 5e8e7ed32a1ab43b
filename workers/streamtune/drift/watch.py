"""Drift detectors per task and served version, over the signals a scorer sees without labels
and the one labels give.

Each signal is a stream of numbers in [0, 1] fed to its own ADWIN detector (river's
``drift.ADWIN``: an adaptive window that drops its older part when the means of the two parts
differ beyond a Hoeffding bound at confidence ``delta``; no window length to tune, and it works
on rates and on bounded real values alike). Page-Hinkley, the other detector the issue names,
needs a threshold per signal scale; ADWIN's one parameter is a confidence.

* **class share** (:attr:`Signal.CLASS_SHARE`): per class, 1 when an event's served label is
  that class, else 0 (binary tasks: one detector, for the positive class). A task with more than
  ``max_classes`` classes (``query_class``: 188) has no class detectors: a share per class would
  be thousands of events per detection, and its confidence speaks for it.
* **confidence** (:attr:`Signal.CONFIDENCE`): the linear stage's top probability where the
  version has one (the cascade's deferral rests on it, and it is what degrades first under
  shift), else the served top probability.
* **error rate** (:attr:`Signal.ERROR_RATE`): 1 when a labelled event's served label was wrong.

Detectors are keyed by version as well: a new version answers differently by design, which is
not drift, so it starts with fresh detectors (and the error rate is "of each served version").
A detection is reported once per change ADWIN finds; river's ADWIN then starts afresh (its
window empties on the next update, and the grace period applies again), so it fires again
only on a further change.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from river import drift

DEFAULT_DELTA = 0.002  # river's default confidence
DEFAULT_GRACE = 100  # observations before a detector may fire (river's grace_period)
DEFAULT_MAX_CLASSES = 10


class Signal(enum.StrEnum):
    CLASS_SHARE = "class_share"
    CONFIDENCE = "confidence"
    ERROR_RATE = "error_rate"


@dataclass(frozen=True, slots=True)
class Detection:
    """One change a detector found: which, and the signal's mean before and after."""

    task: str
    version: int
    signal: Signal
    detail: str  # the class of a class-share detector, "linear" or "served" for confidence, ""
    observations: int  # what this detector had seen when it fired
    before: float  # the window's mean just before the change was found
    after: float  # the mean of what ADWIN kept (the recent part)
    at: float  # wall-clock time of the detection

    def describe(self) -> str:
        what = f"{self.signal.value}{f' {self.detail}' if self.detail else ''}"
        return f"{self.task} v{self.version}: {what} {self.before:.3f} → {self.after:.3f}"


@dataclass
class _Detector:
    adwin: drift.ADWIN
    observations: int = 0
    detections: int = 0
    last: Detection | None = None

    def update(self, x: float) -> tuple[bool, float]:
        before = float(self.adwin.estimation)
        self.adwin.update(x)
        self.observations += 1
        return bool(self.adwin.drift_detected), before


@dataclass
class DriftWatch:
    """All detectors of a process; feed it what each batch served."""

    delta: float = DEFAULT_DELTA
    grace: int = DEFAULT_GRACE
    max_classes: int = DEFAULT_MAX_CLASSES
    clock: Callable[[], float] = time.time
    _detectors: dict[tuple[str, int, Signal, str], _Detector] = field(default_factory=dict)

    def _detector(self, key: tuple[str, int, Signal, str]) -> _Detector:
        d = self._detectors.get(key)
        if d is None:
            d = self._detectors[key] = _Detector(drift.ADWIN(delta=self.delta, grace_period=self.grace))
        return d

    def _feed(self, task: str, version: int, signal: Signal, detail: str, xs: np.ndarray) -> list[Detection]:
        d = self._detector((task, version, signal, detail))
        found = []
        for x in xs.tolist():
            fired, before = d.update(float(x))
            if fired:
                det = Detection(task, version, signal, detail, d.observations, before,
                                float(d.adwin.estimation), self.clock())  # fmt: skip
                d.detections += 1
                d.last = det
                found.append(det)
        return found

    def observe(
        self,
        task: str,
        versions: np.ndarray,
        labels: Sequence[str],
        probs: np.ndarray,
        linear_confidence: np.ndarray | None = None,
    ) -> list[Detection]:
        """One scored batch: per row its version, the task's ``labels`` and the served ``probs``
        (``[rows, classes]``; a binary task: ``[rows, 1]``, the positive probability), and the
        linear stage's top probability where it ran (NaN for rows of a version without one)."""
        probs = np.asarray(probs, dtype=np.float64)
        versions = np.asarray(versions)
        found: list[Detection] = []
        binary = probs.ndim == 2 and probs.shape[1] == 1
        for version in np.unique(versions).tolist():
            rows = versions == version
            p = probs[rows]
            if binary:
                positive = (p[:, 0] >= 0.5).astype(np.float64)
                top = np.maximum(p[:, 0], 1.0 - p[:, 0])
                found += self._feed(task, version, Signal.CLASS_SHARE, labels[-1], positive)
            else:
                served = p.argmax(axis=1)
                top = p.max(axis=1)
                if len(labels) <= self.max_classes:
                    for c, name in enumerate(labels):
                        found += self._feed(task, version, Signal.CLASS_SHARE, name, (served == c) * 1.0)
            lin = None if linear_confidence is None else np.asarray(linear_confidence, dtype=np.float64)[rows]
            if lin is not None and np.isfinite(lin).all():
                found += self._feed(task, version, Signal.CONFIDENCE, "linear", lin)
            else:
                found += self._feed(task, version, Signal.CONFIDENCE, "served", top)
        return found

    def observe_errors(self, task: str, version: int, wrong: Sequence[bool]) -> list[Detection]:
        """Labelled events a version served: whether each served label was wrong."""
        return self._feed(task, version, Signal.ERROR_RATE, "", np.asarray(wrong, dtype=np.float64))

    def detections(self, task: str) -> int:
        return sum(d.detections for (t, *_), d in self._detectors.items() if t == task)

    def last(self, task: str) -> Detection | None:
        """The task's latest detection, any version or signal."""
        found = [d.last for (t, *_), d in self._detectors.items() if t == task and d.last is not None]
        return max(found, key=lambda det: det.at) if found else None

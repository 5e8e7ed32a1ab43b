"""Pure decisions of the online trainer: label normalisation, joins, when to train, what to train
on, and the release gate. No I/O here; :mod:`streamtune.trainer` supplies the state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamtune.core import tasks
from streamtune.core.events import LabelEvent
from streamtune.core.tasks import TASKS
from streamtune.datasets.reference import input_key
from streamtune.training.metrics import resample_weights, resampled_metric, swapped_metric

# The metric each task's gate compares (higher is better for all of them).
GATE_METRIC: dict[str, str] = {name: spec.gate_metric for name, spec in TASKS.items()}
CLICK_LABELS: list[str] = list(tasks.CLICK_LABELS)


def label_name(label: LabelEvent) -> str:
    """The label as the class name the task's model predicts."""
    return TASKS[label.task].label_of(label.label)


def label_key(label: LabelEvent) -> str:
    """Join key: the labelled event (text tasks) or session (purchase intent), per task."""
    return f"{label.task}:{label.target}"


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
    drift_min_labels: int = 0  # a detected drift starts a run with this many fresh labels (0: never)


def should_train(fresh: int, since_last_s: float, trigger: Trigger, drifted: bool = False) -> str | None:
    """Why to train now ("count", "interval" or "drift"), or None. ``drifted``: a drift was
    detected since the task's last run (the error rate of a served version rose), which starts
    a run early, on fewer labels than the count trigger needs."""
    if fresh >= trigger.min_labels:
        return "count"
    if drifted and trigger.drift_min_labels and fresh >= trigger.drift_min_labels:
        return "drift"
    if since_last_s >= trigger.interval_s and fresh >= trigger.interval_min_labels:
        return "interval"
    return None


def fast_due(
    fresh: int, since_last_s: float, interval_s: float, min_labels: int, drifted: bool
) -> str | None:
    """Why the fast path updates a task now ("interval" or "drift"), or None: every
    ``interval_s`` (0: never), at once after a drift, and only on ``min_labels`` fresh labels."""
    if interval_s <= 0 or fresh < min_labels:
        return None
    if drifted:
        return "drift"
    return "interval" if since_last_s >= interval_s else None


@dataclass
class RunProgress:
    """How far a training run got, reported by the run itself. It runs in the training thread
    and the trainer reads this only after the run has returned; a run that stopped at its time
    budget sets ``watermark`` to :func:`trained_watermark`, so the labels it never reached stay
    fresh. None: the run did not say (every selected label counts as used)."""

    watermark: Watermark | None = None


@dataclass(frozen=True)
class TrainingSet:
    fresh: list[Example]  # trained on
    replay: list[Example]  # older labels mixed in against forgetting
    holdout: list[Example]  # the fresh labels that arrived last (by seq), never trained on in this run
    watermark: Watermark  # every label selected (fresh, held out, excluded): the most a run can use
    excluded: int = 0  # labels dropped because their input is in the reference set
    progress: RunProgress = field(default_factory=RunProgress, compare=False)

    @property
    def train(self) -> list[Example]:
        return self.fresh + self.replay

    def reached(self) -> Watermark:
        """The watermark after the run: what it reported (:attr:`progress`), else the whole set."""
        done = self.progress.watermark
        return self.watermark if done is None else min(self.watermark, done)


def trained_watermark(watermark: Watermark, fresh_in_order: Sequence[Example], consumed: int) -> Watermark:
    """The watermark after a run that trained on the first ``consumed`` of ``fresh_in_order`` (its
    fresh training labels, in the order it trained on them) and on none of the rest.

    ``watermark`` is the set's (:attr:`TrainingSet.watermark`: every label selected). A watermark
    is one join sequence number (every label at or below it counts as used), so it can only
    advance to just below the lowest label the run did not reach: a label it trained on above
    that stays fresh too and is trained on again (twice rather than never), and the held-out
    and unusable labels below it count as used, as they do after a complete run."""
    left = fresh_in_order[max(0, consumed) :]
    if not left:
        return watermark
    return min(watermark, min(e.seq for e in left) - 1)


def arrival_order(e: Example) -> tuple[int, int, int]:
    """When the trainer got a label: its join sequence number (then partition, offset), never the
    label's own timestamp, which is whatever its producer wrote."""
    return (e.seq, e.partition, e.offset)


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

    Fresh labels are ordered by arrival, the join sequence number ``seq`` (then partition,
    offset); the last ``holdout_fraction`` of them to arrive (at least one, at most
    ``holdout_max``) is the holdout. Not by the label's own timestamp: that is the producer's
    claim, and labels dated in the future would then always own the holdout (and could be
    crafted to). Replay is a seeded sample of older labels, ``replay_ratio`` per fresh label.
    Inputs in ``exclude_inputs`` (the reference set) are never trained on.
    """
    every = list(examples)
    all_ex = [e for e in every if input_key(e.x) not in exclude_inputs]
    fresh = sorted((e for e in all_ex if is_fresh(e, watermark)), key=arrival_order)
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


# A gain of exactly the margin is not refused for float noise (57/100 - 55/100 < 0.02).
_GAIN_EPS = 1e-9

BOOTSTRAP_RESAMPLES = 1000  # resamples of the holdout rows in the gate's significance test
BOOTSTRAP_SEED = 0  # fixed: the same holdout and predictions always get the same verdict
_BOOTSTRAP_CELLS = 2_000_000  # resamples × rows drawn at once (bounds the memory of one step)


@dataclass(frozen=True, eq=False)
class PairedHoldout:
    """Live's and the candidate's predictions on the same holdout rows, row by row: what the
    gate's significance test resamples (jointly: both models are always scored on the same
    resampled rows, so what they get right or wrong together cancels out)."""

    y: Sequence[int]  # the true class of each row, as an index into the models' labels
    live: np.ndarray  # rows × classes: live's probabilities
    candidate: np.ndarray  # rows × classes: the candidate's probabilities


@dataclass(frozen=True)
class Significance:
    """How sure the holdout is of the gate metric's gain (candidate − live), two ways."""

    gain: float  # on all holdout rows
    lower: float  # one-sided (1 − alpha) paired-bootstrap lower bound of the gain; NaN: undefined
    p_value: float  # paired randomisation test of "no gain"; NaN: undefined
    alpha: float
    resamples: int  # bootstrap resamples, and as many random swaps
    defined: int  # bootstrap resamples on which the metric was defined for both models
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {
            "method": "paired bootstrap (percentile, one-sided) and paired randomisation test",
            "gain": self.gain,
            "lower": self.lower,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "resamples": self.resamples,
            "defined": self.defined,
            "seed": self.seed,
        }


def paired_significance(
    task: str,
    paired: PairedHoldout,
    alpha: float,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Significance:
    """How sure the holdout is that the candidate beats live on ``task``'s gate metric.

    - Bound: ``resamples`` bootstrap resamples of the holdout's row indices (with replacement,
      the same indices for both models); the metric of each model is recomputed on each, and
      the ``alpha`` quantile of the differences is the lower bound of a one-sided ``1 − alpha``
      percentile interval of the gain. It says how large the gain surely is (the gate wants it
      above its margin).
    - p-value: a paired randomisation test of "the models are interchangeable": on each of
      ``resamples`` draws every row's two predictions are swapped with probability 1/2 and the
      difference recomputed; p = (1 + draws at least as large as the observed gain) / (1 +
      draws). Exact under that null for any metric, however few rows differ.

    Why these and not McNemar's exact test: two of the three gate metrics (macro-F1, ROC-AUC)
    are not means over rows, so there is no per-row discordance to count; both procedures
    recompute any metric, so one rule and one ``alpha`` serve every task. For top-1 (a mean of
    per-row hits) the randomisation test *is* McNemar's sign test, by simulation. Both are
    needed: the percentile bootstrap is optimistic when only a few rows differ (3 of 50 rows
    fixed, none broken: bound +0.02, yet a 1-in-8 chance), which the randomisation test is not;
    the randomisation test says nothing of the gain's size, which the bound does.

    Bootstrap resamples on which the metric is undefined (e.g. ROC-AUC with no positive row) are
    left out; the bound is NaN (undefined) when fewer than half are left. Vectorised: 500 rows
    take milliseconds (:func:`~streamtune.training.metrics.resampled_metric`,
    :func:`~streamtune.training.metrics.swapped_metric`).
    """
    spec = TASKS[task]
    metric, family = spec.gate_metric, spec.metric_family
    y = list(paired.y)
    n = len(y)
    if n == 0:
        return Significance(math.nan, math.nan, math.nan, alpha, resamples, 0, seed)

    def diff(weights: np.ndarray) -> np.ndarray:
        cand = resampled_metric(family, metric, y, paired.candidate, weights)
        out: np.ndarray = cand - resampled_metric(family, metric, y, paired.live, weights)
        return out

    def swapped_diff(swaps: np.ndarray) -> np.ndarray:
        cand = swapped_metric(family, metric, y, paired.candidate, paired.live, swaps)
        out: np.ndarray = cand - swapped_metric(family, metric, y, paired.live, paired.candidate, swaps)
        return out

    gain = float(diff(np.ones((1, n)))[0])
    rng = np.random.default_rng(seed)
    step = max(1, _BOOTSTRAP_CELLS // n)
    steps = [min(step, resamples - i) for i in range(0, resamples, step)]
    d = np.concatenate([diff(resample_weights(n, k, rng)) for k in steps])
    d = d[np.isfinite(d)]
    lower = float(np.quantile(d, alpha)) if len(d) * 2 >= resamples and len(d) else math.nan
    null = np.concatenate([swapped_diff(rng.random((k, n)) < 0.5) for k in steps])
    p_value = (1 + int((null >= gain - 1e-12).sum())) / (1 + len(null)) if math.isfinite(gain) else math.nan
    return Significance(gain, lower, p_value, alpha, resamples, len(d), seed)


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
    *,
    paired: PairedHoldout | None = None,
    alpha: float = 0.05,
    reference_first: Mapping[str, float] | None = None,
    first_version: int | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> GateVerdict:
    """Release only if the candidate beats live on the fresh holdout with confidence, and has
    not forgotten the fixed reference set.

    - Holdout, with a margin ≥ 0 (a gain is asked for): the gain (candidate − live) must be
      significant, its one-sided ``1 − alpha`` lower bound (paired bootstrap over the same rows)
      above 0 and the paired randomisation test of "no gain" at p ≤ ``alpha``
      (:func:`paired_significance`), and at least ``margin`` (a gain too small to matter is not
      a release). A raw gain of ``margin`` on a few hundred rows is within noise; these tests
      are not. The margin applies to the gain, not to its bound: asking the bound to clear it
      refused most candidates that were 2-3 points better on the 100-400 rows a holdout has
      (``devtools/gate_power_experiment.py``, docs/two-speeds.md), while a candidate no better
      than live still passes at most about ``alpha`` of the time. A negative margin asks only
      that the candidate be surely not worse by more than it (non-inferiority: the bound alone
      answers that). Without
      ``paired`` (the per-row predictions) the gain's significance cannot be judged, so the
      candidate is refused.
    - Reference: not worse than live by more than ``tolerance``, and not worse than the first
      released version (``reference_first``, version ``first_version``) by more than
      ``tolerance`` either. Against live alone each release could lose up to ``tolerance`` and
      the losses would add up release after release (a ratchet); the first version is a fixed
      floor. ``reference_first`` None: that check is skipped (callers that have no first
      version's score).
    """
    comparison = Comparison(
        task, holdout_live, holdout_candidate, reference_live, reference_candidate,
        margin, tolerance, holdout_rows, reference_rows,
    )  # fmt: skip
    refused = refuse_undefined(comparison)
    if refused is not None:  # an undefined gate metric: refused, saying why
        return refused
    metric = GATE_METRIC[task]
    hl, hc = holdout_live.get(metric), holdout_candidate.get(metric)
    rl, rc = reference_live.get(metric), reference_candidate.get(metric)
    details = comparison.details()
    details["alpha"] = alpha
    rf = None if reference_first is None else reference_first.get(metric)
    if reference_first is not None:
        details["reference"]["first"] = dict(reference_first)
        details["reference"]["first_version"] = first_version
    if not (_finite(hl) and _finite(hc)):
        return GateVerdict(False, f"{metric} undefined on the holdout ({holdout_rows} rows)", details)
    if not (_finite(rl) and _finite(rc)):
        return GateVerdict(False, f"{metric} undefined on the reference set", details)
    assert hl is not None and hc is not None and rl is not None and rc is not None
    details["holdout_gain"] = hc - hl
    details["reference_change"] = rc - rl
    if reference_first is not None and not _finite(rf):
        return GateVerdict(False, f"{metric} undefined on the reference set for v{first_version}", details)
    if paired is None:
        return GateVerdict(
            False, f"no per-row holdout predictions: {metric} gain's significance cannot be tested", details
        )
    sig = paired_significance(task, paired, alpha, resamples, seed)
    details["holdout_test"] = sig.to_json()
    confidence = f"{1 - alpha:.0%}"
    if not _finite(sig.lower):
        return GateVerdict(
            False, f"{metric} undefined on {resamples - sig.defined}/{resamples} holdout resamples", details
        )
    # superiority (margin >= 0): surely above 0; non-inferiority: surely not worse than the margin
    bound, above = (margin, f"the margin {margin} (") if margin < 0 else (0.0, f"0 (margin {margin}; ")
    if not sig.lower > bound:
        return GateVerdict(
            False,
            f"holdout {metric} {hc:.4f} vs live {hl:.4f}: gain {hc - hl:+.4f}, its {confidence} lower bound "
            f"{sig.lower:+.4f} is not above {above}{holdout_rows} rows)",
            details,
        )
    if margin >= 0 and not sig.p_value <= alpha:  # superiority asked for: not chance either
        return GateVerdict(
            False,
            f"holdout {metric} {hc:.4f} vs live {hl:.4f}: gain {hc - hl:+.4f} ({confidence} lower bound "
            f"{sig.lower:+.4f}) could be chance (randomisation test p = {sig.p_value:.3f} > alpha {alpha}; "
            f"{holdout_rows} rows)",
            details,
        )
    if margin >= 0 and not hc - hl >= margin - _GAIN_EPS:  # surely better, by less than matters
        return GateVerdict(
            False,
            f"holdout {metric} {hc:.4f} vs live {hl:.4f}: gain {hc - hl:+.4f} ({confidence} lower bound "
            f"{sig.lower:+.4f}) is below the margin {margin} ({holdout_rows} rows)",
            details,
        )
    if rc < rl - tolerance:
        return GateVerdict(
            False, f"reference {metric} {rc:.4f} vs live {rl:.4f}: worse by more than {tolerance}", details
        )
    if rf is not None and rc < rf - tolerance:
        return GateVerdict(
            False,
            f"reference {metric} {rc:.4f} vs first version v{first_version} {rf:.4f}: worse by more than "
            f"{tolerance}",
            details,
        )
    return GateVerdict(
        True,
        f"holdout {metric} {hc:.4f} vs live {hl:.4f} ({hc - hl:+.4f}; {confidence} bound {sig.lower:+.4f}, "
        f"p = {sig.p_value:.3f})",
        details,
    )


def known_labels(task: str, names: list[str]) -> frozenset[str]:
    """Class names a task's label may take: the task's fixed classes, else the model's ``names``
    (query classes come from the model)."""
    fixed = TASKS[task].labels
    return frozenset(names) if fixed is None else frozenset(fixed)


# ---------------------------------------------------------------------------------------------
# Undefined metrics


class Metrics(dict[str, float]):
    """A model's metrics on some rows, by name: NaN where a metric is undefined on them, and
    ``undefined`` says why, by name (e.g. ROC-AUC on a holdout of one class). A dict of the
    values, so it goes wherever metric values go (and ``dict(m)`` is just the values); the
    reasons travel with the values to the gate."""

    def __init__(
        self, scores: Mapping[str, float] | None = None, undefined: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(scores or {})
        self.undefined: dict[str, str] = dict(undefined or {})


def undefined_of(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Why each undefined metric (NaN, None) of ``metrics`` is undefined: as evaluation recorded
    it (:class:`Metrics`), else just "undefined" (plain mappings, e.g. read back from a manifest)."""
    why = dict(metrics.undefined) if isinstance(metrics, Metrics) else {}
    out: dict[str, str] = {}
    for name, v in metrics.items():
        if name in why or v is None or not math.isfinite(v):
            out[name] = why.get(name, "undefined")
    return out


@dataclass(frozen=True, slots=True)
class Comparison:
    """What the gate compares: each model's metrics on the holdout and on the reference set,
    with the margin and tolerance it applies."""

    task: str
    holdout_live: Mapping[str, float]
    holdout_candidate: Mapping[str, float]
    reference_live: Mapping[str, float]
    reference_candidate: Mapping[str, float]
    margin: float
    tolerance: float
    holdout_rows: int
    reference_rows: int

    def details(self) -> dict[str, Any]:
        """The part of a verdict's details every verdict has (JSON-safe, for the manifest)."""
        return {
            "metric": GATE_METRIC[self.task],
            "margin": self.margin,
            "reference_tolerance": self.tolerance,
            "holdout": {
                "rows": self.holdout_rows,
                "live": dict(self.holdout_live),
                "candidate": dict(self.holdout_candidate),
            },
            "reference": {
                "rows": self.reference_rows,
                "live": dict(self.reference_live),
                "candidate": dict(self.reference_candidate),
            },
        }


def refuse_undefined(c: Comparison) -> GateVerdict | None:
    """The gate's first check: the verdict refusing a comparison whose gate metric is undefined
    (NaN or missing) for either model on the holdout or the reference set, saying where and why;
    None when it is defined everywhere. Undefined is not "worse": no decision can be made on it,
    and NaN would otherwise slip through comparisons (every comparison with NaN is false)."""
    metric = GATE_METRIC[c.task]
    sets = {
        "holdout": (f"the holdout ({c.holdout_rows} rows)", c.holdout_live, c.holdout_candidate),
        "reference": (
            f"the reference set ({c.reference_rows} rows)",
            c.reference_live,
            c.reference_candidate,
        ),
    }
    undefined: dict[str, dict[str, str]] = {}
    reason = ""
    for where, (name, live, cand) in sets.items():
        whys: dict[str, str] = {}
        for model, m in (("candidate", cand), ("live", live)):
            if metric not in m:
                whys[model] = "not computed"
            elif metric in (u := undefined_of(m)):
                whys[model] = u[metric]
        if not whys:
            continue
        undefined[where] = whys
        if not reason:
            said = set(whys.values())
            why = next(iter(said)) if len(said) == 1 else "; ".join(f"{k}: {v}" for k, v in whys.items())
            reason = f"{metric} undefined on {name}: {why}"
    if not undefined:
        return None
    return GateVerdict(False, reason, {**c.details(), "undefined": undefined})

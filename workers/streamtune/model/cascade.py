"""The cascade decision: which model answers an event, and what probabilities it serves.

Pure numpy (no torch, no I/O). The linear stage (``streamtune.model.linear``) scores every
event first; its probabilities and coverage, and the version's :class:`CascadeRule`, decide the
event's :class:`ScorePath`:

* ``TRANSFORMER``: out of domain (coverage below ``min_coverage``): the transformer alone. A
  bag-of-words model is confidently wrong on text unlike its training data, so such an event is
  not blended either;
* ``LINEAR``: in domain and confident (top linear probability above ``threshold``): the linear
  stage alone, the transformer does not run;
* ``BLEND``: in domain, not confident: ``weight * linear + (1 - weight) * transformer``.

A blend weight of 1 means the transformer adds nothing (every in-domain event is ``LINEAR``), a
weight of 0 that the linear stage adds nothing (``TRANSFORMER``): the path always says which
models an event needs. The path of an event depends only on its own linear probabilities and
coverage and on the rule, never on the other events of its batch.

:func:`choose_rule` picks the threshold and the weight on validation rows (carved from the
training split, never the held-out split): the cascade's metric there is at least the better
single model's, and as many rows as possible are answered by the linear stage alone.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from streamtune.core.scored import ANSWER_PATHS

MetricFn = Callable[[np.ndarray, np.ndarray], float]  # (labels, probabilities) -> higher is better
DEFAULT_WEIGHTS = tuple(i / 10 for i in range(11))
DEFAULT_COVERAGE_QUANTILE = 0.05
_EPS = 1e-12  # metric comparisons: equal up to float noise counts as "at least"


class ScorePath(enum.IntEnum):
    """Which model answered an event (``route`` returns these as int8 codes)."""

    LINEAR = 0
    BLEND = 1
    TRANSFORMER = 2

    @property
    def label(self) -> str:
        """The name results carry: ``linear``, ``blend``, ``transformer``."""
        return ANSWER_PATHS[self]


@dataclass(frozen=True, slots=True)
class CascadeRule:
    """A version's cascade: JSON-safe (:meth:`as_dict`) for its manifest."""

    threshold: float  # the linear stage answers alone when its top probability is above (1: never)
    weight: float  # the linear stage's share of a blend
    min_coverage: float = 0.0  # below: out of domain, the transformer answers alone (0: never)

    def __post_init__(self) -> None:
        for name in ("threshold", "weight", "min_coverage"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"CascadeRule.{name} must be a number in [0, 1], not {value!r}")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CascadeRule:
        return cls(float(d["threshold"]), float(d["weight"]), float(d.get("min_coverage", 0.0)))


TRANSFORMER_ONLY = CascadeRule(threshold=1.0, weight=0.0, min_coverage=0.0)
LINEAR_ONLY = CascadeRule(threshold=0.0, weight=1.0, min_coverage=0.0)


def _probs(a: Any, name: str) -> np.ndarray:
    p = np.asarray(a, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"{name} must be (events, classes), not shape {p.shape}")
    return p


def route(linear_probs: Any, coverage: Any, rule: CascadeRule) -> np.ndarray:
    """The :class:`ScorePath` code (int8) of each event. NaN coverage or probabilities route safely:
    to the transformer alone, or to the blend."""
    p = _probs(linear_probs, "linear_probs")
    cov = np.asarray(coverage, dtype=np.float64)
    if cov.shape != (p.shape[0],):
        raise ValueError(f"coverage has shape {cov.shape}, expected ({p.shape[0]},)")
    in_domain = cov >= rule.min_coverage
    confident = p.max(axis=1) > rule.threshold
    out = np.full(p.shape[0], ScorePath.TRANSFORMER, dtype=np.int8)
    if rule.weight >= 1.0:
        out[in_domain] = ScorePath.LINEAR
    else:
        out[in_domain & confident] = ScorePath.LINEAR
        if rule.weight > 0.0:
            out[in_domain & ~confident] = ScorePath.BLEND
    return out


def needs_transformer(paths: Any) -> np.ndarray:
    """Which events the transformer must score (only these enter its batches)."""
    return np.asarray(paths) != ScorePath.LINEAR


def combine(paths: Any, linear_probs: Any, transformer_probs: Any, rule: CascadeRule) -> np.ndarray:
    """The served probabilities of each event, by its path. ``transformer_probs`` is read only
    on the rows that need the transformer (any value, NaN too, elsewhere)."""
    codes = np.asarray(paths)
    lin = _probs(linear_probs, "linear_probs")
    tr = np.asarray(transformer_probs, dtype=np.float64)
    if tr.shape != lin.shape or codes.shape != (lin.shape[0],):
        raise ValueError(f"paths {codes.shape}, linear {lin.shape}, transformer {tr.shape} do not match")
    if not np.isin(codes, [int(p) for p in ScorePath]).all():
        raise ValueError("paths must be ScorePath codes")
    out = lin.copy()
    blend = codes == ScorePath.BLEND
    out[blend] = rule.weight * lin[blend] + (1.0 - rule.weight) * tr[blend]
    alone = codes == ScorePath.TRANSFORMER
    out[alone] = tr[alone]
    return out


class FirstStage(Protocol):
    """What :func:`answer` needs of a linear stage (:class:`~streamtune.model.linear.LinearStage`)."""

    def analyse(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, Any]: ...

    def reasons_of(self, text: str, x: Any, c: int, k: int = 5) -> list[tuple[str, float]]: ...


@dataclass(frozen=True, slots=True)
class Answer:
    probs: np.ndarray  # served, float32 [rows, classes]
    paths: np.ndarray  # ScorePath codes, int8 [rows]
    reasons: list[list[tuple[str, float]] | None] | None  # per row, towards its served label
    confidence: np.ndarray | None = None  # the linear stage's top probability, per row


@dataclass(frozen=True, slots=True)
class Routed:
    """The linear pass over a batch (:func:`first_pass`): what the rows answered by the linear
    stage alone are served (``early``) and what :func:`complete` needs for the others."""

    linear_probs: np.ndarray  # [rows, classes]
    paths: np.ndarray  # ScorePath codes, int8 [rows]
    features: Any  # the stage's features of every row (reasons, no second pass)
    early: np.ndarray  # the rows answered by the linear stage alone (indices)
    later: np.ndarray  # the rows the transformer must score (indices)


def first_pass(stage: FirstStage, rule: CascadeRule, texts: Sequence[str]) -> Routed:
    """The linear stage scores every text and the rule routes each one; nothing else runs."""
    linear_probs, coverage, features = stage.analyse(texts)
    paths = route(linear_probs, coverage, rule)
    need = needs_transformer(paths)
    return Routed(linear_probs, paths, features, np.flatnonzero(~need), np.flatnonzero(need))


def served(
    stage: FirstStage,
    rule: CascadeRule,
    routed: Routed,
    texts: Sequence[str],
    rows: np.ndarray,
    transformer_probs: np.ndarray | None = None,
    reasons: int = 0,
) -> Answer:
    """What ``rows`` of a routed batch are served: ``transformer_probs`` (one row per entry of
    ``rows``) is needed only when some of them need the transformer (``routed.later``)."""
    rows = np.asarray(rows, dtype=np.int64)
    lin = routed.linear_probs[rows]
    paths = routed.paths[rows]
    tr = np.zeros_like(lin) if transformer_probs is None else np.asarray(transformer_probs)
    if transformer_probs is None and needs_transformer(paths).any():
        raise ValueError("rows that need the transformer were given no transformer probabilities")
    probs = combine(paths, lin, tr, rule).astype(np.float32)
    why: list[list[tuple[str, float]] | None] | None = None
    if reasons > 0:
        label = probs.argmax(axis=1)
        why = [
            stage.reasons_of(texts[int(i)], routed.features[int(i)], int(label[j]), reasons)
            for j, i in enumerate(rows)
        ]
    return Answer(probs, paths, why, lin.max(axis=1).astype(np.float32))


def answer(
    stage: FirstStage,
    rule: CascadeRule,
    texts: Sequence[str],
    transformer: Callable[[list[str]], np.ndarray],
    reasons: int = 0,
) -> Answer:
    """Serve ``texts`` through the cascade: the linear stage scores every text, ``transformer``
    is called once, with only the texts whose path needs it (none: not called), and each row
    gets the probabilities of its path. With ``reasons`` > 0, each row also gets that many terms
    explaining its served label, from the features the stage computed (no second pass).

    The same as :func:`first_pass` then :func:`served` on every row; a scorer that publishes the
    linear stage's answers before the transformer runs calls those two itself."""
    routed = first_pass(stage, rule, texts)
    rows = np.arange(len(texts))
    transformer_probs = np.zeros_like(routed.linear_probs)
    if len(routed.later):
        transformer_probs[routed.later] = transformer([texts[int(i)] for i in routed.later])
    return served(stage, rule, routed, texts, rows, transformer_probs, reasons)


def shares(paths: Any) -> dict[str, float]:
    """The share of events per path, by :attr:`ScorePath.label`."""
    codes = np.asarray(paths)
    n = max(len(codes), 1)
    return {p.label: float(np.count_nonzero(codes == p)) / n for p in ScorePath}


def _default_thresholds(linear_probs: np.ndarray) -> list[float]:
    """Thresholds that step the confident share by 2.5 %: quantiles of the top probability,
    plus 0 (every in-domain row) and 1 (none)."""
    top = linear_probs.max(axis=1)
    qs = np.quantile(top, np.linspace(0.0, 1.0, 41)) if len(top) else np.array([])
    return sorted({0.0, 1.0, *(float(min(max(q, 0.0), 1.0)) for q in qs)})


def choose_rule(
    linear_val: Any,
    transformer_val: Any,
    coverage_val: Any,
    y_val: Sequence[int] | np.ndarray,
    metric_fn: MetricFn,
    thresholds: Sequence[float] | None = None,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    coverage_quantile: float = DEFAULT_COVERAGE_QUANTILE,
    tolerance: float = 0.0,
) -> tuple[CascadeRule, dict[str, Any]]:
    """Pick a version's rule on its **validation** rows (pass nothing else: never held-out rows).

    ``min_coverage`` is the ``coverage_quantile`` of the validation coverage (in-domain rows
    below it are as rare as that quantile says). Among every (threshold, weight) of the grid
    whose cascade metric is at least the better single model's minus ``tolerance``, the rule
    answering the largest share with the linear stage alone wins (then the higher metric, then
    the higher threshold). When none qualifies, the rule with the best metric is returned and
    the report says ``satisfied: False``. The report (JSON-safe) is for the version's manifest."""
    lin = _probs(linear_val, "linear_val")
    tr = _probs(transformer_val, "transformer_val")
    cov = np.asarray(coverage_val, dtype=np.float64)
    y = np.asarray(y_val)
    n = lin.shape[0]
    if n == 0 or tr.shape != lin.shape or cov.shape != (n,) or y.shape != (n,):
        raise ValueError(f"validation arrays do not match: {lin.shape}, {tr.shape}, {cov.shape}, {y.shape}")
    if not 0.0 <= coverage_quantile < 1.0:
        raise ValueError(f"coverage_quantile must be in [0, 1), not {coverage_quantile}")
    min_coverage = float(np.clip(np.quantile(cov, coverage_quantile), 0.0, 1.0)) if coverage_quantile else 0.0
    metric_linear = float(metric_fn(y, lin))
    metric_transformer = float(metric_fn(y, tr))
    best_single = max(metric_linear, metric_transformer)
    grid_t = sorted(set(thresholds)) if thresholds is not None else _default_thresholds(lin)
    grid_w = sorted(set(weights))
    # (share linear, metric, threshold, rule, paths), every candidate of the grid
    candidates: list[tuple[float, float, float, CascadeRule, np.ndarray]] = []
    for w in grid_w:
        for t in grid_t:
            rule = CascadeRule(threshold=float(t), weight=float(w), min_coverage=min_coverage)
            paths = route(lin, cov, rule)
            metric = float(metric_fn(y, combine(paths, lin, tr, rule)))
            share = float(np.count_nonzero(paths == ScorePath.LINEAR)) / n
            candidates.append((share, metric, float(t), rule, paths))
    feasible = [c for c in candidates if c[1] >= best_single - tolerance - _EPS]
    if feasible:
        share, metric, _, rule, paths = max(feasible, key=lambda c: (c[0], c[1], c[2]))
    else:
        share, metric, _, rule, paths = max(candidates, key=lambda c: (c[1], c[0], c[2]))
    report: dict[str, Any] = {
        "rule": rule.as_dict(),
        "validation_rows": n,
        "metric_linear": metric_linear,
        "metric_transformer": metric_transformer,
        "metric_best_single": best_single,
        "best_single": "linear" if metric_linear >= metric_transformer else "transformer",
        "metric_cascade": metric,
        "satisfied": bool(feasible),
        "tolerance": tolerance,
        "coverage_quantile": coverage_quantile,
        "shares": shares(paths),
        "share_linear": share,
        "candidates": len(candidates),
    }
    return rule, report

"""The linear stage and cascade rule of a text version, fitted beside its transformer.

The version's linear stage is trained on the training rows (never validation or held-out
rows) with :meth:`LinearStage.fit`. :func:`choose` picks the version's
:class:`~streamtune.model.cascade.CascadeRule` on the validation rows, with the version's own
transformer probabilities there. :func:`evaluate`
then scores the fixed held-out rows with each path and the served cascade, for the manifest, so
``streamtune train`` reports every model beside the baselines on the same rows. Nothing here
chooses anything on held-out rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamtune.model.cascade import CascadeRule, choose_rule, combine, route, shares
from streamtune.model.linear import LinearStage

Scores = Callable[[list[int], np.ndarray], dict[str, float]]  # (labels, probabilities) -> metrics


@dataclass(frozen=True, slots=True)
class FittedCascade:
    stage: LinearStage
    rule: CascadeRule
    report: dict[str, Any]  # the manifest's ``cascade``: rule, validation report, held-out metrics


def choose(
    stage: LinearStage,
    val_texts: Sequence[str],
    val_y: Sequence[int],
    transformer_val: np.ndarray,
    scores: Scores,
    metric: str,
) -> FittedCascade:
    """The rule on validation rows only: the cascade's ``metric`` at least the better single
    model's, with the largest share answered by the linear stage alone."""
    linear_val, coverage_val = stage.score(val_texts)
    rule, report = choose_rule(
        linear_val, transformer_val, coverage_val, np.asarray(val_y), lambda y, p: scores(list(y), p)[metric]
    )
    return FittedCascade(stage, rule, {"metric": metric, **report})


def evaluate(
    fitted: FittedCascade,
    texts: Sequence[str],
    y: Sequence[int],
    transformer_probs: np.ndarray,
    scores: Scores,
) -> tuple[dict[str, float], FittedCascade]:
    """Held-out metrics of what the version serves (the cascade), and the cascade with its
    report completed by each path's held-out metrics and shares (reported, never chosen on)."""
    linear_probs, coverage = fitted.stage.score(texts)
    paths = route(linear_probs, coverage, fitted.rule)
    served = combine(paths, linear_probs, transformer_probs, fitted.rule)
    ys = list(y)
    metrics = scores(ys, served)
    held_out = {
        "rows": len(ys),
        "linear": scores(ys, linear_probs),
        "transformer": scores(ys, transformer_probs),
        "cascade": metrics,
        "shares": shares(paths),
    }
    report = {**fitted.report, "held_out": held_out}
    return metrics, FittedCascade(fitted.stage, fitted.rule, report)

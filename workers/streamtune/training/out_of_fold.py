"""A cascade rule chosen on out-of-fold rows, for a task too small for a validation split.

``query_class`` has 375 labelled training rows over 188 classes: its 10 % validation split
would hold about 38 rows, most classes absent, too few to choose a threshold on. A task whose
spec sets ``rule_folds`` (K) instead gives every training row out-of-fold predictions: for each
of K folds (by a hash of the text), a transformer trained by the task's recipe on the other
folds (``bootstrap.fit_transformer``) and a linear stage fitted on them score it. The rule is
chosen on those rows by :func:`~streamtune.model.cascade.choose_rule`, exactly as a version's
rule is chosen on validation rows; the version's own transformer and linear stage are then
trained on all of the rows. Held-out rows are never seen here. Costs K short fine-tunes (about
10 s each for the queries on 2 cores).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from streamtune.core.tasks import TASKS
from streamtune.model.cascade import CascadeRule, choose_rule
from streamtune.model.linear import LinearConfig, LinearStage
from streamtune.training.bootstrap import TrainConfig, fit_transformer, predict_text, seed_everything
from streamtune.training.cascade import Scores


def fold_of(text: str, folds: int) -> int:
    """A row's fold: stable, by its text alone (so duplicates share a fold)."""
    return int.from_bytes(hashlib.sha256(b"fold:" + text.encode()).digest()[:4], "big") % folds


def choose(
    task: str,
    base_path: str,
    names: list[str],
    texts: Sequence[str],
    labels: Sequence[int],
    cfg: TrainConfig,
    linear: LinearConfig,
    score: Scores,
) -> tuple[CascadeRule, dict[str, Any]]:
    """The rule for ``task`` on out-of-fold predictions of ``texts`` (training rows only), and
    its report (the validation report's fields, plus what each model scored out of fold)."""
    spec = TASKS[task]
    folds = spec.rule_folds
    if folds < 2:
        raise ValueError(f"{task}: rule_folds is {folds}; out-of-fold choice needs at least 2")
    x, y = list(texts), list(labels)
    fold = np.array([fold_of(t, folds) for t in x])
    oof_t = np.zeros((len(x), len(names)), dtype=np.float32)
    oof_l = np.zeros_like(oof_t)
    oof_cov = np.zeros(len(x))
    for k in range(folds):
        fit, out = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        if not len(fit) or not len(out):
            raise ValueError(f"{task}: fold {k} of {folds} is empty on {len(x)} rows")
        seed_everything(cfg.seed + k)
        model, head, tok = fit_transformer(
            task, base_path, names, [x[i] for i in fit], [y[i] for i in fit], cfg
        )
        oof_t[out] = predict_text(model, head, tok, [x[i] for i in out], cfg.max_len)
        stage = LinearStage.fit([x[i] for i in fit], [names[y[i]] for i in fit], names, linear, cfg.seed)
        oof_l[out], oof_cov[out] = stage.score([x[i] for i in out])
    metric = spec.gate_metric
    rule, report = choose_rule(oof_l, oof_t, oof_cov, y, lambda yy, p: score(list(yy), p)[metric])
    out_of_fold = {"folds": folds, "rows": len(x), "transformer": score(y, oof_t), "linear": score(y, oof_l)}
    return rule, {"metric": metric, **report, "chosen_on": "out_of_fold", "out_of_fold": out_of_fold}

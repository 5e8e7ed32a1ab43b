"""The cascade under a shift built from shipped data: departments the linear stage never saw.

    PYTHONPATH=workers nice -n 19 python -m streamtune.devtools.shift_experiment \
        [--departments Intimate Jackets] [--transformer-version 1] [--out F]

The linear stage is fitted on the training split minus the validation split *and* minus every
review of ``--departments``; the cascade rule is chosen on the validation rows of the other
departments, with the transformer of ``--transformer-version`` (rows it trained on are left out,
``training/attach.seen_by``). The shifted set is every review of those departments in the
validation or held-out split that the transformer did not train on: out of the linear stage's
domain, in the transformer's. On it, the transformer alone, the linear stage alone, the cascade
with its coverage rule, and the same cascade without it (``min_coverage`` 0: confidence alone)
are scored. Issue 12's target: the cascade within 1 point of the transformer alone there.
Prints one JSON document (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from streamtune.core.settings import Settings
from streamtune.core.tasks import REVIEW, TASKS
from streamtune.datasets import loaders
from streamtune.devtools.linear_experiment import emit
from streamtune.model.cascade import combine, route, shares
from streamtune.model.linear import LinearConfig, LinearStage
from streamtune.rollout.registry import LocalRegistry
from streamtune.training import cascade
from streamtune.training import metrics as M
from streamtune.training.attach import seen_by
from streamtune.training.candidate import _TextModel

TASK = REVIEW.name


def run(settings: Settings, departments: list[str], version: int = 1, seed: int = 13) -> dict[str, Any]:
    spec = TASKS[TASK]
    data_dir = settings.model.data_dir
    registry = LocalRegistry(settings.model.adapter_dir)
    source = registry.manifest(TASK, version)
    seen = seen_by(registry, source, data_dir)
    department = {r.review_id: r.department for r in loaders.load_reviews(data_dir)}
    rows = loaders.splits(TASK, data_dir)
    names = list(spec.labels or ())
    index = {n: i for i, n in enumerate(names)}
    shifted_ids = set(departments)

    def part(
        items: list[tuple[str, Any, str]], shifted: bool, unseen: bool = False
    ) -> tuple[list[str], list[int]]:
        keep = [
            (str(x), index[y])
            for rid, x, y in items
            if (department[rid] in shifted_ids) == shifted and not (unseen and str(x) in seen)
        ]
        return [x for x, _ in keep], [y for _, y in keep]

    xtr, ytr = part(rows.train, shifted=False)
    xva, yva = part(rows.validation, shifted=False, unseen=True)
    sx, sy = part(rows.validation + rows.held_out, shifted=True, unseen=True)

    stage = LinearStage.fit(xtr, [names[y] for y in ytr], names, LinearConfig(), seed)
    model = _TextModel(
        settings.model.base_model, registry.fetch(TASK, version), names, settings.model.max_seq_len
    )
    score = M.METRICS[spec.metric_family]
    chosen = cascade.choose(stage, xva, yva, model.predict_transformer(xva), score, spec.gate_metric)
    transformer = model.predict_transformer(sx)
    linear, coverage = stage.score(sx)
    out: dict[str, Any] = {
        "departments": departments,
        "transformer_version": version,
        "rows": {"linear_train": len(xtr), "validation": len(xva), "shifted": len(sx)},
        "rule": chosen.rule.as_dict(),
        "shifted_coverage_p50": float(np.median(coverage)),
        "share_below_min_coverage": float(np.mean(coverage < chosen.rule.min_coverage)),
        "transformer": score(sy, transformer),
        "linear": score(sy, linear),
    }
    for name, rule in (
        ("cascade", chosen.rule),
        ("cascade_without_coverage", replace(chosen.rule, min_coverage=0.0)),
    ):
        paths = route(linear, coverage, rule)
        out[name] = {**score(sy, combine(paths, linear, transformer, rule)), "shares": shares(paths)}
    metric = spec.gate_metric
    out["cascade_minus_transformer"] = out["cascade"][metric] - out["transformer"][metric]
    out["target_within_1_point"] = out["cascade_minus_transformer"] >= -0.01
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--departments", nargs="+", default=["Intimate", "Jackets"])
    ap.add_argument("--transformer-version", type=int, default=1)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    emit(run(Settings(), args.departments, args.transformer_version, args.seed), args.out)


if __name__ == "__main__":
    main()

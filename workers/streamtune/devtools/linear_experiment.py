"""Choose the linear stage's settings for a text task (issue 12), as recorded in docs/linear-stage.md.

    PYTHONPATH=workers nice -n 19 python -m streamtune.devtools.linear_experiment [--task T] [--out F]

Fits :class:`~streamtune.model.linear.LinearStage` with a few configurations on the training
split minus a validation split carved by a salted row-id hash (``datasets.loaders.splits``),
selects the configuration with the best validation metric, and only then scores the held-out
split with it, beside the TF-IDF + logistic regression baseline of ``training.metrics`` trained
on the same rows. Prints one JSON document (and writes it to ``--out``). Single-threaded: every
number is CPU seconds of this process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamtune.core.settings import Settings
from streamtune.core.tasks import QUERY, REVIEW, TASKS
from streamtune.datasets import loaders
from streamtune.model.linear import LINEAR_FILES, LinearConfig, LinearStage
from streamtune.training import metrics as M

CONFIGS: dict[str, LinearConfig] = {
    "2^20 balanced": LinearConfig(),
    "2^18 balanced": LinearConfig(n_features=2**18),
    "2^20 unbalanced": LinearConfig(balanced=False),
}
SELECT_ON: dict[str, str] = {REVIEW.name: "macro_f1", QUERY.name: "top1"}


def _cpu() -> float:
    return time.process_time()


def run(task: str, data_dir: Path, seed: int = 13, validation_percent: int = 10) -> dict[str, Any]:
    spec = TASKS[task]
    rows = loaders.splits(task, data_dir, validation_percent)
    classes = list(spec.labels) if spec.labels is not None else sorted({y for s in (rows.train,
               rows.validation, rows.held_out) for _, _, y in s})  # fmt: skip
    index = {c: i for i, c in enumerate(classes)}
    xtr, ytr = [x for _, x, _ in rows.train], [y for _, _, y in rows.train]
    xva, yva = [x for _, x, _ in rows.validation], [index[y] for _, _, y in rows.validation]
    xte, yte = [x for _, x, _ in rows.held_out], [index[y] for _, _, y in rows.held_out]
    score = M.METRICS[spec.metric_family]
    select = SELECT_ON[task]
    fitted: dict[str, LinearStage] = {}
    results: dict[str, Any] = {}
    for name, cfg in CONFIGS.items():
        t0 = _cpu()
        stage = LinearStage.fit(xtr, ytr, classes, cfg, seed=seed)
        fit_s = _cpu() - t0
        t0 = _cpu()
        probs, coverage = stage.score(xva)
        score_s = _cpu() - t0
        with tempfile.TemporaryDirectory() as tmp:
            stage.save(Path(tmp))
            size = sum((Path(tmp) / f).stat().st_size for f in LINEAR_FILES)
        fitted[name] = stage
        results[name] = {
            "config": cfg.to_json(),
            "validation": score(yva, probs),
            "fit_cpu_s": round(fit_s, 1),
            "score_cpu_ms_per_1000": round(1000 * score_s * 1000 / len(xva), 1),
            "known_features": len(stage.features),
            "files_bytes": size,
            "validation_coverage_p05": float(np.quantile(coverage, 0.05)),
        }
    chosen = max(results, key=lambda n: results[n]["validation"][select])
    stage = fitted[chosen]
    held_probs, held_cov = stage.score(xte)
    t0 = _cpu()
    baseline = M.tfidf_logreg_probs(xtr, [index[y] for y in ytr], xte, len(classes), seed)
    baseline_s = _cpu() - t0
    return {
        "task": task,
        "rows": {"train": len(xtr), "validation": len(xva), "held_out": len(xte)},
        "select_on": f"validation {select}",
        "configs": results,
        "chosen": chosen,
        "held_out": {
            "linear_stage": score(yte, held_probs),
            "tfidf_logreg_same_rows": score(yte, baseline),
            "tfidf_logreg_fit_cpu_s": round(baseline_s, 1),
            "coverage_p05": float(np.quantile(held_cov, 0.05)),
        },
        "seed": seed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default=REVIEW.name, choices=sorted(SELECT_ON))
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    emit(run(args.task, Settings().model.data_dir, seed=args.seed), args.out)


def emit(report: dict[str, Any], out: Path | None) -> None:
    """Print an experiment's JSON report, and write it to ``out`` when given."""
    text = json.dumps(report, indent=2) + "\n"
    if out is not None:
        out.write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()

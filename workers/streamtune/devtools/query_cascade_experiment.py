"""Does the cascade pay for ``query_class``? Its rule out of fold, then cost side by side (issue 12).

    PYTHONPATH=workers nice -n 19 python -m streamtune.devtools.query_cascade_experiment [--out F]

The rule is chosen as ``streamtune train`` chooses it for this task: on out-of-fold predictions
of the 375 training rows (``training/out_of_fold.py``; the task has no validation split). Only
then, once, the held-out rows are scored with the committed v1 transformer (trained on exactly
those 375 rows) and a linear stage fitted on the same rows, through that rule. CPU seconds per
1,000 held-out queries of each stage are measured side by side in this process, on one thread.
Prints one JSON document (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamtune.core.settings import Settings
from streamtune.core.tasks import QUERY, TASKS
from streamtune.devtools.linear_experiment import emit
from streamtune.model.cascade import ScorePath, combine, route, shares
from streamtune.model.linear import LinearStage
from streamtune.rollout.registry import LocalRegistry
from streamtune.training import metrics as M
from streamtune.training import out_of_fold
from streamtune.training.bootstrap import TrainConfig, text_split
from streamtune.training.candidate import _TextModel

TASK = QUERY.name


def _cpu_per_1000(fn: Callable[[list[str]], object], texts: list[str], reps: int) -> float:
    t0 = time.process_time()
    for _ in range(reps):
        fn(texts)
    return (time.process_time() - t0) / (reps * len(texts)) * 1000


def run(settings: Settings, seed: int = 13, v1: int = 1) -> dict[str, Any]:
    spec = TASKS[TASK]
    cfg = TrainConfig(seed=seed)
    base = settings.model.base_model
    split = text_split(TASK, settings.model.data_dir, cfg)
    registry = LocalRegistry(settings.model.adapter_dir)
    names = split.names
    if names != registry.manifest(TASK, v1).labels:
        raise SystemExit(f"{TASK} v{v1}: its labels are not the data's classes")
    (x, y), (xte, yte) = split.train, split.held_out
    score = M.METRICS[spec.metric_family]
    t0 = time.monotonic()
    rule, report = out_of_fold.choose(TASK, base, names, x, y, cfg, cfg.linear, score)
    choose_s = time.monotonic() - t0
    stage = LinearStage.fit(x, [names[i] for i in y], names, cfg.linear, seed)
    transformer = _TextModel(base, registry.fetch(TASK, v1), names, settings.model.max_seq_len)
    tr = transformer.predict_transformer(xte)
    lin, cov = stage.score(xte)
    paths = route(lin, cov, rule)
    torch.set_num_threads(1)  # per-core costs, side by side
    cost = {
        "linear_cpu_s_per_1000": _cpu_per_1000(stage.score, xte, reps=20),
        "transformer_cpu_s_per_1000": _cpu_per_1000(transformer.predict_transformer, xte, reps=3),
    }
    on_transformer = 1.0 - float(np.mean(paths == ScorePath.LINEAR))  # blend or transformer alone
    cost["cascade_cpu_s_per_1000"] = (
        cost["linear_cpu_s_per_1000"] + on_transformer * cost["transformer_cpu_s_per_1000"]
    )
    cost["transformer_over_cascade"] = cost["transformer_cpu_s_per_1000"] / cost["cascade_cpu_s_per_1000"]
    return {
        "task": TASK,
        "rule": rule.as_dict(),
        "choice": {**report, "seconds": round(choose_s, 1)},
        "held_out": {
            "rows": len(xte),
            "transformer_v1": score(yte, tr),
            "linear": score(yte, lin),
            "cascade": score(yte, combine(paths, lin, tr, rule)),
            "shares": shares(paths),
        },
        "cost": cost,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    emit(run(Settings(), args.seed), args.out)


if __name__ == "__main__":
    main()

"""Choosing the purchase-intent recipe: click MLP variants beside boosted trees.

Every configuration is fitted on the training split minus the validation split
(``datasets.loaders.is_validation``, 10 %) and ranked by ROC-AUC on validation rows; the held-out
split is scored only to report the chosen configurations, never to choose. Gradient-boosted
trees (scikit-learn's ``HistGradientBoostingClassifier``, default settings) are the bar.

    PYTHONPATH=workers python -m streamtune.devtools.click_experiment --out /tmp/click.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from torch import nn

from streamtune.core.features import BASE_FEATURE_DIM, vectorize
from streamtune.core.settings import Settings
from streamtune.core.tasks import CLICK
from streamtune.datasets import loaders as data
from streamtune.model.click import ClickNet
from streamtune.model.trees import blend, choose_weight
from streamtune.training.bootstrap import fit_click


def arrays(rows: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    x = np.array([vectorize(r) for r in rows], dtype=np.float32)
    y = np.array([int(r["Revenue"]) for r in rows], dtype=np.float32)
    return x, y


def mlp(
    xtr: np.ndarray, ytr: np.ndarray, dim: int, epochs: int, hidden: int, balanced: bool, lr: float, seed: int
) -> ClickNet:
    torch.manual_seed(seed)
    net = ClickNet(dim=dim, hidden=hidden)
    x = xtr[:, :dim]
    with torch.no_grad():
        net.mean.copy_(torch.from_numpy(x.mean(0)))
        net.std.copy_(torch.from_numpy(x.std(0) + 1e-6))
    pos = float(ytr.sum())
    weight = torch.tensor((len(ytr) - pos) / max(pos, 1.0) if balanced else 1.0)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=weight)
    gen = torch.Generator().manual_seed(seed)
    x_t, y_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    fit_click(net, list(net.parameters()), x_t, y_t, epochs, lr, gen, loss_fn)
    return net


def predict(net: ClickNet, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        p: np.ndarray = torch.sigmoid(net(torch.from_numpy(x))).numpy()
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = data.load_sessions(Settings().model.data_dir)
    pct = CLICK.held_out_percent
    held = [r for r in rows if data.is_held_out(r["session_id"], pct)]
    rest = [r for r in rows if not data.is_held_out(r["session_id"], pct)]
    val = [r for r in rest if data.is_validation(r["session_id"], 10)]
    train = [r for r in rest if not data.is_validation(r["session_id"], 10)]
    xtr, ytr = arrays(train)
    xva, yva = arrays(val)
    xte, yte = arrays(held)
    full = xtr.shape[1]
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    trees = HistGradientBoostingClassifier(random_state=args.seed).fit(xtr, ytr)
    results.append({
        "model": "hist_gradient_boosting", "val_roc_auc": roc_auc_score(yva, trees.predict_proba(xva)[:, 1]),
        "held_out_roc_auc": roc_auc_score(yte, trees.predict_proba(xte)[:, 1]),
        "seconds": time.monotonic() - started,
    })  # fmt: skip
    print(results[-1], flush=True)
    grid = itertools.product((BASE_FEATURE_DIM, full), (15, 30, 60), (64, 128), (True, False), (3e-3, 1e-3))
    for dim, epochs, hidden, balanced, lr in grid:
        t0 = time.monotonic()
        net = mlp(xtr, ytr, dim, epochs, hidden, balanced, lr, args.seed)
        row = {
            "model": "mlp", "dim": dim, "epochs": epochs, "hidden": hidden, "balanced": balanced, "lr": lr,
            "val_roc_auc": roc_auc_score(yva, predict(net, xva)),
            "held_out_roc_auc": roc_auc_score(yte, predict(net, xte)),
            "seconds": time.monotonic() - t0,
        }  # fmt: skip
        results.append(row)
        print(row, flush=True)
    results.sort(key=lambda r: -r["val_roc_auc"])
    # the MLP chosen on validation, blended with the trees at the weight validation chooses
    best = next(r for r in results if r["model"] == "mlp")
    net = mlp(xtr, ytr, best["dim"], best["epochs"], best["hidden"], best["balanced"], best["lr"], args.seed)
    tree_p = lambda x: trees.predict_proba(x)[:, 1]  # noqa: E731
    weight, by_weight = choose_weight(predict(net, xva), tree_p(xva), list(yva.astype(int)), roc_auc_score)
    blended = {
        "model": "blend", "mlp": best, "weight": weight, "validation_by_weight": by_weight,
        "held_out_roc_auc": roc_auc_score(yte, blend(predict(net, xte), tree_p(xte), weight)),
    }  # fmt: skip
    print(blended, flush=True)
    rows_n = {"train": len(train), "validation": len(val), "held_out": len(held)}
    args.out.write_text(json.dumps({"rows": rows_n, "blend": blended, "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""One online fine-tuning run: warm-start from the live version, train on fresh + replayed
labels within a time budget, score holdout and reference set with live and candidate, gate,
and publish the candidate (released or not) with the comparison in its manifest.

Runs in the trainer's training thread. Publishing is the registry's atomic rename, so a
process killed anywhere in here leaves no partial version behind.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from streamtune.core.errors import AdapterError, StreamtuneError
from streamtune.core.tasks import TASKS, MetricFamily
from streamtune.datasets.reference import Reference, reference_set
from streamtune.model.click import CLICK_BASE_WEIGHTS, ClickNet
from streamtune.model.encoder import Head, base_model_sha256, load_base
from streamtune.rollout.registry import AdapterStore, Manifest
from streamtune.training import metrics as M
from streamtune.training.bootstrap import (
    TrainConfig,
    _portable_adapter_config,
    fit_click,
    fit_text,
    predict_text,
    seed_everything,
)
from streamtune.training.online import GateVerdict, TrainingSet, gate

__all__ = ["Reference", "reference_set"]  # also imported from here by the trainer and bench

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class OnlineConfig:
    epochs: int = 2
    lr: float = 5e-4
    budget_s: float = 300.0
    margin: float = 0.01
    tolerance: float = 0.01
    max_len: int = 128
    batch_size: int = 16
    seed: int = 13


def evaluate(task: str, labels: list[str], y: list[str], probs: np.ndarray) -> dict[str, float]:
    """The task's metrics; NaN where a metric is undefined (e.g. one class only in ``y``)."""
    index = {n: i for i, n in enumerate(labels)}
    yi = [index[v] for v in y]
    try:
        family = TASKS[task].metric_family
        if family is MetricFamily.BINARY and probs.ndim == 2:
            probs = probs[:, -1]
        return M.METRICS[family](yi, probs)
    except ValueError:
        return {"undefined": float("nan")}


class NothingToTrain(StreamtuneError):
    """Every fresh label was unusable; the run is skipped and its labels count as used."""


@dataclass
class Outcome:
    manifest: Manifest
    verdict: GateVerdict


class _TextModel:
    def __init__(self, base_path: str, path: Path, labels: list[str], max_len: int) -> None:
        self.tok, base = load_base(base_path)
        self.model = PeftModel.from_pretrained(base, str(path), is_trainable=True)
        weights = load_file(str(path / "head.safetensors"))
        self.head = Head(weights["linear.weight"].shape[1], len(labels))
        self.head.load_state_dict(weights)
        self.model.eval()
        self.head.eval()
        self.max_len = max_len

    def predict(self, xs: list[Any]) -> np.ndarray:
        return predict_text(self.model, self.head, self.tok, list(xs), self.max_len)

    def fit(self, xs: list[Any], yi: list[int], n: int, cfg: OnlineConfig, task: str, deadline: float) -> int:
        tc = TrainConfig(
            seed=cfg.seed,
            epochs=cfg.epochs,
            train_rows=0,
            max_len=cfg.max_len,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
        )
        return fit_text(self.model, self.head, self.tok, list(xs), yi, n, tc, task, deadline=deadline)

    def save(self, build: Path, base_name: str) -> None:
        self.model.save_pretrained(str(build), safe_serialization=True, save_embedding_layers=False)
        (build / "README.md").unlink(missing_ok=True)
        _portable_adapter_config(build / "adapter_config.json", base_name)
        save_file(
            {k: v.contiguous() for k, v in self.head.state_dict().items()}, str(build / "head.safetensors")
        )


class _ClickModel:
    def __init__(self, path: Path) -> None:
        self.path = path
        net = ClickNet()
        net.load_state_dict(load_file(str(path / CLICK_BASE_WEIGHTS)))
        self.model = PeftModel.from_pretrained(net, str(path), is_trainable=True)
        self.model.eval()

    def predict(self, xs: list[Any]) -> np.ndarray:
        with torch.inference_mode():
            p = torch.sigmoid(self.model(torch.tensor(xs, dtype=torch.float32))).numpy()
        out: np.ndarray = np.stack([1 - p, p], axis=1)
        return out

    def fit(self, xs: list[Any], yi: list[int], n: int, cfg: OnlineConfig, task: str, deadline: float) -> int:
        xt = torch.tensor(xs, dtype=torch.float32)
        yt = torch.tensor(yi, dtype=torch.float32)
        pos = float(yt.sum())
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(yi) - pos) / max(pos, 1.0)))
        params = [p for p in self.model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(cfg.seed)
        fit_click(self.model, params, xt, yt, 3 * cfg.epochs, cfg.lr, gen, loss_fn, deadline=deadline)
        return 3 * cfg.epochs

    def save(self, build: Path, base_name: str) -> None:
        shutil.copy2(self.path / CLICK_BASE_WEIGHTS, build / CLICK_BASE_WEIGHTS)
        self.model.save_pretrained(str(build), safe_serialization=True, save_embedding_layers=False)
        (build / "README.md").unlink(missing_ok=True)
        _portable_adapter_config(build / "adapter_config.json", base_name)


def _offsets(examples: list[Any]) -> dict[str, list[int]]:
    """The label offsets a run used, per partition: [lowest, highest] (its training window)."""
    out: dict[str, list[int]] = {}
    for e in examples:
        lo, hi = out.get(str(e.partition), [e.offset, e.offset])
        out[str(e.partition)] = [min(lo, e.offset), max(hi, e.offset)]
    return dict(sorted(out.items()))


def train_candidate(
    task: str,
    live_version: int,
    ts: TrainingSet,
    reference: Reference,
    registry: AdapterStore,
    base_path: str,
    cfg: OnlineConfig,
    on_started: Callable[[], None] | None = None,
    reference_live: dict[str, float] | None = None,
) -> Outcome:
    """Fine-tune ``task`` from ``live_version`` on ``ts`` and publish the candidate.

    ``reference_live``: live's metrics on ``reference`` when already known (they are returned in
    the outcome's manifest, ``gate.reference.live``, for the next run to reuse).
    """
    started = time.monotonic()
    seed_everything(cfg.seed)
    live = registry.verify(
        task, live_version, base_sha256=base_model_sha256(base_path) if TASKS[task].is_text else None
    )
    path = registry.fetch(task, live_version)
    labels = live.labels
    index = {n: i for i, n in enumerate(labels)}
    unknown = [e for e in ts.train + ts.holdout if e.y not in index]
    if unknown:  # e.g. a query class the live model does not have: cannot be learned by this head
        log.warning(
            "labels_not_in_model", task=task, rows=len(unknown), examples=sorted({e.y for e in unknown})[:5]
        )
        ts = TrainingSet(
            [e for e in ts.fresh if e.y in index],
            [e for e in ts.replay if e.y in index],
            [e for e in ts.holdout if e.y in index],
            ts.watermark,
            ts.excluded,
        )
    model: _TextModel | _ClickModel
    try:
        model = (
            _ClickModel(path)
            if live.kind == "click-mlp-lora"
            else _TextModel(base_path, path, labels, cfg.max_len)
        )
    except Exception as e:
        raise AdapterError(f"{task} v{live_version}: cannot load for training: {e}") from e

    hold_x, hold_y = [e.x for e in ts.holdout], [e.y for e in ts.holdout]

    def score(xs: list[Any], ys: list[str]) -> dict[str, float]:
        return evaluate(task, labels, ys, model.predict(xs)) if ys else {"undefined": float("nan")}

    holdout_live = score(hold_x, hold_y)
    if reference_live is None:  # the caller may know it: same live version, same fixed set
        reference_live = score(reference.x, reference.y)

    log.info("training_started", task=task, parent=live_version, fresh=len(ts.fresh), replay=len(ts.replay),
             holdout=len(ts.holdout), budget_s=cfg.budget_s)  # fmt: skip
    if on_started is not None:
        on_started()
    fit_started = time.monotonic()
    train = ts.train
    if not train:
        raise NothingToTrain(f"{task}: no usable fresh labels (reference inputs or unknown classes only)")
    steps = model.fit(
        [e.x for e in train],
        [index[e.y] for e in train],
        len(labels),
        cfg,
        task,
        deadline=fit_started + cfg.budget_s,
    )
    fit_seconds = time.monotonic() - fit_started

    holdout_cand = score(hold_x, hold_y)
    reference_cand = score(reference.x, reference.y)
    verdict = gate(
        task, holdout_live, holdout_cand, reference_live, reference_cand,
        cfg.margin, cfg.tolerance, len(ts.holdout), len(reference.y),
    )  # fmt: skip
    every = ts.fresh + ts.holdout
    training: dict[str, Any] = {
        "source": "trainer",
        "fresh_labels": len(ts.fresh),
        "replay_labels": len(ts.replay),
        "holdout_labels": len(ts.holdout),
        "unknown_label_rows": len(unknown),
        "joined_seq": ts.watermark,
        "label_offsets": _offsets(every),
        "excluded_reference_inputs": ts.excluded,
        "label_time_range": [
            datetime.fromtimestamp(min(e.ts for e in every), UTC).isoformat() if every else None,
            datetime.fromtimestamp(max(e.ts for e in every), UTC).isoformat() if every else None,
        ],
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "steps": steps,
        "budget_s": cfg.budget_s,
        "budget_reached": fit_seconds >= cfg.budget_s,
        "fit_seconds": round(fit_seconds, 2),
        "seconds": round(time.monotonic() - started, 2),
        "torch_threads": torch.get_num_threads(),
        "seed": cfg.seed,
    }
    with tempfile.TemporaryDirectory(prefix="streamtune-candidate-") as tmp:
        build = Path(tmp)
        model.save(build, live.base_model.name)
        manifest = Manifest(
            task=live.task,
            version=registry.next_version(task),
            parent_version=live_version,
            kind=live.kind,
            base_model=live.base_model,
            labels=labels,
            created_at=datetime.now(UTC),
            training=training,
            metrics={k: v for k, v in holdout_cand.items()},
            baselines={f"live_v{live_version}": holdout_live},
            gate={"passed": verdict.passed, "reason": verdict.reason, **verdict.details},
        )
        published = registry.publish(build, manifest)
    log.info("candidate_published", task=task, version=published.version, parent=live_version,
             passed=verdict.passed, reason=verdict.reason, seconds=training["seconds"])  # fmt: skip
    return Outcome(published, verdict)

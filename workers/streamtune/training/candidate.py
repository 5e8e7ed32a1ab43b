"""One online fine-tuning run: warm-start from the live version, train on fresh + replayed
labels within a time budget, score holdout and reference set with live and candidate (and the
reference set with the first released version, the gate's fixed floor), gate, and publish the
candidate (released or not) with the comparison in its manifest.

Runs in the trainer's training thread. Publishing is the registry's atomic rename, so a
process killed anywhere in here leaves no partial version behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, SupportsIndex, overload

import numpy as np
import structlog
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from streamtune.core.errors import AdapterError, StreamtuneError
from streamtune.core.tasks import TASKS, MetricFamily
from streamtune.datasets.reference import Reference, reference_set
from streamtune.model.cascade import CascadeRule, answer
from streamtune.model.click import CLICK_BASE_WEIGHTS, load_click_net
from streamtune.model.encoder import Head, base_model_sha256, load_base
from streamtune.model.linear import LinearStage
from streamtune.model.trees import TREES_META, TREES_MODEL, TreeStage, blend
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
from streamtune.training.online import (
    Example,
    GateVerdict,
    Metrics,
    PairedHoldout,
    TrainingSet,
    gate,
    trained_watermark,
    undefined_of,
)

__all__ = ["Reference", "reference_set"]  # also imported from here by the trainer and bench

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class OnlineConfig:
    epochs: int = 2
    lr: float = 5e-4
    budget_s: float = 300.0
    margin: float = 0.01
    tolerance: float = 0.01
    alpha: float = 0.05  # the gate's significance level (STREAMTUNE_TRAINER_GATE_ALPHA)
    max_len: int = 128
    batch_size: int = 16
    seed: int = 13


# The metrics of each family (the keys :data:`streamtune.training.metrics.METRICS` returns): all
# of them are recorded, NaN, when none can be computed.
METRIC_NAMES: dict[MetricFamily, tuple[str, ...]] = {
    MetricFamily.CLASSIFICATION: ("accuracy", "macro_f1"),
    MetricFamily.TOP_K: ("top1", "top3"),
    MetricFamily.BINARY: ("roc_auc", "pr_auc", "positive_rate"),
}
# Binary ranking metrics need both classes: with one, ROC-AUC is undefined and average
# precision is 0 or 1 whatever the model says.
_NEEDS_BOTH_CLASSES = frozenset({"roc_auc", "pr_auc"})


def evaluate(task: str, labels: list[str], y: list[str], probs: np.ndarray) -> Metrics:
    """The task's metrics of a model (its ``probs`` over ``labels``) on rows of class names ``y``.

    A metric that is undefined on these rows is NaN and :attr:`Metrics.undefined` says why: no
    rows; classes the model lacks (it has no probability for them, so no metric over these rows
    means anything); one class only (binary ranking metrics); or whatever else made the metric
    undefined. Undefined values are recorded as such (null in the manifest), never dropped or
    replaced by a number, and the gate refuses a comparison on one."""
    family = TASKS[task].metric_family
    names = METRIC_NAMES[family]

    def none(why: str) -> Metrics:
        return Metrics(dict.fromkeys(names, math.nan), dict.fromkeys(names, why))

    if not y:
        return none("no rows")
    index = {n: i for i, n in enumerate(labels)}
    lacking = sorted({v for v in y if v not in index})
    if lacking:
        rows = sum(1 for v in y if v not in index)
        shown = ", ".join(lacking[:5]) + (", ..." if len(lacking) > 5 else "")
        return none(f"classes the model lacks ({shown}: {rows} of {len(y)} rows)")
    yi = [index[v] for v in y]
    if family is MetricFamily.BINARY and probs.ndim == 2:
        probs = probs[:, -1]
    try:
        with warnings.catch_warnings():  # sklearn warns where a metric is undefined: recorded below
            warnings.simplefilter("ignore")
            scores = {k: float(v) for k, v in M.METRICS[family](yi, probs).items()}
    except ValueError as e:
        return none(f"not computable: {e}")
    undefined: dict[str, str] = {}
    classes = sorted(set(y))
    if family is MetricFamily.BINARY and len(classes) == 1:
        for name in _NEEDS_BOTH_CLASSES & scores.keys():
            scores[name] = math.nan
            undefined[name] = f"one class only ({classes[0]}) in {len(y)} rows"
    for name, v in scores.items():
        if not math.isfinite(v):
            undefined.setdefault(name, f"undefined on these {len(y)} rows")
    return Metrics(scores, undefined)


class NothingToTrain(StreamtuneError):
    """Every fresh label was unusable; the run is skipped and its labels count as used."""


@dataclass
class Outcome:
    manifest: Manifest
    verdict: GateVerdict


class _ReadLog(list[Any]):
    """A run's training inputs, noting which rows the fit loop reads, in the order first read.

    The loop reads a batch's rows for the step that trains on them, so after a stop at the time
    budget these are the rows the run trained on; ``fit_text`` shuffles every epoch, so they are
    not a prefix of the list. (A loop that read every row up front would make a budget stop
    within the first epoch look like a complete one: see :meth:`_TextModel.fit`.)"""

    def __init__(self, items: Iterable[Any]) -> None:
        super().__init__(items)
        self.read: dict[int, None] = {}  # an ordered set

    @overload
    def __getitem__(self, i: SupportsIndex) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...

    def __getitem__(self, i: SupportsIndex | slice) -> Any:
        if isinstance(i, slice):
            self.read.update(dict.fromkeys(range(len(self))[i]))
            return super().__getitem__(i)
        self.read.setdefault(range(len(self))[i])  # the row's index (negative ones normalised)
        return super().__getitem__(i)


class _TextModel:
    """A text version for training and evaluation. With a ``cascade`` (its manifest's), it
    predicts what the version serves: its linear stage (loaded from ``path``, kept as it is:
    online runs tune the transformer) and the transformer, routed by its rule; so live and
    candidate are compared as the cascades they serve, and the candidate keeps the stage."""

    def __init__(
        self,
        base_path: str,
        path: Path,
        labels: list[str],
        max_len: int,
        cascade: Mapping[str, Any] | None = None,
        *,
        inference_only: bool = False,
    ) -> None:
        self.stage = LinearStage.load(path) if cascade else None
        self.rule = CascadeRule.from_dict(cascade["rule"]) if cascade else None
        self.tok, base = load_base(base_path)
        peft_model = PeftModel.from_pretrained(base, str(path), is_trainable=not inference_only)
        # A model that only predicts has its LoRA weights merged into the base's: one matmul per
        # projection instead of three (about 1.2x less CPU; the same outputs to 1e-6).
        self.inference_only = inference_only
        self.model: nn.Module = peft_model.merge_and_unload() if inference_only else peft_model
        weights = load_file(str(path / "head.safetensors"))
        self.head = Head(weights["linear.weight"].shape[1], len(labels))
        self.head.load_state_dict(weights)
        self.model.eval()
        self.head.eval()
        self.max_len = max_len
        self.trained: list[int] = []  # rows of the last fit's inputs it trained on, in that order

    def predict(self, xs: list[Any]) -> np.ndarray:
        if self.stage is not None and self.rule is not None:
            return answer(self.stage, self.rule, list(xs), self.predict_transformer).probs
        return self.predict_transformer(list(xs))

    def predict_transformer(self, xs: list[str]) -> np.ndarray:
        return predict_text(self.model, self.head, self.tok, xs, self.max_len)

    def fit(self, xs: list[Any], yi: list[int], n: int, cfg: OnlineConfig, task: str, deadline: float) -> int:
        """Fine-tune; returns the steps taken and sets :attr:`trained`: every row once a first
        epoch completed, else (stopped at the budget within it) the rows its steps read."""
        if self.inference_only:
            raise StreamtuneError("a model loaded for inference only (its LoRA merged) cannot be trained")
        tc = TrainConfig(
            seed=cfg.seed,
            epochs=cfg.epochs,
            train_rows=0,
            max_len=cfg.max_len,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
        )
        rows = _ReadLog(xs)
        steps = fit_text(self.model, self.head, self.tok, rows, yi, n, tc, task, deadline=deadline)
        per_epoch = -(-len(xs) // cfg.batch_size)
        self.trained = list(range(len(xs))) if steps >= per_epoch else list(rows.read)
        return steps

    def save(self, build: Path, base_name: str) -> None:
        if not isinstance(self.model, PeftModel):
            raise StreamtuneError(
                "a model loaded for inference only (its LoRA merged) has no adapter to save"
            )
        self.model.save_pretrained(str(build), safe_serialization=True, save_embedding_layers=False)
        (build / "README.md").unlink(missing_ok=True)
        _portable_adapter_config(build / "adapter_config.json", base_name)
        save_file(
            {k: v.contiguous() for k, v in self.head.state_dict().items()}, str(build / "head.safetensors")
        )
        if self.stage is not None:
            self.stage.save(build)


class _ClickModel:
    """The click MLP's LoRA adapter, trained online. A parent with boosted trees passes them on
    unchanged: the candidate predicts (and is gated on) the same blend that serving computes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.model = PeftModel.from_pretrained(load_click_net(path), str(path), is_trainable=True)
        self.model.eval()
        self.trees = TreeStage.load(path) if (path / TREES_META).is_file() else None
        self.trained: list[int] = []  # rows of the last fit's inputs it trained on, in that order

    def predict(self, xs: list[Any]) -> np.ndarray:
        with torch.inference_mode():
            p = torch.sigmoid(self.model(torch.tensor(xs, dtype=torch.float32))).numpy()
        if self.trees is not None:
            p = blend(p, self.trees.predict(xs), self.trees.weight)
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
        # fit_click looks at the deadline after each whole epoch: every row is trained on once an
        # epoch ran at all.
        self.trained = list(range(len(xs))) if cfg.epochs > 0 else []
        return 3 * cfg.epochs

    def save(self, build: Path, base_name: str) -> None:
        shutil.copy2(self.path / CLICK_BASE_WEIGHTS, build / CLICK_BASE_WEIGHTS)
        if self.trees is not None:
            for name in (TREES_MODEL, TREES_META):
                shutil.copy2(self.path / name, build / name)
        self.model.save_pretrained(str(build), safe_serialization=True, save_embedding_layers=False)
        (build / "README.md").unlink(missing_ok=True)
        _portable_adapter_config(build / "adapter_config.json", base_name)


def fresh_in_training_order(fresh: Sequence[Example], trained: Iterable[int]) -> tuple[list[Example], int]:
    """The fresh labels in the order a run trained on them, those it never reached last, and how
    many it reached: the arguments of :func:`~streamtune.training.online.trained_watermark`.
    ``fresh`` are the first rows of the run's training list (fresh, then replay); ``trained``
    the rows of that list the run trained on, in order (replayed rows are ignored)."""
    reached = [i for i in dict.fromkeys(trained) if 0 <= i < len(fresh)]
    seen = set(reached)
    order = reached + [i for i in range(len(fresh)) if i not in seen]
    return [fresh[i] for i in order], len(reached)


def undefined_metrics(
    holdout_live: Mapping[str, float],
    holdout_candidate: Mapping[str, float],
    reference_live: Mapping[str, float],
    reference_candidate: Mapping[str, float],
) -> dict[str, dict[str, dict[str, str]]]:
    """The comparison's undefined metrics and why, as the manifest records them beside the values
    (which are null there): ``{"holdout": {"candidate": {"roc_auc": "one class only ..."}}}``;
    only the sets and models with one."""
    sets = {
        "holdout": {"live": holdout_live, "candidate": holdout_candidate},
        "reference": {"live": reference_live, "candidate": reference_candidate},
    }
    out: dict[str, dict[str, dict[str, str]]] = {}
    for where, models in sets.items():
        found = {model: u for model, m in models.items() if (u := undefined_of(m))}
        if found:
            out[where] = found
    return out


@dataclass(frozen=True)
class Scores:
    """What the gate compares: live and the candidate on the holdout and on the reference set."""

    holdout_live: Mapping[str, float]
    holdout_candidate: Mapping[str, float]
    reference_live: Mapping[str, float]
    reference_candidate: Mapping[str, float]

    def undefined(self) -> dict[str, dict[str, dict[str, str]]]:
        return undefined_metrics(
            self.holdout_live, self.holdout_candidate, self.reference_live, self.reference_candidate
        )


def judge(
    task: str,
    live_version: int,
    scores: Scores,
    holdout_rows: int,
    reference: Reference,
    registry: AdapterStore,
    base_path: str,
    max_len: int,
    *,
    margin: float,
    tolerance: float,
    alpha: float,
    paired: PairedHoldout | None,
) -> GateVerdict:
    """The gate of either path (:func:`~streamtune.training.online.gate`), with the first released
    version's reference score as the floor against a ratchet (live's when live is that version,
    else :func:`first_reference`)."""
    first = first_released_version(registry, task) or live_version
    reference_first = (
        scores.reference_live
        if first == live_version
        else first_reference(task, first, reference, registry, base_path, max_len)
    )
    s = scores
    return gate(
        task, s.holdout_live, s.holdout_candidate, s.reference_live, s.reference_candidate,
        margin, tolerance, holdout_rows, len(reference.y),
        paired=paired, alpha=alpha, reference_first=reference_first, first_version=first,
    )  # fmt: skip


def candidate_manifest(
    registry: AdapterStore,
    live: Manifest,
    training: dict[str, Any],
    scores: Scores,
    verdict: GateVerdict,
    cascade: dict[str, Any],
) -> Manifest:
    """A candidate's manifest, with the next version of ``live``'s task and ``live`` as parent:
    its holdout metrics, live's beside them, and the gate's record."""
    return Manifest(
        task=live.task,
        version=registry.next_version(live.task),
        parent_version=live.version,
        kind=live.kind,
        base_model=live.base_model,
        labels=live.labels,
        created_at=datetime.now(UTC),
        training=training,
        metrics=dict(scores.holdout_candidate),
        baselines={f"live_v{live.version}": dict(scores.holdout_live)},
        cascade=cascade,
        gate={
            "passed": verdict.passed,
            "reason": verdict.reason,
            **verdict.details,
            "undefined_metrics": scores.undefined(),
        },
    )


def label_offsets(examples: list[Any]) -> dict[str, list[int]]:
    """The label offsets a run used, per partition: [lowest, highest] (its training window)."""
    out: dict[str, list[int]] = {}
    for e in examples:
        lo, hi = out.get(str(e.partition), [e.offset, e.offset])
        out[str(e.partition)] = [min(lo, e.offset), max(hi, e.offset)]
    return dict(sorted(out.items()))


def first_released_version(registry: AdapterStore, task: str) -> int | None:
    """The oldest version that may serve ``task`` (releasable: the bootstrap version, or a
    candidate that passed its gate); normally version 1. None: no readable releasable version."""
    for version in registry.versions(task):
        try:
            if registry.manifest(task, version).releasable:
                return version
        except AdapterError:
            continue
    return None


# The first released version's reference-set metrics, per process: its manifest holds metrics on
# the whole held-out split, not on the reference rows the gate compares, so it is scored once on
# those rows (one forward pass) and kept. Keyed by everything the score depends on.
_FIRST_REFERENCE: dict[tuple[str, int, str, str, int, str], dict[str, float]] = {}


def _reference_digest(reference: Reference) -> str:
    return hashlib.sha256(json.dumps([reference.x, reference.y]).encode()).hexdigest()


def first_reference(
    task: str, version: int, reference: Reference, registry: AdapterStore, base_path: str, max_len: int
) -> dict[str, float]:
    """``version``'s metrics on ``reference`` (verified, loaded and scored once per process).

    A version that cannot be verified or loaded gets undefined metrics, which the gate refuses:
    without the floor a release could not be checked against the ratchet."""
    try:
        key = (task, version, registry.manifest_sha256(task, version), base_path, max_len,
               _reference_digest(reference))  # fmt: skip
        cached = _FIRST_REFERENCE.get(key)
        if cached is not None:
            return dict(cached)
        m = registry.verify(
            task, version, base_sha256=base_model_sha256(base_path) if TASKS[task].is_text else None
        )
        path = registry.fetch(task, version)
        model: _TextModel | _ClickModel
        if m.kind == "click-mlp-lora":
            model = _ClickModel(path)
        else:
            model = _TextModel(base_path, path, m.labels, max_len, m.cascade, inference_only=True)
        scores = evaluate(task, m.labels, reference.y, model.predict(reference.x))
    except Exception as e:  # a broken first version must not stop training; the gate refuses
        log.warning("first_version_unscorable", task=task, version=version, error=str(e))
        return {"undefined": math.nan}
    _FIRST_REFERENCE[key] = scores
    return dict(scores)


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
    the outcome's manifest, ``gate.reference.live``, for the next run to reuse). The first
    released version's metrics on ``reference`` (the gate's floor against a ratchet) are live's
    when live is that version, else :func:`first_reference` (computed once per process).
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
            progress=ts.progress,  # the caller reads how far the run got from its own set
        )
    model: _TextModel | _ClickModel
    try:
        model = (
            _ClickModel(path)
            if live.kind == "click-mlp-lora"
            else _TextModel(base_path, path, labels, cfg.max_len, live.cascade)
        )
    except Exception as e:
        raise AdapterError(f"{task} v{live_version}: cannot load for training: {e}") from e

    hold_x, hold_y = [e.x for e in ts.holdout], [e.y for e in ts.holdout]

    def score(xs: list[Any], ys: list[str]) -> dict[str, float]:
        return evaluate(task, labels, ys, model.predict(xs)) if ys else {"undefined": float("nan")}

    def predicted(xs: list[Any]) -> np.ndarray | None:
        return model.predict(xs) if xs else None

    def scored(ys: list[str], probs: np.ndarray | None) -> dict[str, float]:
        return evaluate(task, labels, ys, probs) if probs is not None and ys else {"undefined": float("nan")}

    live_hold_p = predicted(hold_x)  # kept row by row: the gate's significance test pairs them
    holdout_live = scored(hold_y, live_hold_p)
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
    # How far the run got: the fit reports the rows it trained on (model.trained, all of them
    # unless it stopped at the budget within its first epoch); the trainer advances its
    # watermark only to there (ts.progress, read in trainer/app.py run_job), and so does the
    # next start (joined_seq in the manifest), so labels the run never reached stay fresh.
    in_order, trained_fresh = fresh_in_training_order(ts.fresh, model.trained)
    reached = trained_watermark(ts.watermark, in_order, trained_fresh)
    ts.progress.watermark = reached
    if reached < ts.watermark:
        log.warning("training_stopped_before_every_label", task=task, trained=trained_fresh,
                    fresh=len(ts.fresh), joined_seq=reached, selected_up_to=ts.watermark)  # fmt: skip

    cand_hold_p = predicted(hold_x)
    holdout_cand = scored(hold_y, cand_hold_p)
    reference_cand = score(reference.x, reference.y)
    paired = (
        PairedHoldout([index[v] for v in hold_y], live_hold_p, cand_hold_p)
        if live_hold_p is not None and cand_hold_p is not None
        else None
    )
    scores = Scores(holdout_live, holdout_cand, reference_live, reference_cand)
    verdict = judge(task, live_version, scores, len(ts.holdout), reference, registry, base_path, cfg.max_len,
                    margin=cfg.margin, tolerance=cfg.tolerance, alpha=cfg.alpha, paired=paired)  # fmt: skip
    every = ts.fresh + ts.holdout
    training: dict[str, Any] = {
        "source": "trainer",
        "fresh_labels": len(ts.fresh),
        "replay_labels": len(ts.replay),
        "holdout_labels": len(ts.holdout),
        "unknown_label_rows": len(unknown),
        "joined_seq": reached,  # what counts as used: every label up to it
        "joined_seq_selected": ts.watermark,  # what the run was given
        "fresh_labels_trained": trained_fresh,
        "label_offsets": label_offsets(every),
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
        # the live version's stage and rule, as they were chosen (its files are saved above)
        cascade = {**live.cascade, "inherited_from": live_version} if live.cascade else {}
        manifest = candidate_manifest(registry, live, training, scores, verdict, cascade)
        published = registry.publish_next(build, manifest)
    log.info("candidate_published", task=task, version=published.version, parent=live_version,
             passed=verdict.passed, reason=verdict.reason, seconds=training["seconds"])  # fmt: skip
    return Outcome(published, verdict)

"""The trainer's fast path: a new version whose linear stage is updated on fresh labels and whose
transformer is its parent's, gated like every candidate, in seconds.

* **Update.** :meth:`~streamtune.model.linear.LinearStage.updated` on the run's fresh labels (the
  parent's knowledge is its prior, so no replay is needed).
* **Rule re-check.** On a check slice of the fresh labels (the newest training labels, left out
  of the update), the linear stage's accuracy on the events it would answer alone is compared
  with the transformer's on the same events, and the cascade's on the events it admits with
  the transformer alone's; where either is worse, the threshold or the coverage floor is raised
  until it is not (:func:`recheck_rule`: raised only, never lowered, so a shift cannot quietly
  route hard events to the linear stage). Run when a drift was detected.
* **Gate.** The same gate as the slow path (:func:`~streamtune.training.online.gate`), on the
  served cascades: live's and the candidate's share the transformer, so its probabilities are
  computed once per text (:class:`TransformerProbs`) and only for the texts either cascade
  defers to it.
* **Publish.** Only a candidate that passed: its linear stage files, every other file shared
  with the parent (hard links, ``manifest.shared``), and the parent's ONNX artifacts inherited
  (no re-export). A refused one is logged and counted; its labels stay fresh for the next run,
  which then has more of them.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from streamtune.core.errors import AdapterError
from streamtune.core.tasks import TASKS
from streamtune.datasets.reference import Reference
from streamtune.model.cascade import CascadeRule, ScorePath, answer, combine, route
from streamtune.model.linear import LINEAR_FILES, LinearStage
from streamtune.rollout.registry import AdapterStore, Manifest
from streamtune.training.candidate import (
    NothingToTrain,
    Scores,
    _TextModel,
    candidate_manifest,
    evaluate,
    judge,
    label_offsets,
)
from streamtune.training.online import Example, GateVerdict, PairedHoldout, TrainingSet

log = structlog.get_logger(__name__)

PATH_FAST = "fast"  # manifest.training["path"] of a fast-path version (the slow path's is "slow")


@dataclass(frozen=True)
class FastOutcome:
    """A fast run's candidate: its manifest (in the registry when ``published``; a refused one's
    is only returned and logged, its ``version`` the one it would have had) and the verdict."""

    manifest: Manifest
    verdict: GateVerdict
    published: bool
    stage: LinearStage  # the updated linear stage and the rule it serves with (benchmarks score them)
    rule: CascadeRule


@dataclass(frozen=True)
class FastConfig:
    margin: float = 0.01
    tolerance: float = 0.01
    alpha: float = 0.05
    # LinearStage.updated: weight of the parent's evidence, chosen on validation rows
    # (devtools/fast_prior_experiment.py; docs/two-speeds.md)
    prior_strength: float = 30.0
    recheck_rows: int = 100  # newest fresh training labels the rule is re-checked on (0: never)
    recheck_slack: float = 0.02  # the linear stage may be this much less accurate on its events
    min_update_rows: int = 10  # fewer fresh training labels: nothing to update on


class TransformerProbs:
    """A version's transformer probabilities per text, computed once: the fast path's live and
    candidate share the transformer, and the reference set is scored by every run.

    ``predict`` runs the model (a list of texts to an array of probabilities); up to
    ``max_texts`` texts are kept (least recently used go first)."""

    def __init__(self, predict: Callable[[list[str]], np.ndarray], max_texts: int = 20_000) -> None:
        self._predict = predict
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._max = max_texts
        self.computed = 0  # texts the model ran on (for the run's record)

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            for text, p in zip(missing, self._predict(missing), strict=True):
                self._memo[text] = np.asarray(p, dtype=np.float64)
            self.computed += len(missing)
        out = np.stack([self._memo[t] for t in texts]) if texts else np.zeros((0, 0))
        for t in texts:
            self._memo.move_to_end(t)
        while len(self._memo) > self._max:
            self._memo.popitem(last=False)
        return out


class TransformerCache:
    """The live transformer's :class:`TransformerProbs` per task, loaded once per transformer: a
    fast version shares its parent's files, so after a fast release the model and what it
    computed carry over; a new transformer (a slow release) replaces them."""

    def __init__(self, registry: AdapterStore, base_path: str, max_len: int) -> None:
        self.registry, self.base_path, self.max_len = registry, base_path, max_len
        self._held: dict[str, tuple[tuple[tuple[str, str], ...], TransformerProbs]] = {}

    def __call__(self, live: Manifest) -> TransformerProbs:
        key = tuple(sorted((n, d) for n, d in live.files.items() if n not in LINEAR_FILES))
        held = self._held.get(live.task)
        if held is None or held[0] != key:
            path = self.registry.fetch(live.task, live.version)
            model = _TextModel(self.base_path, path, live.labels, self.max_len, inference_only=True)
            held = (key, TransformerProbs(model.predict_transformer))
            self._held[live.task] = held
        return held[1]


def served_probs(
    stage: LinearStage, rule: CascadeRule, texts: Sequence[str], transformer: TransformerProbs
) -> np.ndarray:
    """What a version with ``stage`` and ``rule`` serves for ``texts`` (the transformer only where
    its path needs it)."""
    if not texts:
        return np.zeros((0, len(stage.classes)))
    return answer(stage, rule, list(texts), transformer).probs.astype(np.float64)


@dataclass(frozen=True)
class Recheck:
    """The rule's re-check on fresh labels: JSON-safe (:meth:`to_json`) for the manifest."""

    rows: int
    threshold_before: float
    threshold_after: float
    linear_rows: int  # check rows the linear stage answers alone under the rule kept
    linear_accuracy: float  # on the rows it answered alone before the raise (NaN: none)
    transformer_accuracy: float  # the transformer on the same rows
    min_coverage_before: float = 0.0
    min_coverage_after: float = 0.0
    admitted_rows: int = 0  # check rows in domain (not the transformer's alone) under the rule kept
    served_accuracy: float = math.nan  # the cascade on the rows in domain before the raise
    transformer_admitted_accuracy: float = math.nan  # the transformer alone on the same rows

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def recheck_rule(
    linear: np.ndarray, coverage: np.ndarray, transformer: np.ndarray, y: Sequence[int], rule: CascadeRule,
    slack: float,
) -> tuple[CascadeRule, Recheck]:  # fmt: skip
    """Re-check ``rule`` on labelled rows after a shift; raise what it needs, never lower anything.

    1. **Threshold.** Raised until the linear stage is at most ``slack`` less accurate than the
       transformer on the rows it answers alone. Candidates are those rows' top probabilities,
       so each raise hands at least one more row to the transformer; 1 (never alone) ends it.
    2. **Coverage floor.** An update makes the new texts' vocabulary known, so out-of-domain
       rows stop being deferred to the transformer alone although the linear stage is no better
       on them. ``min_coverage`` is raised until the cascade (with the threshold of step 1) is at
       most ``slack`` less accurate than the transformer alone on the rows it still admits.

    ``transformer`` is read only on the rows ``rule`` admits (coverage at least its floor)."""
    yy = np.asarray(y)
    right_linear = linear.argmax(axis=1) == yy
    admitted = np.flatnonzero(coverage >= rule.min_coverage)
    right_transformer = np.zeros(len(yy), dtype=bool)
    if len(admitted):
        right_transformer[admitted] = transformer[admitted].argmax(axis=1) == yy[admitted]
    top = linear.max(axis=1)
    alone = np.flatnonzero(route(linear, coverage, rule) == ScorePath.LINEAR)

    def mean(mask: np.ndarray, rows: np.ndarray) -> float:
        return float(mask[rows].mean()) if len(rows) else math.nan

    lin0, tr0 = mean(right_linear, alone), mean(right_transformer, alone)
    threshold = 1.0
    for t in [rule.threshold, *sorted({float(v) for v in top[alone] if v >= rule.threshold})]:
        rows = alone[top[alone] > t]
        if not len(rows) or mean(right_linear, rows) >= mean(right_transformer, rows) - slack:
            threshold = t
            break
    raised = CascadeRule(threshold=threshold, weight=rule.weight, min_coverage=rule.min_coverage)

    def served_right(r: CascadeRule, rows: np.ndarray) -> np.ndarray:
        probs = combine(route(linear[rows], coverage[rows], r), linear[rows], transformer[rows], r)
        right: np.ndarray = probs.argmax(axis=1) == yy[rows]
        return right

    served0 = float(served_right(raised, admitted).mean()) if len(admitted) else math.nan
    floor, weight = rule.min_coverage, rule.weight
    candidates = sorted({float(c) for c in coverage[admitted] if c > rule.min_coverage})
    for c in [rule.min_coverage, *candidates, None]:
        if c is None:  # even the rows of full coverage are better off with the transformer alone
            threshold, floor, weight = 1.0, 1.0, 0.0
            break
        r = CascadeRule(threshold=threshold, weight=rule.weight, min_coverage=c)
        rows = admitted[coverage[admitted] >= c]
        if (
            not len(rows)
            or float(served_right(r, rows).mean()) >= float(right_transformer[rows].mean()) - slack
        ):
            floor = c
            break
    new = CascadeRule(threshold=threshold, weight=weight, min_coverage=floor)
    paths = route(linear, coverage, new)
    kept_alone = int(np.count_nonzero(paths == ScorePath.LINEAR))
    kept_admitted = int(np.count_nonzero(paths != ScorePath.TRANSFORMER))
    return new, Recheck(
        len(yy), rule.threshold, threshold, kept_alone, lin0, tr0,
        rule.min_coverage, floor, kept_admitted, served0, mean(right_transformer, admitted),
    )  # fmt: skip


def transformer_files(live: Manifest) -> dict[str, int]:
    """What a fast version shares with its parent ``live``: every file but the linear stage."""
    return {name: live.version for name in live.files if name not in LINEAR_FILES}


def fast_candidate(
    task: str,
    live_version: int,
    ts: TrainingSet,
    reference: Reference,
    registry: AdapterStore,
    transformer_for: Callable[[Manifest], TransformerProbs],
    base_path: str,
    max_len: int,
    cfg: FastConfig,
    *,
    recheck: bool = False,
    base_sha256: str | None = None,
    reference_live: dict[str, float] | None = None,
) -> FastOutcome:
    """Update ``live_version``'s linear stage on ``ts.fresh``, gate the cascade against live's on
    ``ts.holdout`` and the reference set, and publish it when it passed.

    ``transformer_for`` gives the live version's :class:`TransformerProbs` (kept by the caller
    across runs). ``recheck``: re-check the rule's threshold first (a drift was detected)."""
    started, cpu_started = time.monotonic(), time.thread_time()
    spec = TASKS[task]
    if not spec.is_text:
        raise NothingToTrain(f"{task}: the fast path updates a text task's linear stage")
    live = registry.verify(task, live_version, base_sha256=base_sha256)
    if not live.cascade:
        raise NothingToTrain(f"{task} v{live_version} has no linear stage to update")
    path = registry.fetch(task, live_version)
    try:
        stage = LinearStage.load(path)
        rule = CascadeRule.from_dict(live.cascade["rule"])
    except (AdapterError, KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{task} v{live_version}: cannot load its linear stage: {e}") from e
    labels = live.labels
    index = {n: i for i, n in enumerate(labels)}

    def usable(part: list[Example]) -> list[Example]:
        return [e for e in part if e.y in index and isinstance(e.x, str)]

    fresh, holdout = usable(ts.fresh), usable(ts.holdout)
    n_check = min(cfg.recheck_rows, len(fresh) // 3) if recheck else 0
    train, check = fresh[: len(fresh) - n_check], fresh[len(fresh) - n_check :]
    if len(train) < cfg.min_update_rows:
        raise NothingToTrain(
            f"{task}: {len(train)} usable fresh labels, the fast path needs {cfg.min_update_rows}"
        )
    transformer = transformer_for(live)
    computed_before = transformer.computed

    updated = stage.updated([str(e.x) for e in train], [e.y for e in train], cfg.prior_strength)
    new_rule, checked = rule, None
    if check:
        texts = [str(e.x) for e in check]
        linear, coverage = updated.score(texts)
        admitted = np.flatnonzero(coverage >= rule.min_coverage)  # what recheck_rule reads
        tp = np.zeros_like(linear)
        if len(admitted):
            tp[admitted] = transformer([texts[int(i)] for i in admitted])
        new_rule, checked = recheck_rule(
            linear, coverage, tp, [index[e.y] for e in check], rule, cfg.recheck_slack
        )
        if new_rule != rule:
            log.warning("cascade_rule_raised", task=task, parent=live_version, **checked.to_json())

    hold_x, hold_y = [str(e.x) for e in holdout], [e.y for e in holdout]
    live_hold = served_probs(stage, rule, hold_x, transformer)
    cand_hold = served_probs(updated, new_rule, hold_x, transformer)
    holdout_live = evaluate(task, labels, hold_y, live_hold)
    holdout_cand = evaluate(task, labels, hold_y, cand_hold)
    ref_x = [str(x) for x in reference.x]
    if reference_live is None:
        reference_live = evaluate(task, labels, reference.y, served_probs(stage, rule, ref_x, transformer))
    reference_cand = evaluate(task, labels, reference.y, served_probs(updated, new_rule, ref_x, transformer))
    paired = PairedHoldout([index[v] for v in hold_y], live_hold, cand_hold) if hold_y else None
    scores = Scores(holdout_live, holdout_cand, reference_live, reference_cand)
    verdict = judge(task, live_version, scores, len(holdout), reference, registry, base_path, max_len,
                    margin=cfg.margin, tolerance=cfg.tolerance, alpha=cfg.alpha, paired=paired)  # fmt: skip
    every = fresh + holdout
    training: dict[str, Any] = {
        "source": "trainer",
        "path": PATH_FAST,
        "fresh_labels": len(train),
        "check_labels": len(check),
        "holdout_labels": len(holdout),
        "unusable_labels": len(ts.fresh) + len(ts.holdout) - len(every),
        "joined_seq": ts.watermark,
        "label_offsets": label_offsets(every),
        "update": updated.training.get("update", {}),
        "transformer_texts": transformer.computed - computed_before,
        # this thread's CPU time: the transformer's work on other threads counts only with one
        # torch thread (STREAMTUNE_TORCH_THREADS=1, as in the demo), recorded beside it
        "cpu_seconds": round(time.thread_time() - cpu_started, 3),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.monotonic() - started, 3),
    }
    cascade = {**live.cascade, "rule": new_rule.as_dict(), "updated_from": live_version}
    cascade.pop("inherited_from", None)
    if checked is not None:
        cascade["recheck"] = checked.to_json()
    manifest = candidate_manifest(registry, live, training, scores, verdict, cascade)
    if not verdict.passed:
        log.info("fast_candidate_refused", task=task, parent=live_version, reason=verdict.reason,
                 fresh=len(train), holdout=len(holdout), cpu_seconds=training["cpu_seconds"])  # fmt: skip
        return FastOutcome(manifest, verdict, False, updated, new_rule)
    with tempfile.TemporaryDirectory(prefix="streamtune-fast-") as tmp:
        build = Path(tmp)
        updated.save(build)
        published = registry.publish_next(build, manifest, shared=transformer_files(live))
    inherited = registry.inherit_artifacts(task, published.version, live_version)
    log.info("fast_candidate_published", task=task, version=published.version, parent=live_version,
             reason=verdict.reason, fresh=len(train), artifacts=[a.backend for a in inherited],
             cpu_seconds=training["cpu_seconds"], seconds=training["seconds"])  # fmt: skip
    return FastOutcome(published, verdict, True, updated, new_rule)

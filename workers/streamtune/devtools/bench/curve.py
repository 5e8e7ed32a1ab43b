"""The two speeds side by side (part of ``streamtune bench update``): for each count of fresh
labels, what a fast update (the linear stage, :mod:`streamtune.training.fast`) and a slow one
(the LoRA fine-tune, :func:`~streamtune.training.candidate.train_candidate`) gain on a drift the
live version never saw, what they change on the original reviews, what they cost, and what the
gate says.

* **Live**: the newest shipped ``review_sentiment`` version (a cascade); both paths start from it,
  with the trainer's own code and gate settings.
* **The drift**: reviews from other sites (:mod:`streamtune.datasets.other_sites`: Amazon, IMDB,
  Yelp sentences). The first N of its stream side are the fresh labels (the newest 20 % are the
  gate's holdout, as in the trainer); its held-out side is where the gain is measured (never
  trained on, never gated on).
* **The original reviews**: held-out reviews of the shipped data (the trainer's reference set is
  drawn from the same split; what the gate compares is reported beside it).

Metrics are accuracy (the other sites have no neutral class) of what each version serves: the
cascade, with the transformer only where its rule defers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamtune.core.settings import Settings
from streamtune.core.tasks import REVIEW
from streamtune.datasets import loaders, other_sites
from streamtune.model.cascade import CascadeRule
from streamtune.model.linear import LinearConfig, LinearStage
from streamtune.rollout.registry import LocalRegistry
from streamtune.training.candidate import (
    OnlineConfig,
    _TextModel,
    evaluate,
    first_reference,
    first_released_version,
    reference_set,
    train_candidate,
)
from streamtune.training.fast import (
    FastConfig,
    TransformerCache,
    TransformerProbs,
    fast_candidate,
    served_probs,
)
from streamtune.training.online import Example, select

TASK = REVIEW.name


@dataclass(frozen=True)
class CurveConfig:
    sizes: tuple[int, ...] = (100, 250, 500, 1000, 2000)
    holdout_fraction: float = 0.2
    eval_rows: int = 0  # rows of each evaluation set (0: the other sites' whole held-out side, 1000 reviews)
    slow: bool = True
    replay_ratio: float | None = None  # older labels replayed per fresh one (None: the trainer's setting)
    epochs: int = 1
    budget_s: float = 3600.0
    seed: int = 13


def _accuracy(y: list[str], probs: np.ndarray, labels: list[str]) -> float:
    return float(evaluate(TASK, labels, y, probs)["accuracy"])


def run(settings: Settings, cfg: CurveConfig, registry: LocalRegistry) -> dict[str, Any]:
    live = registry.latest(TASK)
    assert live is not None
    live_m = registry.manifest(TASK, live)
    if not live_m.cascade:
        raise ValueError(f"{TASK} v{live} has no linear stage: the fast path needs one")
    labels = live_m.labels
    base, max_len = settings.model.base_model, settings.model.max_seq_len
    stream, held = other_sites.split(other_sites.load())
    if max(cfg.sizes) > len(stream):
        raise ValueError(f"sizes up to {max(cfg.sizes)}: the other sites' stream side has {len(stream)} rows")
    n_eval = cfg.eval_rows or 1000
    held = held[: cfg.eval_rows] if cfg.eval_rows else held
    pct = loaders.HELD_OUT_PERCENT[TASK]
    reviews = loaders.load_reviews(settings.model.data_dir)
    natural = [r for r in reviews if loaders.is_held_out(r.review_id, pct)]
    natural = natural[:n_eval]
    drift_x, drift_y = [r.text for r in held], [r.label for r in held]
    nat_x, nat_y = [r.model_text() for r in natural], [r.label for r in natural]
    reference = reference_set(TASK, settings.model.data_dir, settings.trainer.reference_rows)
    # Older joined labels, as the trainer's label store holds them before the drift: reviews of
    # the training split (what v2 learned from), replayed by the slow path at the trainer's
    # ratio (STREAMTUNE_TRAINER_REPLAY_RATIO) against forgetting. The reference set and the
    # evaluation rows are held-out reviews, never among them.
    older = [r for r in reviews if not loaders.is_held_out(r.review_id, pct)][: settings.trainer.replay_max]
    examples = [
        Example(f"{TASK}:old-{i}", r.model_text(), r.label, 0, i, float(i), seq=i)
        for i, r in enumerate(older)
    ]
    watermark = len(older) - 1  # everything before the drift counts as trained on
    examples += [
        Example(f"{TASK}:other-{seq - len(older)}", r.text, r.label, 0, seq, seq, seq=seq)
        for seq, r in enumerate(stream, start=len(older))
    ]
    transformers = TransformerCache(registry, base, max_len)
    live_t = transformers(live_m)
    live_stage = LinearStage.load(registry.fetch(TASK, live))
    live_rule = CascadeRule.from_dict(live_m.cascade["rule"])

    def served(stage: LinearStage, rule: CascadeRule, t: TransformerProbs) -> tuple[float, float]:
        return (_accuracy(drift_y, served_probs(stage, rule, drift_x, t), labels),
                _accuracy(nat_y, served_probs(stage, rule, nat_x, t), labels))  # fmt: skip

    before_drift, before_natural = served(live_stage, live_rule, live_t)
    transformer_only = _accuracy(drift_y, live_t(drift_x), labels)
    linear_only = _accuracy(drift_y, live_stage.predict_proba(drift_x), labels)
    s = settings.trainer
    replay_ratio = s.replay_ratio if cfg.replay_ratio is None else cfg.replay_ratio
    fast_cfg = FastConfig(margin=s.margin, tolerance=s.reference_tolerance, alpha=s.gate_alpha,
                          prior_strength=s.fast_prior_strength, recheck_rows=s.fast_recheck_rows)  # fmt: skip
    slow_cfg = OnlineConfig(epochs=cfg.epochs, lr=s.lr, budget_s=cfg.budget_s, margin=s.margin,
                            tolerance=s.reference_tolerance, max_len=max_len, seed=cfg.seed,
                            alpha=s.gate_alpha)  # fmt: skip
    # Warm-up, as a running trainer has it after its first update: the live transformer loaded,
    # its reference-set answers and the first released version's reference score computed.
    warm = time.monotonic()
    served_probs(live_stage, live_rule, [str(x) for x in reference.x], live_t)
    first = first_released_version(registry, TASK)
    if first is not None and first != live:
        first_reference(TASK, first, reference, registry, base, max_len)
    warm_up_s = time.monotonic() - warm
    rows: list[dict[str, Any]] = []
    for n in cfg.sizes:
        ts = select(examples[: len(older) + n], watermark, cfg.holdout_fraction, replay_ratio, cfg.seed)
        started, cpu_started = time.monotonic(), time.process_time()  # every thread's (torch's too)
        out = fast_candidate(
            TASK, live, ts, reference, registry, transformers, base, max_len, fast_cfg, recheck=True
        )
        wall, cpu = time.monotonic() - started, time.process_time() - cpu_started
        after_drift, after_natural = served(out.stage, out.rule, live_t)
        rows.append(_row("fast", n, ts, out.manifest.gate, out.verdict.passed, after_drift, after_natural,
                         before_drift, before_natural, cpu, wall))  # fmt: skip
        rows[-1]["threshold"] = out.rule.threshold
        sets = ((drift_x, drift_y), (nat_x, nat_y))
        rows += _baselines(n, ts, labels, cfg.seed, sets, (before_drift, before_natural))
        if not cfg.slow:
            continue
        started, cpu = time.monotonic(), time.process_time()
        slow = train_candidate(TASK, live, ts, reference, registry, base, slow_cfg)
        wall, cpu = time.monotonic() - started, time.process_time() - cpu
        m = slow.manifest
        path = registry.fetch(TASK, m.version)
        model = _TextModel(base, path, labels, max_len, m.cascade, inference_only=True)
        after_drift = _accuracy(drift_y, model.predict(drift_x), labels)
        after_natural = _accuracy(nat_y, model.predict(nat_x), labels)
        rows.append(_row("slow", n, ts, m.gate, slow.verdict.passed, after_drift, after_natural,
                         before_drift, before_natural, cpu, wall))  # fmt: skip
    return {
        "live_version": live,
        "warm_up_seconds": round(warm_up_s, 1),
        "replay_ratio": replay_ratio,
        "drift": f"other sites ({other_sites.PACKAGE}: UCI Sentiment Labelled Sentences, Amazon/IMDB/Yelp)",
        "drift_held_out_rows": len(drift_y),
        "natural_rows": len(nat_y),
        "live": {
            "drift_accuracy": before_drift,
            "natural_accuracy": before_natural,
            "drift_accuracy_transformer_only": transformer_only,
            "drift_accuracy_linear_only": linear_only,
        },
        "rows": rows,
    }


def _baselines(
    n: int,
    ts: Any,
    labels: list[str],
    seed: int,
    sets: tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]],
    before: tuple[float, float],
) -> list[dict[str, Any]]:
    """The simple models on the same labels and the same held-out rows (``sets``: the other
    sites', the original reviews'): a TF-IDF + logistic regression stage refit on the fresh
    labels alone (what the fast path's update is to beat without its prior), and the fresh
    labels' majority class."""
    x, y = [str(e.x) for e in ts.fresh], [str(e.y) for e in ts.fresh]
    out = []
    started, cpu_started = time.monotonic(), time.process_time()
    try:
        refit: LinearStage | None = LinearStage.fit(x, y, labels, LinearConfig(), seed)
    except ValueError:  # fewer than two classes among the labels
        refit = None
    wall, cpu = time.monotonic() - started, time.process_time() - cpu_started
    if refit is not None:
        drift, natural = (_accuracy(ys, refit.predict_proba(xs), labels) for xs, ys in sets)
        out.append(_row("baseline: TF-IDF refit", n, ts, {}, None, drift, natural, *before, cpu, wall))
    top = max(set(y), key=y.count)
    drift, natural = (float(np.mean([v == top for v in ys])) for _, ys in sets)
    out.append(_row("baseline: majority", n, ts, {}, None, drift, natural, *before, 0.0, 0.0))
    return out


def _row(
    path: str, n: int, ts: Any, gate: dict[str, Any], passed: bool | None, after_drift: float,
    after_natural: float, before_drift: float, before_natural: float, cpu: float, wall: float,
) -> dict[str, Any]:  # fmt: skip
    return {
        "path": path,
        "labels": n,
        "trained_on": len(ts.fresh),
        "replayed": len(ts.replay) if path == "slow" else 0,
        "holdout": len(ts.holdout),
        "gate_passed": passed,
        "gate_reason": gate.get("reason"),
        "holdout_gain": gate.get("holdout_gain"),
        "reference_change": gate.get("reference_change"),
        "drift_accuracy": after_drift,
        "drift_gain": after_drift - before_drift,
        "natural_accuracy": after_natural,
        "natural_change": after_natural - before_natural,
        "cpu_seconds": round(cpu, 2),
        "seconds": round(wall, 2),
    }


def markdown(c: dict[str, Any]) -> list[str]:
    live = c["live"]
    lines = [
        "",
        f"## Two speeds: fast and slow updates of v{c['live_version']} on a drift it never saw",
        "",
        f"Drift: {c['drift']}; accuracy measured on {c['drift_held_out_rows']} held-out sentences of the "
        f"other sites and on {c['natural_rows']} held-out reviews of the shipped data (never trained on).",
        f"Live v{c['live_version']} there: cascade {live['drift_accuracy']:.3f} (transformer alone "
        f"{live['drift_accuracy_transformer_only']:.3f}, linear stage alone "
        f"{live['drift_accuracy_linear_only']:.3f}); "
        f"original reviews {live['natural_accuracy']:.3f}. CPU s: the process's CPU time (every "
        f"thread) of each update; the fast path's once the trainer is warm (its first update also "
        f"loads the transformer and scores the reference set: {c['warm_up_seconds']} s here). "
        f"The slow path replays {c.get('replay_ratio', 0.0):g} older reviews of the training split per "
        "fresh label (the trainer's `STREAMTUNE_TRAINER_REPLAY_RATIO`; the fast path needs none: its "
        "parent is its prior). Baselines on the same rows: a TF-IDF + logistic regression stage "
        "refit on the same fresh labels alone, and their majority class.",
        "",
        "| fresh labels | path | gate | accuracy, other sites (gain) | accuracy, original reviews (change) "
        "| reference change (gate) | CPU s | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdict = {True: "passed", False: "refused", None: "–"}
    for r in c["rows"]:
        ref = r["reference_change"]
        lines.append(
            f"| {r['labels']} | {r['path']} | {verdict[r['gate_passed']]} "
            f"| {r['drift_accuracy']:.3f} ({r['drift_gain']:+.3f}) | {r['natural_accuracy']:.3f} "
            f"({r['natural_change']:+.3f}) | {'–' if ref is None else f'{ref:+.3f}'} "
            f"| {r['cpu_seconds']:.1f} | {r['seconds']:.1f} |"
        )
    lines += ["", "Gate reasons:", ""]
    lines += [
        f"- {r['labels']} labels, {r['path']}: {r['gate_reason']}" for r in c["rows"] if r["gate_reason"]
    ]
    return lines

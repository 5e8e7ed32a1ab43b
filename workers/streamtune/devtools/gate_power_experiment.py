"""How many holdout rows the release gate needs to release a slow update that is really better,
and how often it would release one trained on shuffled labels, under the gate's rule and the
stricter one it replaced on 2026-12-04.

    python -m streamtune.devtools.gate_power_experiment [--labels 250] [--draws 20] [--out F]

Why: in ``bench update``'s curve every slow update on the other sites' reviews gained 4-7 points
of accuracy on their held-out side, and the gate refused every one; its holdout is the newest
20 % of the fresh labels (20-400 rows). This separates the two causes: too few rows, or a rule
too strict for the rows there are.

* **Candidates**, trained as ``bench update`` trains them (the trainer's code and settings, one
  epoch, the trainer's replay of older training-split reviews): one on the first ``--labels``
  sentences of the other sites' stream side (``streamtune.datasets.other_sites``), and a control
  on the same sentences with their labels shuffled.
* **Holdouts**: random subsets of the last ``POOL`` sentences of the stream side (never in a
  candidate's training rows; the held-out side is not read), ``--draws`` of each size; both
  models' served answers (the cascade) on each, paired row by row as the gate pairs them.
* **Rules**, on the gate's own statistics (``paired_significance``: paired bootstrap lower
  bound, randomisation p-value, at the trainer's alpha and margin):

  - ``bound over margin`` (the gate's rule until 2026-12-04): the lower bound of the gain is
    above the margin, and p <= alpha (surely better by at least the margin);
  - ``significant gain`` (what ``training.online.gate`` applies now): the lower bound is above
    0, p <= alpha, and the point gain is at least the margin (surely better, and by a margin
    that matters).

Reported per candidate and size: the median gain and lower bound, and the share of draws each
rule passes. The reference-set check (forgetting) is left out: it does not depend on the
holdout. ``docs/two-speeds.md`` holds the table and what it meant for the gate.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from streamtune.core.settings import Settings
from streamtune.core.tasks import REVIEW
from streamtune.datasets import loaders, other_sites
from streamtune.rollout.registry import LocalRegistry
from streamtune.training.candidate import OnlineConfig, _TextModel, reference_set, train_candidate
from streamtune.training.online import Example, PairedHoldout, paired_significance, select

TASK = REVIEW.name
POOL = 1000  # the stream side's last sentences: the holdouts are drawn from them
SIZES = (50, 100, 200, 400, 1000)


def _examples(settings: Settings, n: int, shuffled: bool, seed: int) -> tuple[list[Example], int]:
    """As ``bench update``'s curve builds them: older training-split reviews (already trained
    on: the slow path replays them), then the first ``n`` other-site sentences as fresh labels."""
    pct = loaders.HELD_OUT_PERCENT[TASK]
    reviews = loaders.load_reviews(settings.model.data_dir)
    older = [r for r in reviews if not loaders.is_held_out(r.review_id, pct)][: settings.trainer.replay_max]
    examples = [Example(f"{TASK}:old-{i}", r.model_text(), r.label, 0, i, float(i), seq=i)
                for i, r in enumerate(older)]  # fmt: skip
    stream, _ = other_sites.split(other_sites.load())
    fresh = [Example(f"{TASK}:other-{seq}", r.text, r.label, 0, seq, float(seq), seq=seq)
             for seq, r in enumerate(stream[:n], start=len(older))]  # fmt: skip
    if shuffled:
        ys = [e.y for e in fresh]
        random.Random(seed).shuffle(ys)
        fresh = [replace(e, y=y) for e, y in zip(fresh, ys, strict=True)]
    return examples + fresh, len(older) - 1


def _served(settings: Settings, registry: LocalRegistry, version: int, xs: list[str]) -> np.ndarray:
    """A version's served probabilities (its cascade, as the gate scores it) on ``xs``."""
    m = registry.manifest(TASK, version)
    path = registry.fetch(TASK, version)
    model = _TextModel(
        settings.model.base_model, path, m.labels, settings.model.max_seq_len, m.cascade, inference_only=True
    )
    return model.predict(xs)


def run(
    settings: Settings, n: int, draws: int, sizes: tuple[int, ...] = SIZES, seed: int = 13
) -> dict[str, Any]:
    s = settings.trainer
    base, max_len = settings.model.base_model, settings.model.max_seq_len
    stream, _ = other_sites.split(other_sites.load())
    if n + POOL > len(stream):
        raise ValueError(f"--labels at most {len(stream) - POOL}: the last {POOL} are the holdout pool")
    pool = stream[-POOL:]
    pool_x, pool_y = [r.text for r in pool], [r.label for r in pool]
    reference = reference_set(TASK, settings.model.data_dir, s.reference_rows)
    cfg = OnlineConfig(epochs=1, lr=s.lr, budget_s=3600.0, margin=s.margin, tolerance=s.reference_tolerance,
                       max_len=max_len, seed=seed, alpha=s.gate_alpha)  # fmt: skip
    out: dict[str, Any] = {"labels": n, "pool": POOL, "draws": draws, "margin": s.margin}
    out["alpha"] = s.gate_alpha
    with tempfile.TemporaryDirectory(prefix="streamtune-gate-power-") as tmp:
        reg_dir = Path(tmp) / "adapters"
        shutil.copytree(settings.model.adapter_dir, reg_dir, ignore=shutil.ignore_patterns(".*", "artifacts"))
        registry = LocalRegistry(reg_dir)
        live = registry.latest(TASK)
        assert live is not None
        index = {c: i for i, c in enumerate(registry.manifest(TASK, live).labels)}
        live_p = _served(settings, registry, live, pool_x)
        out["live_version"] = live
        y = np.asarray([index[v] for v in pool_y])
        rng = np.random.default_rng(seed)
        subsets = {
            k: [np.arange(POOL)] if k >= POOL else [rng.choice(POOL, k, replace=False) for _ in range(draws)]
            for k in sizes
        }
        for name, shuffled in (("other sites", False), ("shuffled labels", True)):
            examples, watermark = _examples(settings, n, shuffled, seed)
            ts = select(examples, watermark, s.holdout_fraction, s.replay_ratio, seed)
            trained = train_candidate(TASK, live, ts, reference, registry, base, cfg)
            m = trained.manifest
            cand_p = _served(settings, registry, m.version, pool_x)
            rows = []
            for k, idxs in subsets.items():
                sigs = [
                    paired_significance(TASK, PairedHoldout(list(y[i]), live_p[i], cand_p[i]), s.gate_alpha)
                    for i in idxs
                ]
                strict = [g.lower > s.margin and g.p_value <= s.gate_alpha for g in sigs]
                gate = [g.lower > 0 and g.p_value <= s.gate_alpha and g.gain >= s.margin for g in sigs]
                rows.append({
                    "rows": k,
                    "draws": len(sigs),
                    "gain_median": statistics.median(g.gain for g in sigs),
                    "lower_median": statistics.median(g.lower for g in sigs),
                    "pass_bound_over_margin": sum(strict) / len(sigs),
                    "pass_significant_gain": sum(gate) / len(sigs),
                })  # fmt: skip
            accuracy = float(np.mean(cand_p.argmax(1) == y)) - float(np.mean(live_p.argmax(1) == y))
            out[name] = {
                "version": m.version,
                "trained_on": len(ts.fresh),
                "replayed": len(ts.replay),
                "gate": {"passed": trained.verdict.passed, "reason": trained.verdict.reason},
                "pool_accuracy_gain": accuracy,
                "rows": rows,
            }
    return out


def markdown(r: dict[str, Any]) -> list[str]:
    lines = [
        f"| candidate ({r['labels']} labels) | holdout rows | draws | median gain | median lower bound "
        "| passes: bound over margin (until 2026-12-04) | passes: significant gain ≥ margin (the gate) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("other sites", "shuffled labels"):
        for row in r[name]["rows"]:
            lines.append(
                f"| {name} | {row['rows']} | {row['draws']} | {row['gain_median']:+.3f} "
                f"| {row['lower_median']:+.3f} | {row['pass_bound_over_margin']:.0%} "
                f"| {row['pass_significant_gain']:.0%} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=250)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    result = run(Settings(), args.labels, args.draws)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("other sites", "shuffled labels")}))
    print("\n".join(markdown(result)))


if __name__ == "__main__":
    main()

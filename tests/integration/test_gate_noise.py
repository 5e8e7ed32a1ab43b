"""The release gate against noise, on the real trainer code path (``train_candidate`` with the
real base model and the committed version-1 adapters, as ``test_candidate.py``): candidates
trained on labels that carry no signal are published but never releasable, at the shipped gate
settings (margin 0.01, reference tolerance 0.01, alpha 0.05).

Small data and short budgets, so the file stays within a few minutes on 2 cores: the ten runs on
shuffled labels use the purchase-intent MLP (a second each); the 30 %-flipped run is one review
fine-tune (200 labels, one epoch, 64 tokens)."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from streamtune.core.features import vectorize
from streamtune.core.settings import Settings
from streamtune.core.tasks import SENTIMENTS
from streamtune.datasets import loaders as data
from streamtune.rollout.registry import LocalRegistry
from streamtune.training.candidate import OnlineConfig, reference_set, train_candidate
from streamtune.training.online import Example, select
from support.registry import pinned_registry

SHIPPED = Settings()
GATE = OnlineConfig(
    margin=SHIPPED.trainer.margin,
    tolerance=SHIPPED.trainer.reference_tolerance,
    alpha=SHIPPED.trainer.gate_alpha,
)


@pytest.fixture
def registry(tmp_path: Path) -> LocalRegistry:
    pinned_registry(tmp_path / "adapters")
    return LocalRegistry(tmp_path / "adapters")


def session_examples(n: int) -> list[Example]:
    rows = [
        r for r in data.load_sessions(SHIPPED.model.data_dir) if not data.is_held_out(r["session_id"], 20)
    ][:n]
    return [
        Example(f"purchase_intent:{r['session_id']}", vectorize(r), "purchase" if r["Revenue"] == "1" else
                "no_purchase", 1, i, 50.0 + i, i)
        for i, r in enumerate(rows)
    ]  # fmt: skip


def review_examples(n: int) -> list[Example]:
    reviews = [r for r in data.load_reviews(SHIPPED.model.data_dir) if not data.is_held_out(r.review_id, 10)]
    return [
        Example(f"review_sentiment:{r.review_id}", r.model_text(), r.label, 0, i, 1000.0 + i, i)
        for i, r in enumerate(reviews[-n:])
    ]


def test_ten_candidates_trained_on_shuffled_labels_never_pass(registry: LocalRegistry) -> None:
    reference = reference_set("purchase_intent", SHIPPED.model.data_dir, SHIPPED.trainer.reference_rows)
    examples = session_examples(800)
    verdicts = []
    for seed in range(10):
        ys = [e.y for e in examples]
        random.Random(seed).shuffle(ys)  # same labels, no longer tied to their sessions
        ts = select([replace(e, y=y) for e, y in zip(examples, ys, strict=True)], -1, 0.25, 0.0, seed=seed)
        cfg = replace(GATE, epochs=2, budget_s=30, seed=seed)
        out = train_candidate("purchase_intent", 1, ts, reference, registry, SHIPPED.model.base_model, cfg)
        assert out.manifest.parent_version == 1 and out.manifest.gate["holdout"]["rows"] == 200
        verdicts.append(out.verdict)
    assert [v.passed for v in verdicts] == [False] * 10, [v.reason for v in verdicts if v.passed]
    # Judged, not skipped: every holdout had both classes and went through the bootstrap.
    judged = [v.details.get("holdout_test", {}).get("defined", 0) >= 500 for v in verdicts]
    assert all(judged), [v.reason for v in verdicts]
    assert not any(registry.manifest("purchase_intent", v).releasable for v in range(2, 12))
    assert registry.default_version("purchase_intent") == 1


def test_a_candidate_trained_on_30_percent_flipped_review_labels_is_refused(registry: LocalRegistry) -> None:
    reference = reference_set("review_sentiment", SHIPPED.model.data_dir, rows=100)
    examples = review_examples(200)
    rng = random.Random(30)
    flip = set(rng.sample(range(len(examples)), k=60))  # 30 %, each to another class
    noisy = [
        replace(e, y=rng.choice([c for c in SENTIMENTS if c != e.y])) if i in flip else e
        for i, e in enumerate(examples)
    ]
    ts = select(noisy, -1, holdout_fraction=0.25, replay_ratio=0.0, seed=1)
    cfg = replace(GATE, epochs=1, budget_s=60, max_len=64)
    out = train_candidate("review_sentiment", 1, ts, reference, registry, SHIPPED.model.base_model, cfg)
    assert not out.verdict.passed, out.verdict.reason
    m = registry.manifest("review_sentiment", 2)
    assert m.gate["passed"] is False and not m.releasable
    assert m.gate["holdout_test"]["resamples"] == 1000 and m.gate["holdout"]["rows"] == 50


def test_a_run_from_a_later_version_is_held_to_the_first_versions_reference_score(
    registry: LocalRegistry,
) -> None:
    # v2 passes a loose gate and becomes the parent of v3; v3's gate compares with v1's score on
    # the same reference rows, which v1's manifest does not hold: v1 is scored again for it.
    reference = reference_set("purchase_intent", SHIPPED.model.data_dir, 200)
    ts = select(session_examples(400), -1, 0.25, 0.0, seed=1)
    loose = OnlineConfig(epochs=1, budget_s=30, margin=-1.0, tolerance=1.0)
    v2 = train_candidate("purchase_intent", 1, ts, reference, registry, SHIPPED.model.base_model, loose)
    assert v2.verdict.passed and v2.manifest.version == 2
    first = v2.manifest.gate["reference"]
    assert first["first_version"] == 1 and first["first"] == first["live"]  # live was v1
    v3 = train_candidate("purchase_intent", 2, ts, reference, registry, SHIPPED.model.base_model, loose)
    g = v3.manifest.gate["reference"]
    assert v3.manifest.parent_version == 2 and g["first_version"] == 1
    assert g["live"] == pytest.approx(v2.manifest.gate["reference"]["candidate"])  # v2 as live
    assert g["first"] == pytest.approx(first["live"])  # v1, scored on the same rows

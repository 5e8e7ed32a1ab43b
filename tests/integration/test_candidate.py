"""One online fine-tuning run on small real slices, with the real model and registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from streamtune.core.features import vectorize
from streamtune.core.settings import Settings
from streamtune.datasets import loaders as data
from streamtune.rollout.registry import LocalRegistry
from streamtune.training.candidate import OnlineConfig, reference_set, train_candidate
from streamtune.training.online import Example, select
from support.registry import pinned_registry


@pytest.fixture
def registry(tmp_path: Path) -> LocalRegistry:
    pinned_registry(tmp_path / "adapters")
    return LocalRegistry(tmp_path / "adapters")


def review_examples(n: int) -> list[Example]:
    reviews = [
        r for r in data.load_reviews(Settings().model.data_dir) if not data.is_held_out(r.review_id, 10)
    ]
    return [
        Example(f"review_sentiment:{r.review_id}", r.model_text(), r.label, 0, i, 1000.0 + i, i)
        for i, r in enumerate(reviews[-n:])
    ]


def test_review_candidate_warm_starts_from_live_and_records_its_gate(registry: LocalRegistry) -> None:
    s = Settings()
    reference = reference_set("review_sentiment", s.model.data_dir, rows=40)
    ts = select(review_examples(48), -1, holdout_fraction=0.25, replay_ratio=0.0, seed=1)
    cfg = OnlineConfig(epochs=1, budget_s=60, margin=-1.0, tolerance=1.0, max_len=64)
    out = train_candidate("review_sentiment", 1, ts, reference, registry, s.model.base_model, cfg)
    m = out.manifest
    assert out.verdict.passed and m.gate["passed"] is True
    assert (m.version, m.parent_version, m.kind) == (2, 1, "text-lora")
    assert m.training["source"] == "trainer"
    assert m.training["fresh_labels"] == 36 and m.training["holdout_labels"] == 12
    assert m.training["label_offsets"] == {"0": [0, 47]} and m.training["joined_seq"] == 47
    assert m.gate["metric"] == "macro_f1" and m.gate["reference"]["rows"] == 40
    assert set(m.gate["holdout"]["live"]) == {"accuracy", "macro_f1"}
    registry.verify("review_sentiment", 2)  # every checksum holds
    # Warm start: the candidate moved away from v1, starting from it (not from scratch).
    v1 = load_file(str(registry.fetch("review_sentiment", 1) / "adapter_model.safetensors"))
    v2 = load_file(str(registry.fetch("review_sentiment", 2) / "adapter_model.safetensors"))
    assert v1.keys() == v2.keys()
    assert any(not (v1[k] == v2[k]).all() for k in v1)


def test_a_candidate_that_misses_the_margin_is_published_but_not_releasable(registry: LocalRegistry) -> None:
    s = Settings()
    rows = [r for r in data.load_sessions(s.model.data_dir) if not data.is_held_out(r["session_id"], 20)][
        :400
    ]
    exs = [
        Example(f"purchase_intent:{r['session_id']}", vectorize(r), "purchase" if r["Revenue"] == "1" else
                "no_purchase", 1, i, 50.0 + i, i)
        for i, r in enumerate(rows)
    ]  # fmt: skip
    ts = select(exs, -1, holdout_fraction=0.25, replay_ratio=0.0, seed=1)
    cfg = OnlineConfig(epochs=1, budget_s=30, margin=1.0, tolerance=0.0)
    reference = reference_set("purchase_intent", s.model.data_dir, 200)
    out = train_candidate("purchase_intent", 1, ts, reference, registry, s.model.base_model, cfg)
    assert not out.verdict.passed and "margin" in out.verdict.reason
    m = registry.manifest("purchase_intent", 2)
    assert m.gate["passed"] is False and not m.releasable
    assert m.gate["metric"] == "roc_auc" and 0.5 < m.gate["holdout"]["live"]["roc_auc"] <= 1.0
    assert registry.default_version("purchase_intent") == 1  # a rejected version never serves by default

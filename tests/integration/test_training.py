"""The real trainer on small real slices: metrics beside baselines, publish, reproducibility."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamtune.core.settings import Settings
from streamtune.rollout.registry import LocalRegistry
from streamtune.training.bootstrap import TrainConfig, train_task

SMALL = TrainConfig(
    seed=3,
    epochs=1,
    train_rows=48,
    eval_rows=48,
    max_len=32,
    batch_size=16,
    linear_rows=400,
    validation_rows=100,
)


def _weights(reg: LocalRegistry, task: str, version: int) -> dict[str, str]:
    return reg.manifest(task, version).files


@pytest.mark.parametrize("task", ["review_sentiment", "purchase_intent"])
def test_same_seed_same_weights(task: str, tmp_path: Path) -> None:
    s = Settings()
    a, b = LocalRegistry(tmp_path / "a"), LocalRegistry(tmp_path / "b")
    ma = train_task(task, s.model.base_model, s.model.data_dir, a, SMALL)
    mb = train_task(task, s.model.base_model, s.model.data_dir, b, SMALL)
    assert ma.version == mb.version == 1
    assert _weights(a, task, 1) == _weights(b, task, 1)
    assert ma.metrics == mb.metrics
    a.verify(task, 1)


def test_query_class_trains_and_reports_baselines(tmp_path: Path) -> None:
    s = Settings()
    reg = LocalRegistry(tmp_path)
    m = train_task("query_class", s.model.base_model, s.model.data_dir, reg, SMALL)
    assert set(m.metrics) == {"top1", "top3"}
    assert set(m.baselines) == {"majority", "tfidf_logreg", "tfidf_logreg_unbalanced"}
    # Its cascade rule is chosen out of fold: no validation split, fold transformers instead.
    assert "linear.json" in m.files and m.training["validation_rows"] == 0
    assert m.cascade["chosen_on"] == "out_of_fold" and m.cascade["out_of_fold"]["folds"] == 5
    assert m.cascade["out_of_fold"]["rows"] == m.training["linear_train_rows"] > 300
    assert m.cascade["held_out"]["rows"] == 48 and m.metrics == m.cascade["held_out"]["cascade"]
    assert m.metrics["top3"] >= m.metrics["top1"]
    assert m.training["held_out_rows"] == 48 and "" not in m.labels
    # Held-out rows are never trained on: the split is a property of the row id.
    from streamtune.datasets.loaders import is_held_out, load_queries

    held = {q.query_id for q in load_queries(s.model.data_dir) if is_held_out(q.query_id, 20)}
    assert 60 < len(held) < 140
    assert reg.latest("query_class") == 1

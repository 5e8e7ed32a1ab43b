"""The trainer's fast path on small real slices, with the real model and registry: the shipped
review_sentiment v2 (a cascade) as live, its linear stage updated on fresh labels and gated as
a cascade; a passing version shares the transformer's files with its parent (hard links) and
serves; shuffled labels are refused."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from streamtune.core.settings import Settings
from streamtune.datasets import loaders as data
from streamtune.model.linear import LINEAR_FILES, LinearStage
from streamtune.model.runtime import ModelRuntime
from streamtune.rollout.registry import LocalRegistry
from streamtune.training.candidate import reference_set
from streamtune.training.fast import PATH_FAST, FastConfig, TransformerCache, fast_candidate
from streamtune.training.online import Example, select

TASK = "review_sentiment"
LIVE = 2  # the shipped cascade version


@pytest.fixture
def registry(tmp_path: Path) -> LocalRegistry:
    src = Settings().model.adapter_dir / TASK / str(LIVE)
    shutil.copytree(src, tmp_path / "adapters" / TASK / str(LIVE), ignore=shutil.ignore_patterns("artifacts"))
    return LocalRegistry(tmp_path / "adapters")


def _examples(n: int, shuffle: bool = False) -> list[Example]:
    reviews = [
        r for r in data.load_reviews(Settings().model.data_dir) if not data.is_held_out(r.review_id, 10)
    ]
    rows = reviews[-n:]
    labels = [r.label for r in rows]
    if shuffle:
        random.Random(5).shuffle(labels)
    return [Example(f"{TASK}:{r.review_id}", r.model_text(), y, 0, i, 1000.0 + i, i)
            for i, (r, y) in enumerate(zip(rows, labels, strict=True))]  # fmt: skip


def test_a_fast_version_updates_the_linear_stage_and_shares_the_transformer(registry: LocalRegistry) -> None:
    s = Settings()
    reference = reference_set(TASK, s.model.data_dir, rows=40)
    ts = select(_examples(150), -1, holdout_fraction=0.25, replay_ratio=0.0, seed=1)
    transformers = TransformerCache(registry, s.model.base_model, 64)
    cfg = FastConfig(margin=-1.0, tolerance=1.0)  # the mechanics: any candidate passes
    out = fast_candidate(TASK, LIVE, ts, reference, registry, transformers, s.model.base_model, 64, cfg,
                         recheck=True)  # fmt: skip
    m = out.manifest
    assert out.published and out.verdict.passed
    assert (m.version, m.parent_version) == (3, LIVE) and registry.versions(TASK) == [2, 3]
    parent = registry.manifest(TASK, LIVE)
    assert m.shared == {n: LIVE for n in parent.files if n not in LINEAR_FILES} and m.shared
    assert m.changed == sorted(LINEAR_FILES)
    for name in m.shared:  # one file each, not a copy
        assert (
            os.stat(registry.fetch(TASK, 3) / name).st_ino
            == os.stat(registry.fetch(TASK, LIVE) / name).st_ino
        )
    registry.verify(TASK, 3)
    t = m.training
    assert t["path"] == PATH_FAST and t["source"] == "trainer" and t["joined_seq"] == 149
    assert t["check_labels"] == 37 and t["fresh_labels"] == 75 and t["holdout_labels"] == 38
    assert t["cpu_seconds"] > 0 and t["update"]["rows"] == 75 and t["update"]["converged"]
    assert m.cascade["updated_from"] == LIVE and m.cascade["recheck"]["rows"] == 37
    assert m.cascade["rule"]["threshold"] >= parent.cascade["rule"]["threshold"]  # raised at most
    assert m.cascade["rule"]["min_coverage"] >= parent.cascade["rule"]["min_coverage"]
    assert m.gate["metric"] == "macro_f1" and m.gate["reference"]["rows"] == 40
    old, new = LinearStage.load(registry.fetch(TASK, LIVE)), LinearStage.load(registry.fetch(TASK, 3))
    assert new.training["rows"] == old.training["rows"] + 75
    assert not np.array_equal(new.predict_proba(["Runs small, lovely fabric"]),
                              old.predict_proba(["Runs small, lovely fabric"]))  # fmt: skip
    # the scorer loads and serves it like any version, from its parent's transformer (one adapter)
    runtime = ModelRuntime(s.model.base_model, registry, max_len=64)
    texts = ["The zipper broke on the first day", "Perfect fit, I love it"]
    parent = runtime.load(TASK, LIVE)
    runtime.activate(parent)
    transformer_before = runtime._transformer(parent, texts).probs
    v3 = runtime.load(TASK, 3)
    assert v3.head is parent.head and v3.name == f"{TASK}@v{LIVE}"
    runtime.activate(v3)  # the parent is released: the shared adapter stays and answers the same
    np.testing.assert_allclose(runtime._transformer(v3, texts).probs, transformer_before, rtol=1e-6)
    scored = runtime.score(TASK, texts)
    assert scored.versions.tolist() == [3, 3] and scored.probs.shape == (2, 3)
    # the next run on the new live version reuses the transformer (the same files): the reference
    # set is not scored again
    computed = transformers(m).computed
    ts2 = select(_examples(200), 149, holdout_fraction=0.25, replay_ratio=0.0, seed=1)
    out2 = fast_candidate(TASK, 3, ts2, reference, registry, transformers, s.model.base_model, 64, cfg)
    assert out2.published and out2.manifest.shared == dict.fromkeys(m.shared, 3)
    assert out2.manifest.training["transformer_texts"] == transformers(m).computed - computed
    assert out2.manifest.training["transformer_texts"] <= len(ts2.holdout)


def test_a_fast_candidate_trained_on_shuffled_labels_is_refused(registry: LocalRegistry) -> None:
    s = Settings()
    reference = reference_set(TASK, s.model.data_dir, rows=60)
    ts = select(_examples(300, shuffle=True), -1, holdout_fraction=0.25, replay_ratio=0.0, seed=1)
    cfg = FastConfig(
        margin=s.trainer.margin, tolerance=s.trainer.reference_tolerance, alpha=s.trainer.gate_alpha
    )
    transformers = TransformerCache(registry, s.model.base_model, 64)
    out = fast_candidate(TASK, LIVE, ts, reference, registry, transformers, s.model.base_model, 64, cfg)
    assert not out.published and not out.verdict.passed
    # refused for what it did on the holdout (not for an undefined metric or missing rows)
    assert out.verdict.details["holdout"]["rows"] == len(ts.holdout) > 50
    assert "lower bound" in out.verdict.reason and out.verdict.details["holdout_gain"] < 0.01
    assert registry.versions(TASK) == [LIVE]  # nothing published

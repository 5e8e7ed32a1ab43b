"""The linear stage's incremental update (``LinearStage.updated``, the trainer's fast path) on
real training-split reviews, against a refit on the same rows.

The stated bound: updated with 300 reviews on top of a 600-review parent, on 300 validation
reviews the stage agrees with a refit on all 900 on at least 93 % of labels (and more often than
the parent does), its probabilities differ from the refit's by at most 0.05 on average, and its
accuracy is within 0.03 of the refit's (measured: 0.953, 0.020 and 0.017; macro-F1 0.658 updated,
0.621 refit, 0.602 parent). The features and IDF are exactly the refit's."""

from __future__ import annotations

import numpy as np
import pytest

from streamtune.core.settings import Settings
from streamtune.datasets import loaders
from streamtune.model.linear import LinearConfig, LinearStage

CLASSES = loaders.SENTIMENTS
CONFIG = LinearConfig(n_features=2**18)
AGREEMENT_BOUND = 0.93
PROBABILITY_BOUND = 0.05  # mean absolute difference of the class probabilities
ACCURACY_BOUND = 0.03


@pytest.fixture(scope="module")
def rows() -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    sp = loaders.splits("review_sentiment", Settings().model.data_dir)
    train = [(x, y) for _, x, y in sp.train[:900]]
    return train[:600], train[600:], [(x, y) for _, x, y in sp.validation[:300]]


def _fit(rows: list[tuple[str, str]]) -> LinearStage:
    return LinearStage.fit([x for x, _ in rows], [y for _, y in rows], CLASSES, CONFIG)


@pytest.fixture(scope="module")
def parent(rows: tuple[list[tuple[str, str]], ...]) -> LinearStage:
    return _fit(rows[0])


@pytest.fixture(scope="module")
def updated(parent: LinearStage, rows: tuple[list[tuple[str, str]], ...]) -> LinearStage:
    new = rows[1]
    return parent.updated([x for x, _ in new], [y for _, y in new])


def test_an_update_comes_within_the_stated_bound_of_a_refit(
    parent: LinearStage, updated: LinearStage, rows: tuple[list[tuple[str, str]], ...]
) -> None:
    first, new, validation = rows
    refit = _fit(first + new)
    texts = [x for x, _ in validation]
    labels = {n: s.predict_proba(texts).argmax(axis=1) for n, s in
              (("parent", parent), ("updated", updated), ("refit", refit))}  # fmt: skip
    agreement = float((labels["updated"] == labels["refit"]).mean())
    assert agreement >= AGREEMENT_BOUND
    assert agreement > float((labels["parent"] == labels["refit"]).mean())  # it moved towards the refit
    probs = {n: s.predict_proba(texts) for n, s in (("updated", updated), ("refit", refit))}
    assert float(np.abs(probs["updated"] - probs["refit"]).mean()) <= PROBABILITY_BOUND
    accuracy = {n: float((labels[n] == [CLASSES.index(y) for _, y in validation]).mean()) for n in labels}
    assert abs(accuracy["updated"] - accuracy["refit"]) <= ACCURACY_BOUND
    np.testing.assert_array_equal(updated.features, refit.features)  # min_df 1: the same vocabulary
    np.testing.assert_allclose(updated.idf, refit.idf, rtol=1e-5)  # ... and exactly its IDF
    assert updated.training["rows"] == refit.training["rows"] == 900
    assert updated.training["class_counts"] == refit.training["class_counts"]
    assert updated.training["update"]["converged"]


def test_it_learns_the_new_rows_and_leaves_features_they_lack_alone(
    parent: LinearStage, updated: LinearStage, rows: tuple[list[tuple[str, str]], ...]
) -> None:
    new = rows[1]
    texts, y = [x for x, _ in new], [CLASSES.index(v) for _, v in new]

    def log_loss(stage: LinearStage) -> float:
        p = stage.predict_proba(texts)
        return float(-np.log(p[np.arange(len(y)), y]).mean())

    assert log_loss(updated) < log_loss(parent) - 0.05
    raw = parent._raw(texts)
    untouched = np.setdiff1d(parent.features, np.unique(raw.indices))
    assert len(untouched) > 1000
    at_parent = np.searchsorted(parent.features, untouched)
    at_new = np.searchsorted(updated.features, untouched)
    np.testing.assert_array_equal(updated.coef[:, at_new], parent.coef[:, at_parent])


def test_new_vocabulary_becomes_known() -> None:
    base = [("The dress fits well and the fabric is soft.", "positive"),
            ("Terrible fit, returned it.", "negative")] * 5  # fmt: skip
    stage = _fit(base)
    shoes = ["These sneakers have great arch support", "The heel snapped after a week of wearing"]
    before = stage.coverage(shoes)
    after = stage.updated(shoes, ["positive", "negative"]).coverage(shoes)
    assert np.all(before < 0.9)
    np.testing.assert_allclose(after, 1.0)


def test_a_class_the_parent_never_saw_becomes_predictable() -> None:
    sp = loaders.splits("review_sentiment", Settings().model.data_dir)
    two = [(x, y) for _, x, y in sp.train[:400] if y != "neutral"]
    stage = _fit(two)
    neutral = CLASSES.index("neutral")
    assert stage.intercept[neutral] == -np.inf
    mixed = [(x, y) for _, x, y in sp.train[400:700]]
    new = stage.updated([x for x, _ in mixed], [y for _, y in mixed])
    assert np.isfinite(new.intercept[neutral])
    assert (new.predict_proba([x for x, _ in mixed]).argmax(axis=1) == neutral).any()


def test_the_updated_stage_round_trips(updated: LinearStage, tmp_path: object) -> None:
    from pathlib import Path

    directory = Path(str(tmp_path))
    updated.save(directory)
    loaded = LinearStage.load(directory)
    texts = ["Lovely colour, runs small", "Awful stitching"]
    np.testing.assert_array_equal(loaded.predict_proba(texts), updated.predict_proba(texts))
    assert loaded.training["update"] == updated.training["update"]


def test_bad_updates_are_refused(parent: LinearStage) -> None:
    with pytest.raises(ValueError, match="as many"):
        parent.updated(["a text"], [])
    with pytest.raises(ValueError, match="not among the classes"):
        parent.updated(["a text"], ["ecstatic"])
    with pytest.raises(ValueError, match="prior_strength"):
        parent.updated(["a text"], ["positive"], prior_strength=-1.0)
    p = parent
    orphan = LinearStage(p.classes, p.config, p.features, p.idf, p.coef, p.intercept)
    with pytest.raises(ValueError, match="no training rows"):
        orphan.updated(["a text"], ["positive"])

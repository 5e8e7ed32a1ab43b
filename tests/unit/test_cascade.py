"""The cascade decision (``streamtune.model.cascade``): paths, served probabilities, and the
choice of a version's rule on validation rows."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from streamtune.core.settings import Settings
from streamtune.datasets import loaders
from streamtune.model.cascade import (
    LINEAR_ONLY,
    TRANSFORMER_ONLY,
    CascadeRule,
    ScorePath,
    choose_rule,
    combine,
    needs_transformer,
    route,
    shares,
)
from streamtune.model.linear import LinearConfig, LinearStage
from streamtune.training.metrics import classification_metrics

CLASSES = loaders.SENTIMENTS


def macro_f1(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro-F1 over the classes in ``y`` or predicted, as ``classification_metrics`` computes it
    (checked in the real-data test) but in numpy: choose_rule calls it for every rule of its grid."""
    pred = probs.argmax(axis=1)
    scores = []
    for c in np.union1d(y, pred):
        tp = np.count_nonzero((pred == c) & (y == c))
        fp = np.count_nonzero((pred == c) & (y != c))
        fn = np.count_nonzero((pred != c) & (y == c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == y))


def _random_probs(rng: np.random.Generator, n: int, k: int, y: np.ndarray, skill: float) -> np.ndarray:
    """Dirichlet noise with extra mass on the true class (``skill``: how much)."""
    p = rng.dirichlet(np.ones(k), size=n)
    p[np.arange(n), y] += skill * rng.random(n)
    out: np.ndarray = p / p.sum(axis=1, keepdims=True)
    return out


# --- route and combine -------------------------------------------------------------------------


def test_route_sends_each_event_down_its_path() -> None:
    probs = np.array(
        [[0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.95, 0.03, 0.02], [0.4, 0.4, 0.2], [0.8, 0.1, 0.1]]
    )
    coverage = np.array([0.95, 0.95, 0.50, 0.40, math.nan])
    rule = CascadeRule(threshold=0.8, weight=0.4, min_coverage=0.9)
    paths = route(probs, coverage, rule)
    # confident + in domain, unsure + in domain, confident but out of domain, both, unknown coverage
    assert paths.tolist() == [
        ScorePath.LINEAR,
        ScorePath.BLEND,
        ScorePath.TRANSFORMER,
        ScorePath.TRANSFORMER,
        ScorePath.TRANSFORMER,
    ]
    assert paths.dtype == np.int8
    assert route(probs[4:], [0.95], rule).tolist() == [
        ScorePath.BLEND
    ]  # 0.8 does not clear 0.8: strictly above
    # weight 0: the linear stage adds nothing to a blend, weight 1: the transformer adds nothing
    assert route(probs, coverage, CascadeRule(0.8, 0.0, 0.9)).tolist()[:2] == [
        ScorePath.LINEAR,
        ScorePath.TRANSFORMER,
    ]
    assert route(probs, coverage, CascadeRule(0.99, 1.0, 0.9)).tolist()[:2] == [
        ScorePath.LINEAR,
        ScorePath.LINEAR,
    ]
    assert (route(probs, coverage, TRANSFORMER_ONLY) == ScorePath.TRANSFORMER).all()
    assert route(probs, coverage, LINEAR_ONLY).tolist() == [ScorePath.LINEAR] * 4 + [ScorePath.TRANSFORMER]
    assert needs_transformer(paths).tolist() == [False, True, True, True, True]
    assert [ScorePath(int(p)).label for p in paths[:3]] == ["linear", "blend", "transformer"]
    assert shares(paths) == {"linear": 0.2, "blend": 0.2, "transformer": 0.6}


def test_the_path_depends_only_on_the_event_and_the_rule() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, size=500)
    probs = _random_probs(rng, 500, 3, y, skill=2.0)
    coverage = rng.uniform(0.7, 1.0, size=500)
    rule = CascadeRule(threshold=0.7, weight=0.5, min_coverage=0.8)
    paths = route(probs, coverage, rule)
    assert len(set(paths.tolist())) == 3  # all three paths occur
    assert np.array_equal(route(probs, coverage, rule), paths)  # same input, same paths
    one_by_one = [int(route(probs[i : i + 1], coverage[i : i + 1], rule)[0]) for i in range(500)]
    assert one_by_one == paths.tolist()  # an event's batch does not matter
    order = rng.permutation(500)
    assert np.array_equal(route(probs[order], coverage[order], rule), paths[order])
    other = CascadeRule(threshold=0.9, weight=0.5, min_coverage=0.8)  # another version's rule
    assert not np.array_equal(route(probs, coverage, other), paths)


def test_combine_serves_each_path_its_probabilities() -> None:
    lin = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]])
    tr = np.array([[math.nan, math.nan], [0.2, 0.8], [0.1, 0.9]])  # not run for the linear row
    rule = CascadeRule(threshold=0.8, weight=0.25, min_coverage=0.5)
    paths = route(lin, [0.9, 0.9, 0.1], rule)
    served = combine(paths, lin, tr, rule)
    assert np.allclose(served, [[0.9, 0.1], [0.25 * 0.6 + 0.75 * 0.2, 0.25 * 0.4 + 0.75 * 0.8], [0.1, 0.9]])
    assert np.isfinite(served).all() and np.allclose(served.sum(axis=1), 1.0)
    with pytest.raises(ValueError):
        combine(paths, lin, tr[:2], rule)
    with pytest.raises(ValueError):
        combine(np.array([0, 1, 7]), lin, tr, rule)


def test_rules_are_checked_and_round_trip_through_json_values() -> None:
    rule = CascadeRule(threshold=0.83, weight=0.4, min_coverage=0.91)
    assert CascadeRule.from_dict(rule.as_dict()) == rule
    for bad in ((1.5, 0.5, 0.5), (0.5, -0.1, 0.5), (0.5, 0.5, math.nan), (math.inf, 0.5, 0.0)):
        with pytest.raises(ValueError):
            CascadeRule(*bad)
    with pytest.raises(ValueError):
        route(np.ones((3, 2)) / 2, np.ones(2), rule)


# --- choose_rule -------------------------------------------------------------------------------


def _brute_force(
    lin: np.ndarray,
    tr: np.ndarray,
    cov: np.ndarray,
    y: np.ndarray,
    metric: object,
    thresholds: list[float],
    weights: list[float],
    min_coverage: float,
) -> tuple[float, float]:
    """(best linear share among rules at least as good as the better single model, that bound)."""
    assert callable(metric)
    bound = max(metric(y, lin), metric(y, tr))
    best = -1.0
    for t, w in itertools.product(thresholds, weights):
        rule = CascadeRule(t, w, min_coverage)
        paths = route(lin, cov, rule)
        if metric(y, combine(paths, lin, tr, rule)) >= bound - 1e-12:
            best = max(best, float(np.mean(paths == ScorePath.LINEAR)))
    return best, bound


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_choose_rule_answers_the_most_with_the_linear_stage_among_rules_that_qualify(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 400, 3
    y = rng.integers(0, k, size=n)
    lin = _random_probs(rng, n, k, y, skill=1.5)
    tr = _random_probs(rng, n, k, y, skill=1.8)
    cov = rng.uniform(0.6, 1.0, size=n)
    thresholds, weights = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], [0.0, 0.25, 0.5, 0.75, 1.0]
    rule, report = choose_rule(lin, tr, cov, y, accuracy, thresholds, weights, coverage_quantile=0.05)
    assert rule.min_coverage == pytest.approx(np.quantile(cov, 0.05))
    best_share, bound = _brute_force(lin, tr, cov, y, accuracy, thresholds, weights, rule.min_coverage)
    assert report["satisfied"] and report["metric_best_single"] == bound
    assert report["share_linear"] == best_share
    paths = route(lin, cov, rule)
    served = accuracy(y, combine(paths, lin, tr, rule))
    assert served == report["metric_cascade"] >= bound
    assert float(np.mean(paths == ScorePath.LINEAR)) == best_share
    assert report["shares"] == shares(paths) and report["candidates"] == len(thresholds) * len(weights)
    assert sum(report["shares"].values()) == pytest.approx(1.0)
    assert report["shares"]["transformer"] >= 0.05 - 1 / n  # the out-of-domain tail defers


def test_choose_rule_says_when_no_rule_qualifies() -> None:
    """The linear stage is perfect and the transformer always wrong: the rows below the
    coverage floor must go to the transformer, so no cascade matches the linear stage."""
    n = 200
    y = np.arange(n) % 2
    lin = np.eye(2)[y] * 0.9 + 0.05
    tr = np.eye(2)[1 - y] * 0.9 + 0.05
    cov = np.linspace(0.5, 1.0, n)
    rule, report = choose_rule(lin, tr, cov, y, accuracy, [0.5, 1.0], [0.0, 0.5, 1.0])
    assert not report["satisfied"]
    assert report["metric_cascade"] < report["metric_best_single"] == 1.0
    assert report["metric_cascade"] == pytest.approx(0.95, abs=0.01)  # the best there is
    assert rule.weight == 1.0
    no_floor, report0 = choose_rule(lin, tr, cov, y, accuracy, [0.5, 1.0], [0.0, 1.0], coverage_quantile=0.0)
    assert report0["satisfied"] and no_floor.min_coverage == 0.0 and report0["share_linear"] == 1.0


@pytest.fixture(scope="module")
def validation_scores() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validation rows of the real reviews, scored by two different models trained on different
    training-split rows: a linear stage and a stand-in for the transformer."""
    rows = loaders.splits("review_sentiment", Settings().model.data_dir)
    held_out_ids = {row_id for row_id, _, _ in rows.held_out}
    val = rows.validation[:300]
    assert not held_out_ids & {row_id for row_id, _, _ in val}
    texts = [x for _, x, _ in val]
    y = np.array([CLASSES.index(label) for _, _, label in val])
    a, b = rows.train[:400], rows.train[400:800]
    linear = LinearStage.fit(
        [x for _, x, _ in a], [c for _, _, c in a], CLASSES, LinearConfig(n_features=2**16)
    )
    other_cfg = LinearConfig(n_features=2**16, word_ngrams=(1, 1), char_ngrams=(3, 5), balanced=False, C=1.0)
    other = LinearStage.fit([x for _, x, _ in b], [c for _, _, c in b], CLASSES, other_cfg)
    lin, cov = linear.score(texts)
    return lin, other.predict_proba(texts), cov, y


def test_choose_rule_on_real_validation_rows_is_at_least_the_best_single_model(
    validation_scores: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    lin, tr, cov, y = validation_scores
    for probs in (lin, tr):
        assert macro_f1(y, probs) == pytest.approx(classification_metrics(list(y), probs)["macro_f1"])
    rule, report = choose_rule(lin, tr, cov, y, macro_f1)
    assert report["satisfied"] and report["validation_rows"] == len(y)
    paths = route(lin, cov, rule)
    cascade = macro_f1(y, combine(paths, lin, tr, rule))
    assert cascade == report["metric_cascade"]
    assert cascade >= max(macro_f1(y, lin), macro_f1(y, tr)) == report["metric_best_single"]
    assert report["share_linear"] == float(np.mean(paths == ScorePath.LINEAR)) > 0.0
    assert rule.min_coverage == pytest.approx(np.quantile(cov, 0.05))
    # the same validation arrays give the same rule: nothing else is looked at
    assert choose_rule(lin.copy(), tr.copy(), cov.copy(), y.copy(), macro_f1) == (rule, report)


def test_validation_rows_are_carved_from_training_never_from_held_out() -> None:
    data_dir = Settings().model.data_dir
    rows = loaders.splits("review_sentiment", data_dir, validation_percent=10)
    ids = [{r for r, _, _ in part} for part in (rows.train, rows.validation, rows.held_out)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    everything = loaders.LABELLED_ROWS["review_sentiment"](data_dir)
    assert sum(map(len, ids)) == len(everything)
    assert [x for _, x, _ in rows.held_out] == [
        x for x, _ in loaders.held_out_rows("review_sentiment", data_dir)
    ]
    share = len(ids[1]) / (len(ids[0]) + len(ids[1]))
    assert 0.08 < share < 0.12
    assert all(loaders.is_validation(r, 10) for r in ids[1])

"""The release gate's rules: a gain must be significant on the same holdout rows (paired
bootstrap), the holdout is the labels that arrived last, and the reference set has a fixed floor
(the first released version), so small losses cannot add up release after release."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamtune.core.tasks import TASKS, MetricFamily
from streamtune.training import metrics as M
from streamtune.training.online import (
    Example,
    GateVerdict,
    PairedHoldout,
    gate,
    paired_significance,
    select,
)

N = 500


def onehot(pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities that put most mass on ``pred`` (distinct per row, so no ties)."""
    p = np.full((len(pred), n_classes), 0.1 / (n_classes - 1))
    p[np.arange(len(pred)), pred] = 0.9
    return p


def changed(y: np.ndarray, pred: np.ndarray, fix: int, brk: int, n_classes: int, seed: int) -> np.ndarray:
    """``pred`` with ``fix`` of its errors corrected and ``brk`` of its hits made wrong."""
    rng = np.random.default_rng(seed)
    out = pred.copy()
    wrong, right = np.flatnonzero(pred != y), np.flatnonzero(pred == y)
    fixed = rng.choice(wrong, fix, replace=False)
    out[fixed] = y[fixed]
    broken = rng.choice(right, brk, replace=False)
    out[broken] = (y[broken] + 1) % n_classes
    return out


def accuracy_case(fix: int, brk: int, n_classes: int = 5, seed: int = 1) -> tuple[np.ndarray, PairedHoldout]:
    """500 rows; live right on 70 %; the candidate is live with ``fix`` rows fixed, ``brk`` broken."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, N)
    live = np.where(rng.random(N) < 0.7, y, (y + 1 + rng.integers(0, n_classes - 1, N)) % n_classes)
    cand = changed(y, live, fix, brk, n_classes, seed + 1)
    return y, PairedHoldout(list(y), onehot(live, n_classes), onehot(cand, n_classes))


def judge(
    task: str,
    paired: PairedHoldout | None,
    *,
    margin: float = 0.0,
    reference: tuple[float, float] = (0.8, 0.8),
    first: float | None = None,
    seed: int = 0,
) -> GateVerdict:
    """The gate on ``paired``, with the holdout metrics computed from the same rows."""
    spec = TASKS[task]
    metric = spec.gate_metric

    def metrics(probs: np.ndarray) -> dict[str, float]:
        assert paired is not None
        p = probs[:, -1] if spec.metric_family is MetricFamily.BINARY else probs
        return M.METRICS[spec.metric_family](list(paired.y), p)

    hl = metrics(paired.live) if paired is not None else {metric: 0.5}
    hc = metrics(paired.candidate) if paired is not None else {metric: 0.9}
    return gate(
        task, hl, hc, {metric: reference[0]}, {metric: reference[1]},
        margin, 0.01, len(paired.y) if paired is not None else 0, 300,
        paired=paired, alpha=0.05, reference_first=None if first is None else {metric: first},
        first_version=1, seed=seed,
    )  # fmt: skip


# --- the statistical rule -------------------------------------------------------------------


def test_a_clearly_better_candidate_on_500_rows_passes() -> None:
    _, paired = accuracy_case(fix=50, brk=10)  # +0.08 top-1
    v = judge("query_class", paired)
    assert v.passed, v.reason
    t = v.details["holdout_test"]
    assert t["gain"] == pytest.approx(0.08) and t["lower"] > 0.05
    assert t["resamples"] == 1000 and t["defined"] == 1000 and v.details["alpha"] == 0.05


def test_an_equal_candidate_does_not_pass() -> None:
    _, paired = accuracy_case(fix=0, brk=0)
    v = judge("query_class", paired)  # margin 0: the old rule (gain >= margin) released it
    assert not v.passed and "lower bound" in v.reason
    assert v.details["holdout_test"]["gain"] == 0.0 and v.details["holdout_test"]["lower"] == 0.0


def test_a_slightly_better_candidate_within_noise_does_not_pass() -> None:
    _, paired = accuracy_case(fix=6, brk=3)  # +0.006 on 500 rows: 9 rows changed, 6 for the better
    v = judge("query_class", paired)
    assert v.details["holdout_gain"] == pytest.approx(0.006)  # the old rule: 0.006 >= margin 0, released
    assert not v.passed and v.details["holdout_test"]["lower"] < 0


def test_a_better_macro_f1_passes_and_one_within_noise_does_not() -> None:
    # Review sentiment's metric is not a mean over rows: the bootstrap recomputes it per resample.
    rng = np.random.default_rng(3)
    y = rng.choice(3, N, p=[0.15, 0.1, 0.75])
    live = np.where(rng.random(N) < 0.65, y, rng.integers(0, 3, N))
    better = changed(y, live, 60, 10, 3, 4)
    noisy = changed(y, live, 5, 3, 3, 5)
    assert judge("review_sentiment", PairedHoldout(list(y), onehot(live, 3), onehot(better, 3))).passed
    v = judge("review_sentiment", PairedHoldout(list(y), onehot(live, 3), onehot(noisy, 3)))
    assert not v.passed and v.details["holdout_test"]["lower"] <= 0


def test_a_better_roc_auc_passes_and_an_equal_one_does_not() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random(N) < 0.15).astype(int)
    live = np.clip(0.3 * y + rng.normal(0.35, 0.2, N), 0, 1)
    cand = np.clip(0.6 * y + rng.normal(0.35, 0.2, N), 0, 1)

    def probs(p: np.ndarray) -> np.ndarray:
        return np.stack([1 - p, p], axis=1)

    assert judge("purchase_intent", PairedHoldout(list(y), probs(live), probs(cand))).passed
    assert not judge("purchase_intent", PairedHoldout(list(y), probs(live), probs(live.copy()))).passed


def test_a_few_rows_changed_for_the_better_are_not_evidence() -> None:
    # 50 rows, 3 fixed and none broken: the percentile bootstrap alone gives a bound above the
    # margin (most resamples hold one of the 3 rows), but three coin flips all land the same
    # way one time in eight (McNemar's exact p = 0.125). The randomisation test refuses it.
    y = np.arange(50) % 3
    live = np.where(np.arange(50) < 25, y, (y + 1) % 3)
    cand = live.copy()
    cand[25:28] = y[25:28]
    paired = PairedHoldout(list(y), onehot(live, 5), onehot(cand, 5))
    v = judge("query_class", paired, margin=0.01)
    t = v.details["holdout_test"]
    assert t["lower"] > 0.01 and t["p_value"] == pytest.approx(0.125, abs=0.03)
    assert not v.passed and "chance" in v.reason
    # A negative margin asks only "surely not worse by more than it" (the bound): no p-value.
    assert judge("query_class", paired, margin=-0.05).passed
    cand[28:34] = y[28:34]  # 9 of 9 for the better: p = 1/512
    v = judge("query_class", PairedHoldout(list(y), onehot(live, 5), onehot(cand, 5)), margin=0.01)
    assert v.passed and v.details["holdout_test"]["p_value"] < 0.01


def test_the_margin_applies_to_a_significant_gain_not_to_its_bound() -> None:
    _, paired = accuracy_case(fix=50, brk=10)  # gain 0.08, lower bound about 0.06
    lower = judge("query_class", paired).details["holdout_test"]["lower"]
    # surely better (bound > 0, p <= alpha) and by at least the margin: released, even with the
    # bound below the margin (asking the bound to clear it refused most real 2-3 point gains on
    # the holdouts a trainer has: docs/two-speeds.md)
    assert judge("query_class", paired, margin=lower + 0.005).passed
    assert judge("query_class", paired, margin=0.08).passed
    v = judge("query_class", paired, margin=0.085)  # surely better, by less than the margin
    assert not v.passed and "below the margin 0.085" in v.reason and "lower bound" in v.reason


def test_a_gain_above_the_margin_that_is_not_significant_is_refused() -> None:
    _, paired = accuracy_case(fix=9, brk=3)  # +0.012 on 500 rows: above the margin, within noise
    v = judge("query_class", paired, margin=0.01)
    assert v.details["holdout_gain"] == pytest.approx(0.012)
    assert not v.passed and v.details["holdout_test"]["p_value"] > 0.05 and "could be chance" in v.reason


def test_the_verdict_is_deterministic_with_the_seed() -> None:
    _, paired = accuracy_case(fix=12, brk=4)
    a = paired_significance("query_class", paired, alpha=0.05)
    assert paired_significance("query_class", paired, alpha=0.05) == a
    assert 0 < a.p_value < 1 and a.resamples == 1000
    assert judge("query_class", paired).details == judge("query_class", paired).details
    other = paired_significance("query_class", paired, alpha=0.05, seed=1)
    assert other.gain == a.gain and other.lower != a.lower  # the seed is what fixes the resamples


def test_noise_alone_passes_at_about_the_rate_alpha_not_four_times_in_ten() -> None:
    # Live and candidate both guess (independently of the labels): no candidate is better, yet
    # on 200 rows the raw gain reaches 0.01 about four times in ten, which the old gate released.
    # The test is calibrated: a candidate that is not better passes about alpha (5 %) of the time,
    # less with the margin on the bound (the worst case here: two unrelated models).
    passed_at_0, passed_at_margin, old_rule = 0, 0, 0
    for seed in range(100):
        rng = np.random.default_rng(100 + seed)
        y = rng.integers(0, 5, 200)
        paired = PairedHoldout(
            list(y), onehot(rng.integers(0, 5, 200), 5), onehot(rng.integers(0, 5, 200), 5)
        )
        v = judge("query_class", paired)
        passed_at_0 += v.passed
        passed_at_margin += judge("query_class", paired, margin=0.01).passed
        old_rule += v.details["holdout_gain"] >= 0.01
    assert old_rule >= 30
    assert passed_at_0 <= 10  # alpha = 0.05, one-sided: about 5 of 100
    assert passed_at_margin <= passed_at_0


def test_without_per_row_predictions_the_gate_refuses() -> None:
    v = judge("query_class", None)
    assert not v.passed and "per-row" in v.reason


def test_a_gate_on_500_rows_of_every_task_judges_the_gain_with_its_test() -> None:
    """Every task's metric family goes through the paired test (no timing asserted: the bench
    and the trainer's logs measure time)."""
    rng = np.random.default_rng(7)
    for task, n_classes in (("review_sentiment", 3), ("purchase_intent", 2), ("query_class", 188)):
        y = rng.integers(0, n_classes, N)
        live, cand = rng.dirichlet(np.ones(n_classes), N), rng.dirichlet(np.ones(n_classes), N)
        verdict = judge(task, PairedHoldout(list(y), live, cand))
        assert "holdout_test" in verdict.details and math.isfinite(verdict.details["holdout_gain"]), task


@pytest.mark.parametrize(
    ("family", "metric", "n_classes"),
    [
        (MetricFamily.CLASSIFICATION, "accuracy", 3),
        (MetricFamily.CLASSIFICATION, "macro_f1", 3),
        (MetricFamily.TOP_K, "top1", 20),
        (MetricFamily.TOP_K, "top3", 20),
        (MetricFamily.BINARY, "roc_auc", 2),
        (MetricFamily.BINARY, "pr_auc", 2),  # not vectorised: recomputed per resample
    ],
)
def test_resampled_metrics_equal_the_metrics_on_the_resampled_rows(
    family: MetricFamily, metric: str, n_classes: int
) -> None:
    rng = np.random.default_rng(11)
    n = 120
    y = rng.integers(0, n_classes, n)
    probs = np.round(rng.dirichlet(np.ones(n_classes), n), 2)  # rounded: ties among scores too
    weights = M.resample_weights(n, 5, np.random.default_rng(12))
    assert (weights.sum(axis=1) == n).all()
    got = M.resampled_metric(family, metric, list(y), probs, np.vstack([np.ones(n), weights]))
    for b, counts in enumerate([np.ones(n, dtype=int), *weights.astype(int)]):
        idx = np.repeat(np.arange(n), counts)
        p = probs[idx][:, -1] if family is MetricFamily.BINARY else probs[idx]
        assert got[b] == pytest.approx(M.METRICS[family](list(y[idx]), p)[metric], abs=1e-12)


@pytest.mark.parametrize(
    ("family", "metric", "n_classes"),
    [
        (MetricFamily.CLASSIFICATION, "accuracy", 3),
        (MetricFamily.CLASSIFICATION, "macro_f1", 3),
        (MetricFamily.TOP_K, "top1", 20),
        (MetricFamily.TOP_K, "top3", 20),
        (MetricFamily.BINARY, "roc_auc", 2),
        (MetricFamily.BINARY, "pr_auc", 2),  # not vectorised: recomputed per swap
    ],
)
def test_swapped_metrics_equal_the_metrics_of_the_mixed_predictions(
    family: MetricFamily, metric: str, n_classes: int
) -> None:
    rng = np.random.default_rng(13)
    n = 120
    y = rng.integers(0, n_classes, n)
    a, b = (np.round(rng.dirichlet(np.ones(n_classes), n), 2) for _ in range(2))
    swaps = rng.random((5, n)) < 0.5
    got = M.swapped_metric(family, metric, list(y), a, b, swaps)
    for k, row in enumerate(swaps):
        mixed = np.where(row[:, None], b, a)
        p = mixed[:, -1] if family is MetricFamily.BINARY else mixed
        assert got[k] == pytest.approx(M.METRICS[family](list(y), p)[metric], abs=1e-12)


def test_roc_auc_is_undefined_on_a_resample_without_positives() -> None:
    got = M.resampled_metric(
        MetricFamily.BINARY, "roc_auc", [0, 0, 1], np.array([0.1, 0.2, 0.9]), np.array([[2.0, 1.0, 0.0]])
    )
    assert np.isnan(got[0])


# --- the holdout: by arrival ----------------------------------------------------------------


def test_future_dated_labels_do_not_own_the_holdout() -> None:
    # Labels 0-4 arrived first but claim a timestamp years ahead; label 99 arrived last with an
    # old timestamp. The holdout is what arrived last, whatever the labels say about their time.
    def label(seq: int, ts: float) -> Example:
        return Example(f"review_sentiment:r{seq}", f"text {seq}", "positive", seq % 3, 1000 + seq, ts, seq)

    labels = [label(s, 4_000_000_000.0 if s < 5 else 1_000_000.0 + s) for s in range(99)]
    labels.append(label(99, 1.0))
    ts = select(labels, -1, holdout_fraction=0.1, replay_ratio=0.0, seed=1)
    assert [e.seq for e in ts.holdout] == list(range(90, 100))
    assert {0, 1, 2, 3, 4} <= {e.seq for e in ts.fresh}


# --- the reference set: no ratchet ----------------------------------------------------------


def test_a_chain_of_small_losses_cannot_drift_below_the_first_version() -> None:
    # Every candidate is clearly better on its holdout and within the tolerance (0.01) of its
    # parent on the reference set; checked against its parent only, each would be released and
    # the chain would sink 0.006 per release. Against the first version it stops at 0.79.
    _, better = accuracy_case(fix=50, brk=10)
    first = live = 0.80
    released, refused = [], []
    for _ in range(6):
        candidate = live - 0.006
        v = judge("query_class", better, reference=(live, candidate), first=first)
        assert candidate >= live - 0.01  # the check against live alone passes every one
        if v.passed:
            released.append(candidate)
            live = candidate
        else:
            refused.append(v)
    assert released == [pytest.approx(0.794)]
    assert len(refused) == 5 and all("first version v1" in v.reason for v in refused)
    assert refused[0].details["reference"]["first"] == {"top1": 0.80}
    assert refused[0].details["reference"]["first_version"] == 1


def test_the_check_against_live_is_kept() -> None:
    _, better = accuracy_case(fix=50, brk=10)
    v = judge("query_class", better, reference=(0.85, 0.83), first=0.80)  # above v1, below live
    assert not v.passed and "vs live" in v.reason


def test_an_undefined_first_version_score_refuses() -> None:
    _, better = accuracy_case(fix=50, brk=10)
    v = judge("query_class", better, first=float("nan"))
    assert not v.passed and "v1" in v.reason


def test_macro_f1_averages_the_classes_the_rows_contain_whatever_a_model_predicts() -> None:
    # rows without class 2 (sites without a neutral class): A says "2" once, B says "0" instead
    y = [0, 0, 1, 1]
    a, b = np.eye(3)[[0, 0, 1, 2]], np.eye(3)[[0, 0, 1, 0]]
    f1_a = M.classification_metrics(y, a)["macro_f1"]
    f1_b = M.classification_metrics(y, b)["macro_f1"]
    assert f1_a == pytest.approx((1.0 + 2 / 3) / 2) and f1_b == pytest.approx((0.8 + 2 / 3) / 2)
    # the vectorised gate metrics read the same
    ones = np.ones((1, 4))
    assert M.resampled_metric(MetricFamily.CLASSIFICATION, "macro_f1", y, a, ones)[0] == pytest.approx(f1_a)
    swapped = M.swapped_metric(
        MetricFamily.CLASSIFICATION, "macro_f1", y, a, b, np.array([[0, 0, 0, 1]], bool)
    )
    assert swapped[0] == pytest.approx(f1_b)

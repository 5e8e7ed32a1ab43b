"""Quality metrics per task, and the simple baselines every number is reported beside."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    roc_auc_score,
    top_k_accuracy_score,
)

from streamtune.core.tasks import MetricFamily


def classification_metrics(y_true: list[int], probs: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes present in ``y_true``.

    Not sklearn's default (the classes in ``y_true`` *or predicted*): on rows without a class
    (reviews from sites without a neutral one) that default scores a model 0 on the absent
    class as soon as it predicts it once, so the same model family reads 0.58 or 0.88 by how
    often it says "neutral". A wrong "neutral" still costs its row's true class its recall."""
    pred = probs.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(y_true, pred)),
        "macro_f1": float(f1_score(y_true, pred, labels=np.unique(y_true), average="macro")),
    }


def topk_metrics(y_true: list[int], probs: np.ndarray) -> dict[str, float]:
    labels = list(range(probs.shape[1]))
    return {
        "top1": float(top_k_accuracy_score(y_true, probs, k=1, labels=labels)),
        "top3": float(top_k_accuracy_score(y_true, probs, k=3, labels=labels)),
    }


def binary_metrics(y_true: list[int], p: np.ndarray) -> dict[str, float]:
    return {
        "roc_auc": float(roc_auc_score(y_true, p)),
        "pr_auc": float(average_precision_score(y_true, p)),
        "positive_rate": float(np.mean(y_true)),
    }


def majority_probs(y_train: list[int], n: int, n_classes: int) -> np.ndarray:
    """Always predict the training set's class frequencies (majority first)."""
    counts = Counter(y_train)
    prior = np.array([counts.get(c, 0) for c in range(n_classes)], dtype=float) + 1e-9
    return np.tile(prior / prior.sum(), (n, 1))


def tfidf_logreg_probs(
    x_train: list[str],
    y_train: list[int],
    x_test: list[str],
    n_classes: int,
    seed: int,
    balanced: bool = True,
) -> np.ndarray:
    """TF-IDF (word 1-2 grams + char 2-4 grams) and a logistic regression, class-balanced unless
    ``balanced`` is false."""
    return tfidf_logreg_variants(x_train, y_train, x_test, n_classes, seed, (balanced,))[0]


def tfidf_logreg_variants(
    x_train: list[str],
    y_train: list[int],
    x_test: list[str],
    n_classes: int,
    seed: int,
    balanced: tuple[bool, ...] = (True, False),
) -> list[np.ndarray]:
    """:func:`tfidf_logreg_probs` for each class weighting in ``balanced``, on TF-IDF features
    computed once (they do not depend on the weighting)."""
    from scipy.sparse import hstack

    word = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=1, sublinear_tf=True)
    xtr = hstack([word.fit_transform(x_train), char.fit_transform(x_train)]).tocsr()
    xte = hstack([word.transform(x_test), char.transform(x_test)]).tocsr()
    outs = []
    for weighted in balanced:
        clf = LogisticRegression(
            max_iter=2000, class_weight="balanced" if weighted else None, random_state=seed, C=4.0
        )
        clf.fit(xtr, y_train)
        out = np.zeros((len(x_test), n_classes))
        out[:, clf.classes_] = clf.predict_proba(xte)
        outs.append(out)
    return outs


def logreg_binary(x_train: np.ndarray, y_train: list[int], x_test: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(scaler.transform(x_train), y_train)
    p: np.ndarray = clf.predict_proba(scaler.transform(x_test))[:, 1]
    return p


# The metrics of each family, by :class:`~streamtune.core.tasks.MetricFamily`.
METRICS: dict[MetricFamily, Callable[[list[int], np.ndarray], dict[str, float]]] = {
    MetricFamily.CLASSIFICATION: classification_metrics,
    MetricFamily.TOP_K: topk_metrics,
    MetricFamily.BINARY: binary_metrics,
}


def resample_weights(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap resamples of ``n`` rows as counts: row ``b`` of the result says how often each of
    the ``n`` rows was drawn (with replacement) into resample ``b``. Counts, not index lists, so a
    metric over every resample is a few matrix products instead of a Python loop."""
    idx = rng.integers(0, n, size=(resamples, n))
    flat = (idx + np.arange(resamples)[:, None] * n).ravel()
    counts: np.ndarray = np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(float)
    return counts


def _hits_top_k(y: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    # As sklearn's top_k_accuracy_score (multiclass): stable sort, highest first.
    top = np.argsort(probs, axis=1, kind="mergesort")[:, ::-1][:, :k]
    hits: np.ndarray = (top == y[:, None]).any(axis=1).astype(float)
    return hits


def _weighted_mean(weights: np.ndarray, per_row: np.ndarray) -> np.ndarray:
    out: np.ndarray = (weights @ per_row) / weights.sum(axis=1)
    return out


def _weighted_macro_f1(weights: np.ndarray, y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 per resample, as :func:`classification_metrics`: the mean over the classes present
    in the resample's true labels of 2·TP / (2·TP + FP + FN)."""
    eye = np.eye(n_classes)
    truth, guess = eye[y], eye[pred]  # rows × classes, one-hot
    return _macro_f1_of_counts(weights @ (truth * guess), weights @ truth, weights @ guess)


def _macro_f1_of_counts(tp: np.ndarray, true_n: np.ndarray, pred_n: np.ndarray) -> np.ndarray:
    # Per class: TP, TP + FN, TP + FP (resamples × classes); classes without true rows are left out.
    denom = true_n + pred_n
    present = true_n > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    out: np.ndarray = np.divide(
        (f1 * present).sum(axis=1), present.sum(axis=1), out=np.full(tp.shape[0], np.nan),
        where=present.sum(axis=1) > 0,
    )  # fmt: skip
    return out


def _weighted_roc_auc(weights: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """ROC-AUC per resample, as sklearn's ``roc_auc_score``: the Mann-Whitney probability that a
    positive scores above a negative, ties counting one half, each row weighted by its count.
    The rows are sorted once and grouped by equal score, so each resample costs O(rows). NaN for
    a resample without positives or without negatives (undefined there)."""
    order = np.argsort(p, kind="mergesort")
    ps, ys, w = p[order], y[order], weights[:, order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # first row of each equal-score group
    pos = np.add.reduceat(w * (ys == 1), starts, axis=1)
    neg = np.add.reduceat(w * (ys == 0), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives scoring strictly lower, per group
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    pairs = n_pos * n_neg
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    out: np.ndarray = np.divide(wins, pairs, out=np.full_like(wins, np.nan), where=pairs > 0)
    return out


def resampled_metric(
    family: MetricFamily, metric: str, y_true: list[int], probs: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """``metric`` of ``family`` on every resample in ``weights`` (resamples × rows, counts from
    :func:`resample_weights`), the same number :data:`METRICS` gives on the resampled rows.

    Vectorised for the gate metrics (accuracy, top-k, macro-F1, ROC-AUC: 1000 resamples of 500
    rows in milliseconds); any other metric is recomputed resample by resample with
    :data:`METRICS` (correct, slower). NaN where the metric is undefined on a resample."""
    y = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if family is MetricFamily.BINARY and probs.ndim == 2:
        probs = probs[:, -1]
    if family is MetricFamily.CLASSIFICATION and metric == "accuracy":
        return _weighted_mean(weights, (probs.argmax(axis=1) == y).astype(float))
    if family is MetricFamily.CLASSIFICATION and metric == "macro_f1":
        return _weighted_macro_f1(weights, y, probs.argmax(axis=1), probs.shape[1])
    if family is MetricFamily.TOP_K and metric in ("top1", "top3"):
        return _weighted_mean(weights, _hits_top_k(y, probs, int(metric[3:])))
    if family is MetricFamily.BINARY and metric == "roc_auc":
        return _weighted_roc_auc(weights, y, probs)
    out = np.full(len(weights), np.nan)
    rows = np.arange(len(y))
    for b, counts in enumerate(weights.astype(int)):
        idx = np.repeat(rows, counts)
        try:
            out[b] = METRICS[family](list(y[idx]), probs[idx]).get(metric, np.nan)
        except ValueError:  # undefined on this resample
            continue
    return out


def swapped_metric(
    family: MetricFamily,
    metric: str,
    y_true: list[int],
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    swaps: np.ndarray,
) -> np.ndarray:
    """``metric`` of a model that answers each row with ``probs_a``, except the rows marked in a
    row of ``swaps`` (resamples × rows, booleans), which it answers with ``probs_b``: one value
    per row of ``swaps``. With :func:`resampled_metric`'s vectorised metrics; any other metric
    is recomputed swap by swap with :data:`METRICS`. NaN where undefined."""
    y = np.asarray(y_true, dtype=int)
    pa, pb = np.asarray(probs_a, dtype=float), np.asarray(probs_b, dtype=float)
    if family is MetricFamily.BINARY and pa.ndim == 2:
        pa, pb = pa[:, -1], pb[:, -1]
    s = swaps.astype(float)
    n = len(y)

    def mixed_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # per-row values a, b
        out: np.ndarray = (a.sum() + s @ (b - a)) / n
        return out

    if family is MetricFamily.CLASSIFICATION and metric == "accuracy":
        return mixed_mean((pa.argmax(axis=1) == y).astype(float), (pb.argmax(axis=1) == y).astype(float))
    if family is MetricFamily.TOP_K and metric in ("top1", "top3"):
        k = int(metric[3:])
        return mixed_mean(_hits_top_k(y, pa, k), _hits_top_k(y, pb, k))
    if family is MetricFamily.CLASSIFICATION and metric == "macro_f1":
        eye = np.eye(pa.shape[1])
        truth, ga, gb = eye[y], eye[pa.argmax(axis=1)], eye[pb.argmax(axis=1)]
        tp = (truth * ga).sum(axis=0) + s @ (truth * (gb - ga))
        pred_n = ga.sum(axis=0) + s @ (gb - ga)
        return _macro_f1_of_counts(tp, np.broadcast_to(truth.sum(axis=0), tp.shape), pred_n)
    if family is MetricFamily.BINARY and metric == "roc_auc":
        from scipy.stats import rankdata

        scores = np.where(swaps, pb, pa)
        ranks = rankdata(scores, axis=1)  # ties: average rank, i.e. half a win each
        n_pos = int((y == 1).sum())
        n_neg = n - n_pos
        if n_pos == 0 or n_neg == 0:
            return np.full(len(swaps), np.nan)
        auc: np.ndarray = (ranks[:, y == 1].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        return auc
    out = np.full(len(swaps), np.nan)
    for b, row in enumerate(swaps):
        mixed = np.where(row if pa.ndim == 1 else row[:, None], pb, pa)
        try:
            out[b] = METRICS[family](list(y), mixed).get(metric, np.nan)
        except ValueError:  # undefined
            continue
    return out

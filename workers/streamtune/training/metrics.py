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
    """Accuracy and macro-F1 (over the classes present in ``y_true`` or predicted)."""
    pred = probs.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(y_true, pred)),
        "macro_f1": float(f1_score(y_true, pred, average="macro")),
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
    x_train: list[str], y_train: list[int], x_test: list[str], n_classes: int, seed: int
) -> np.ndarray:
    """TF-IDF (word 1-2 grams + char 2-4 grams) and a class-balanced logistic regression."""
    from scipy.sparse import hstack

    word = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=1, sublinear_tf=True)
    xtr = hstack([word.fit_transform(x_train), char.fit_transform(x_train)]).tocsr()
    xte = hstack([word.transform(x_test), char.transform(x_test)]).tocsr()
    clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed, C=4.0)
    clf.fit(xtr, y_train)
    out = np.zeros((len(x_test), n_classes))
    out[:, clf.classes_] = clf.predict_proba(xte)
    return out


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

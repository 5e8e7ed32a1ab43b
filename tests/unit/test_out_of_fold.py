"""Out-of-fold rule choice (``training/out_of_fold.py``): the fold assignment and its guards.
The choice itself runs on the real model in ``tests/integration/test_training.py``."""

from __future__ import annotations

from collections import Counter

import pytest

from streamtune.core.tasks import TASKS
from streamtune.model.linear import LinearConfig
from streamtune.training import out_of_fold
from streamtune.training.bootstrap import TrainConfig


def test_folds_are_stable_in_range_and_roughly_even() -> None:
    texts = [f"query {i}" for i in range(2000)]
    folds = [out_of_fold.fold_of(t, 5) for t in texts]
    assert folds == [out_of_fold.fold_of(t, 5) for t in texts]  # by the text alone
    counts = Counter(folds)
    assert set(counts) == set(range(5)) and min(counts.values()) > 330
    assert out_of_fold.fold_of("same text", 5) == out_of_fold.fold_of("same text", 5)


def test_only_tasks_with_rule_folds_choose_out_of_fold() -> None:
    assert TASKS["query_class"].rule_folds >= 2 and TASKS["review_sentiment"].rule_folds == 0
    with pytest.raises(ValueError, match="rule_folds is 0"):
        out_of_fold.choose("review_sentiment", "unused", ["a"], ["x"], [0], TrainConfig(), LinearConfig(),
                           lambda y, p: {})  # fmt: skip


def test_an_empty_fold_is_an_error_not_a_silent_skip() -> None:
    with pytest.raises(ValueError, match="is empty"):
        out_of_fold.choose("query_class", "unused", ["a"], ["only one row"], [0], TrainConfig(),
                           LinearConfig(), lambda y, p: {})  # fmt: skip

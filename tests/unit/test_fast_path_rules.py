"""Pure parts of the trainer's fast path: when it runs, the cascade threshold's re-check on fresh
labels (raised only), and the shared transformer's memo."""

from __future__ import annotations

import numpy as np
import pytest

from streamtune.model.cascade import CascadeRule
from streamtune.training.fast import TransformerProbs, recheck_rule
from streamtune.training.online import fast_due


@pytest.mark.parametrize(
    ("fresh", "since", "interval", "drifted", "expected"),
    [
        (60, 61.0, 60.0, False, "interval"),
        (60, 10.0, 60.0, False, None),  # not yet
        (60, 10.0, 60.0, True, "drift"),  # a drift does not wait for the cadence
        (10, 600.0, 60.0, True, None),  # too few labels, drift or not
        (60, 600.0, 0.0, True, None),  # the fast path is off
    ],
)
def test_fast_due(fresh: int, since: float, interval: float, drifted: bool, expected: str | None) -> None:
    assert fast_due(fresh, since, interval, 50, drifted) == expected


def _rows(n_confident: int, linear_right: float, transformer_right: float, seed: int = 0) -> tuple:  # type: ignore[type-arg]
    """``n_confident`` rows the linear stage is confident on (top 0.9..0.99), and 20 it is not."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n_confident + 20)
    top = np.concatenate([np.linspace(0.9, 0.99, n_confident), np.full(20, 0.5)])
    linear = np.zeros((len(y), 3))
    transformer = np.zeros((len(y), 3))
    for i, c in enumerate(y):
        lin_c = c if rng.random() < linear_right else (c + 1) % 3
        tr_c = c if rng.random() < transformer_right else (c + 2) % 3
        linear[i] = (1 - top[i]) / 2
        linear[i, lin_c] = top[i]
        transformer[i] = 0.1
        transformer[i, tr_c] = 0.8
    return linear, np.ones(len(y)), transformer, y


RULE = CascadeRule(threshold=0.8, weight=0.5, min_coverage=0.5)


def test_a_linear_stage_as_good_as_the_transformer_keeps_its_threshold() -> None:
    linear, coverage, transformer, y = _rows(80, 0.95, 0.95)
    rule, report = recheck_rule(linear, coverage, transformer, y, RULE, slack=0.02)
    assert rule == RULE
    assert report.threshold_before == report.threshold_after == 0.8 and report.linear_rows == 80


def test_a_linear_stage_worse_than_the_transformer_on_its_rows_hands_them_over() -> None:
    linear, coverage, transformer, y = _rows(80, 0.5, 0.95)  # a shift: confidently wrong
    rule, report = recheck_rule(linear, coverage, transformer, y, RULE, slack=0.02)
    assert rule.threshold > RULE.threshold
    assert report.linear_accuracy < report.transformer_accuracy - 0.02
    # wrong everywhere, the blends of the other rows too: every row goes to the transformer alone
    assert (rule.weight, rule.min_coverage) == (0.0, 1.0) and report.admitted_rows == 0
    assert report.linear_rows < 80  # fewer events answered by the linear stage alone
    assert report.rows == 100


def test_the_recheck_never_lowers_the_threshold() -> None:
    linear, coverage, transformer, y = _rows(80, 1.0, 0.5)  # the linear stage is better
    strict = CascadeRule(threshold=0.95, weight=0.5, min_coverage=0.5)
    rule, _ = recheck_rule(linear, coverage, transformer, y, strict, slack=0.0)
    assert rule.threshold == 0.95


def test_out_of_domain_rows_are_not_the_linear_stages() -> None:
    linear, _, transformer, y = _rows(80, 0.0, 1.0)
    rule, report = recheck_rule(linear, np.zeros(len(y)), transformer, y, RULE, slack=0.0)
    assert rule == RULE and report.linear_rows == 0  # coverage below min: the transformer's anyway


def test_rows_an_update_made_known_go_back_to_the_transformer_when_the_cascade_is_worse() -> None:
    """A shift the update's vocabulary now covers: the in-domain rows (coverage 0.99) are fine,
    the newly covered ones (0.6) are where the cascade loses to the transformer."""
    linear, _, transformer, y = _rows(80, 0.95, 0.95, seed=3)
    coverage = np.full(len(y), 0.99)
    coverage[:40] = 0.6
    new_domain = np.arange(40)
    linear[new_domain] = np.roll(linear[new_domain], 1, axis=1)  # confidently wrong there
    transformer[new_domain] = 0.1
    transformer[new_domain, y[new_domain]] = 0.8  # ... where the transformer is right
    rule, report = recheck_rule(linear, coverage, transformer, y, RULE, slack=0.02)
    assert rule.min_coverage > 0.6 and report.min_coverage_before == 0.5
    assert report.served_accuracy < report.transformer_admitted_accuracy - 0.02
    assert report.admitted_rows == 60


def test_the_transformer_memo_runs_each_text_once_and_forgets_the_oldest() -> None:
    calls: list[list[str]] = []

    def predict(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts])

    memo = TransformerProbs(predict, max_texts=3)
    np.testing.assert_array_equal(memo(["a", "bb", "a"]), [[1, 1], [2, 1], [1, 1]])
    np.testing.assert_array_equal(memo(["bb", "ccc"]), [[2, 1], [3, 1]])
    assert calls == [["a", "bb"], ["ccc"]] and memo.computed == 3
    memo(["dddd"])  # a falls out (least recently used)
    memo(["a"])
    assert calls[-1] == ["a"] and memo.computed == 5

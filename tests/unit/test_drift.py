"""The drift detectors (``streamtune.drift.watch``): they fire on a synthetic shift and stay
quiet on a stationary stream of the same length, per signal, and keep versions apart."""

from __future__ import annotations

import numpy as np
import pytest

from streamtune.drift.watch import DriftWatch, Signal

SENTIMENTS = ["negative", "neutral", "positive"]
NATURAL = [0.10, 0.12, 0.78]  # the shipped reviews' mix, roughly
CRITICAL = [0.34, 0.33, 0.33]  # the demo's drifted wave


def one_hot_batches(rng: np.random.Generator, mix: list[float], n: int, batch: int = 16) -> list[np.ndarray]:
    """Served probabilities whose argmax follows ``mix``: batches of ``batch`` rows."""
    classes = rng.choice(len(mix), size=n, p=mix)
    probs = np.full((n, len(mix)), 0.1)
    probs[np.arange(n), classes] = 0.8
    return [probs[i : i + batch] for i in range(0, n, batch)]


def feed(watch: DriftWatch, batches: list[np.ndarray], version: int = 2, confidence: float | None = None):
    found = []
    for p in batches:
        lin = None if confidence is None else np.full(len(p), confidence)
        found += watch.observe("review_sentiment", np.full(len(p), version), SENTIMENTS, p, lin)
    return found


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_stationary_class_mix_raises_nothing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    assert feed(DriftWatch(), one_hot_batches(rng, NATURAL, 4000)) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_class_mix_shift_is_detected_soon_after_its_onset(seed: int) -> None:
    rng = np.random.default_rng(seed)
    watch = DriftWatch()
    assert feed(watch, one_hot_batches(rng, NATURAL, 2000)) == []  # same length before, quiet
    found = feed(watch, one_hot_batches(rng, CRITICAL, 2000))
    shares = [d for d in found if d.signal is Signal.CLASS_SHARE]
    assert shares, "no class-share detection after the shift"
    first = shares[0]
    assert first.observations - 2000 <= 400  # within 400 events of the onset
    positive = [d for d in shares if d.detail == "positive"]
    assert positive and positive[0].before > 0.7 > positive[0].after  # the positive share fell
    assert watch.detections("review_sentiment") == len(found) and watch.last("review_sentiment") is not None


def test_a_confidence_shift_is_detected_and_a_steady_one_is_not() -> None:
    rng = np.random.default_rng(7)
    watch = DriftWatch()
    p = one_hot_batches(rng, NATURAL, 3000)
    high = [np.clip(rng.normal(0.9, 0.05, len(b)), 0, 1) for b in p]
    low = [np.clip(rng.normal(0.6, 0.05, len(b)), 0, 1) for b in p]
    quiet = []
    for b, c in zip(p, high, strict=True):
        quiet += watch.observe("review_sentiment", np.full(len(b), 2), SENTIMENTS, b, c)
    assert [d for d in quiet if d.signal is Signal.CONFIDENCE] == []
    shifted = []
    for b, c in zip(p, low, strict=True):
        shifted += watch.observe("review_sentiment", np.full(len(b), 2), SENTIMENTS, b, c)
    conf = [d for d in shifted if d.signal is Signal.CONFIDENCE]
    assert conf and conf[0].detail == "linear" and conf[0].before > 0.85 and conf[0].after < conf[0].before
    assert conf[0].observations - 3000 <= 200  # soon after the onset


def test_an_error_rate_rise_is_detected_per_version() -> None:
    rng = np.random.default_rng(11)
    watch = DriftWatch()
    assert watch.observe_errors("review_sentiment", 2, rng.random(3000) < 0.15) == []
    found = watch.observe_errors("review_sentiment", 2, rng.random(3000) < 0.40)
    assert found and found[0].signal is Signal.ERROR_RATE and found[0].after > found[0].before
    # another version starts from its own detector: its first errors are not a change
    assert watch.observe_errors("review_sentiment", 3, rng.random(500) < 0.40) == []


def test_a_new_version_is_not_drift() -> None:
    """A canary answering another mix than live is a different model, not a data change."""
    rng = np.random.default_rng(5)
    watch = DriftWatch()
    live = one_hot_batches(rng, NATURAL, 3000)
    canary = one_hot_batches(rng, CRITICAL, 3000)
    found = []
    for a, b in zip(live, canary, strict=True):
        rows = np.concatenate([a, b])
        versions = np.array([2] * len(a) + [3] * len(b))
        found += watch.observe("review_sentiment", versions, SENTIMENTS, rows)
    assert found == []


def test_many_classes_watch_confidence_only_and_binary_tasks_one_share() -> None:
    rng = np.random.default_rng(3)
    watch = DriftWatch(max_classes=10)
    names = [f"c{i}" for i in range(188)]
    probs = rng.dirichlet(np.ones(188), size=64)
    watch.observe("query_class", np.full(64, 2), names, probs)
    keys = {(s, d) for (t, _, s, d) in watch._detectors if t == "query_class"}
    assert keys == {(Signal.CONFIDENCE, "served")}
    watch.observe("purchase_intent", np.full(64, 2), ["no_purchase", "purchase"], rng.random((64, 1)))
    keys = {(s, d) for (t, _, s, d) in watch._detectors if t == "purchase_intent"}
    assert keys == {(Signal.CLASS_SHARE, "purchase"), (Signal.CONFIDENCE, "served")}

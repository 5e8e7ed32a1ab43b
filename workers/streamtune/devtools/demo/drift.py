"""A drifted review stream for the online-learning demo and benchmark: a "critical wave".

Version 1 learnt the natural mix of the reviews data set (78% positive, 11% neutral, 11%
negative). The wave is class-balanced (a third of each), so the share of critical reviews
triples. Rows come from one side of the fixed train / held-out split, so the benchmark trains
on one and measures on the other; rows version 1 trained on are left out of the training side.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from streamtune.core.tasks import REVIEW
from streamtune.datasets import loaders as data

Split = Literal["train", "held_out"]


def critical_wave(
    data_dir: Path, split: Split, seed: int = 21, exclude_texts: frozenset[str] = frozenset()
) -> list[data.Review]:
    """Class-balanced reviews of one split, interleaved by class, deterministic for a seed."""
    pct = data.HELD_OUT_PERCENT[REVIEW.name]
    rows = [
        r
        for r in data.load_reviews(data_dir)
        if data.is_held_out(r.review_id, pct) == (split == "held_out") and r.model_text() not in exclude_texts
    ]
    rng = random.Random(seed)
    by_class = {c: [r for r in rows if r.label == c] for c in data.SENTIMENTS}
    n = min(len(v) for v in by_class.values())
    for v in by_class.values():
        rng.shuffle(v)
    out = [by_class[c][i] for i in range(n) for c in data.SENTIMENTS]
    # Interleaved by class, then lightly shuffled in blocks so the order carries no signal.
    blocks = [out[i : i + 30] for i in range(0, len(out), 30)]
    for b in blocks:
        rng.shuffle(b)
    return [r for b in blocks for r in b]

"""The scorer's drift detectors on the shipped reviews, without a stack (docs/drift.md).

    PYTHONPATH=workers nice -n 19 python -m streamtune.devtools.drift_experiment [--version 2]

Replays the first ``--natural`` reviews in file order, then ``--critical`` reviews of the demo's
drifted wave (``devtools/demo/drift.py``), through the linear stage of ``review_sentiment``
v``--version`` in batches of 16, feeding :class:`~streamtune.drift.watch.DriftWatch` what the
stage answers, as the scorer feeds it what a version serves. Prints each phase's detections.
"""

from __future__ import annotations

import argparse

import numpy as np

from streamtune.core.settings import Settings
from streamtune.core.tasks import REVIEW
from streamtune.datasets import loaders as data
from streamtune.devtools.demo.drift import critical_wave
from streamtune.drift.watch import DriftWatch
from streamtune.model.linear import LinearStage
from streamtune.rollout.registry import LocalRegistry

TASK = REVIEW.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", type=int, default=2)
    ap.add_argument("--natural", type=int, default=3000)
    ap.add_argument("--critical", type=int, default=1500)
    args = ap.parse_args()
    s = Settings()
    stage = LinearStage.load(LocalRegistry(s.model.adapter_dir).fetch(TASK, args.version))
    phases = {
        "natural": [r.text for r in data.load_reviews(s.model.data_dir)][: args.natural],
        "critical": [r.text for r in critical_wave(s.model.data_dir, "train")][: args.critical],
    }
    watch = DriftWatch(delta=s.drift.delta, grace=s.drift.grace)
    seen = 0
    for phase, texts in phases.items():
        found = []
        for i in range(0, len(texts), 16):
            probs, _ = stage.score(texts[i : i + 16])
            versions = np.full(len(probs), args.version)
            found += watch.observe(TASK, versions, list(stage.classes), probs, probs.max(axis=1))
        print(f"{phase} ({len(texts)} reviews from observation {seen + 1}):")
        for d in found:
            print(f"  at observation {d.observations}: {d.describe()}")
        if not found:
            print("  no detection")
        seen += len(texts)


if __name__ == "__main__":
    main()

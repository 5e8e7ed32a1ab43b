"""What the model returns for one batch: plain data the encoders read (no torch, no ONNX)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

# A result's answer path by its code (``streamtune.model.cascade.ScorePath``): the one list of names.
ANSWER_PATHS: tuple[Literal["linear"], Literal["blend"], Literal["transformer"]] = (
    "linear",
    "blend",
    "transformer",
)


@dataclass(frozen=True, slots=True)
class Shadow:
    """How a candidate scored the rows the live version answered (not published)."""

    version: int
    rows: int
    agreement: float  # share of rows where both pick the same label
    confidence: float  # the candidate's mean top probability


@dataclass(frozen=True, slots=True)
class Scored:
    """Class probabilities of one batch and, per row, the adapter version that produced them."""

    task: str
    labels: list[str]
    probs: np.ndarray  # [batch, classes]; purchase_intent: [batch, 1] probability of buying
    versions: np.ndarray  # [batch] int
    shadow: Shadow | None = None
    # text tasks: the ScorePath code (int8) of each row: which model(s) answered it
    paths: np.ndarray | None = None
    # review_sentiment with a linear stage: per row, the terms that pushed hardest towards its
    # label (None for the rows of a version without one, in a batch split by a canary)
    reasons: list[list[tuple[str, float]] | None] | None = None
    # versions with a linear stage: its top probability per row (NaN for the rows of a version
    # without one); what the drift detectors watch (``streamtune.drift``)
    linear_confidence: np.ndarray | None = None

    @property
    def version(self) -> int:
        """The one version of the batch (raises when a canary split it)."""
        unique = set(self.versions.tolist())
        if len(unique) != 1:
            raise ValueError(f"batch scored by several versions: {sorted(unique)}")
        return int(self.versions[0])

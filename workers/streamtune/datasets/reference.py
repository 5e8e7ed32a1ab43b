"""The fixed reference set of a task: a seeded sample of the shipped data's held-out split.

Both sides use it: the trainer's gate (a candidate must not forget it) and the ONNX export's
agreement gate (an exported graph must answer it like torch). So it lives here, below both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamtune.datasets.loaders import held_out_rows


def input_key(x: str | list[float]) -> str | tuple[float, ...]:
    """Identity of a model input, to keep reference-set inputs out of training (texts as they
    are; session feature vectors rounded, since a replayed session re-adds its page views)."""
    return x if isinstance(x, str) else tuple(round(v, 3) for v in x)


@dataclass(frozen=True)
class Reference:
    """The fixed reference set of a task: rows of the shipped data's held-out split."""

    x: list[Any]
    y: list[str]

    @property
    def keys(self) -> frozenset[str | tuple[float, ...]]:
        """Input identities the trainer must never train on."""
        return frozenset(input_key(v) for v in self.x)


def reference_set(task: str, data_dir: Path, rows: int, seed: int = 13) -> Reference:
    """A seeded sample of the held-out split (never used for training by any command)."""
    held = held_out_rows(task, data_dir)
    idx = sorted(random.Random(seed).sample(range(len(held)), min(rows, len(held))))
    return Reference([held[i][0] for i in idx], [held[i][1] for i in idx])

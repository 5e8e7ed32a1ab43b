"""Boosted trees beside the click MLP: a scikit-learn ``HistGradientBoostingClassifier`` exported
to ONNX, served by ONNX Runtime (no torch, no pickle) and blended with the MLP's probability.

* **Files.** :data:`TREES_MODEL` (the ONNX graph: session feature rows in, class probabilities
  out) and :data:`TREES_META` (JSON: format version, the feature columns it reads, the blend
  weight, the estimator's parameters, a training record). In a version directory the registry's
  manifest checksums both like every other file, so a tampered one is refused by ``verify``.
* **Serving.** ``served = weight × trees + (1 − weight) × MLP``; the weight is chosen on
  validation rows by ``streamtune train`` (:func:`choose_weight`). Online LoRA updates of the
  MLP keep the parent's trees unchanged.
* **Export.** :func:`export` converts with skl2onnx through :mod:`streamtune.model.skl2onnx_compat`
  and refuses a graph whose probabilities differ from scikit-learn's on the given rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamtune.core.errors import AdapterError

TREES_MODEL = "trees.onnx"
TREES_META = "trees.json"
FORMAT = "streamtune-trees"
FORMAT_VERSION = 1
# Largest difference from scikit-learn's probabilities an export may show (float32 graph).
EXPORT_TOLERANCE = 1e-4
DEFAULT_WEIGHTS = tuple(i / 10 for i in range(11))


def blend(mlp: np.ndarray, trees: np.ndarray, weight: float) -> np.ndarray:
    """What a click version with trees serves: ``weight × trees + (1 − weight) × mlp``."""
    out: np.ndarray = (weight * np.asarray(trees) + (1.0 - weight) * np.asarray(mlp)).astype(np.float32)
    return out


def choose_weight(
    mlp_val: np.ndarray,
    trees_val: np.ndarray,
    y_val: Sequence[int],
    metric: Callable[[Sequence[int], np.ndarray], float],
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> tuple[float, dict[str, float]]:
    """The blend weight with the best ``metric`` on validation rows (the lower weight on a tie),
    and each weight's metric, for the manifest."""
    scores = {f"{w:.2f}": float(metric(y_val, blend(mlp_val, trees_val, w))) for w in weights}
    best = max(weights, key=lambda w: (scores[f"{w:.2f}"], -w))
    return float(best), scores


class TreeStage:
    """A loaded tree model: its ONNX Runtime session, the columns it reads and its weight."""

    def __init__(self, session: Any, dim: int, weight: float, meta: dict[str, Any]) -> None:
        self.session = session
        self.dim = dim
        self.weight = weight
        self.meta = meta
        self._input = session.get_inputs()[0].name

    def predict(self, rows: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """Purchase probability per session row (its first :attr:`dim` columns), shape [rows]."""
        x = np.asarray(rows, dtype=np.float32)[:, : self.dim]
        try:
            probs = self.session.run(["probabilities"], {self._input: np.ascontiguousarray(x)})[0]
        except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
            raise AdapterError(f"trees: ONNX Runtime run failed: {e}") from e
        out: np.ndarray = np.asarray(probs, dtype=np.float32)[:, 1]
        return out

    @classmethod
    def load(cls, path: Path, threads: int = 1, spinning: bool = True) -> TreeStage:
        """The trees of the version directory ``path``, in a session built as every served graph
        is (``onnx_session.session``: ``threads``, ``spinning``); :class:`AdapterError` on a file
        that is missing, of another format or not a graph ONNX Runtime accepts."""
        from streamtune.model.onnx_session import session

        where = f"{path}/{TREES_META}"
        try:
            meta = json.loads((path / TREES_META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise AdapterError(f"{where}: unreadable: {e}") from e
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise AdapterError(f"{where}: not {FORMAT} version {FORMAT_VERSION}")
        weight, dim = meta.get("weight"), meta.get("dim")
        if not isinstance(weight, float | int) or not 0 <= weight <= 1 or not isinstance(dim, int) or dim < 1:
            raise AdapterError(f"{where}: weight must be in [0, 1] and dim a positive integer")
        try:
            sess = session(path / TREES_MODEL, threads, spinning)
        except AdapterError as e:
            raise AdapterError(f"{path}/{TREES_MODEL}: ONNX Runtime refused it: {e}") from e
        return cls(sess, dim, float(weight), meta)


def fit(x: np.ndarray, y: Sequence[int], seed: int) -> Any:
    """Gradient-boosted trees with scikit-learn's defaults (the issue's bar), seeded."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(random_state=seed).fit(x, np.asarray(y))


def export(model: Any, x_check: np.ndarray, weight: float, build: Path, record: dict[str, Any]) -> None:
    """Write :data:`TREES_MODEL` and :data:`TREES_META` for ``model`` into ``build``, after
    checking the graph against scikit-learn on ``x_check``."""
    import onnxruntime as ort

    from streamtune.model.skl2onnx_compat import hist_gradient_boosting_to_onnx

    dim = int(x_check.shape[1])
    graph = hist_gradient_boosting_to_onnx(model, dim)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = TreeStage(session, dim, weight, {}).predict(x_check)
    want = model.predict_proba(x_check)[:, 1]
    diff = float(np.max(np.abs(got - want))) if len(want) else 0.0
    if diff > EXPORT_TOLERANCE:
        raise AdapterError(f"trees: the ONNX graph differs from scikit-learn by {diff:.2e}")
    (build / TREES_MODEL).write_bytes(graph)
    params = {k: v for k, v in model.get_params().items() if isinstance(v, int | float | str | bool | None)}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dim": dim,
        "weight": weight,
        "estimator": type(model).__name__,
        "params": params,
        "export_max_abs_diff": diff,
        "training": record,
    }
    (build / TREES_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")

"""Every workaround for skl2onnx in one place (see docs/skl2onnx-workarounds.md).

**Leaf flags as booleans.** skl2onnx 1.20.0's ``add_tree_to_attribute_pairs_hist_gradient_boosting``
(``skl2onnx/common/tree_ensemble.py``) passes ``nodes_missing_value_tracks_true=False`` (a Python
bool) for every leaf of a ``HistGradientBoosting*`` tree. onnx 1.23's ``helper.make_attribute``
refuses a bool in an INTS attribute ("Expected an int, got a boolean"), so converting any
``HistGradientBoostingClassifier`` fails. :func:`hist_gradient_boosting_to_onnx` converts with
``tree_ensemble.add_node`` wrapped, for the duration of the call only, to pass that flag as an
int (``0``/``1``: what the ONNX attribute means). Branch nodes keep the learned
``missing_go_to_left``; our features are never NaN anyway (``core/features.py``).

``tests/unit/test_skl2onnx_compat.py`` converts without the wrapper and expects this exact
failure: once an upgrade fixes it, that test fails and this module can go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from streamtune.core.errors import AdapterError

PATCHED = "skl2onnx.common.tree_ensemble.add_node"  # what the workaround wraps


@contextlib.contextmanager
def _int_missing_flags() -> Iterator[None]:
    import skl2onnx.common.tree_ensemble as te

    original = te.add_node

    def add_node(*args: Any, **kwargs: Any) -> Any:
        flag = kwargs.get("nodes_missing_value_tracks_true")
        if flag is not None:
            kwargs["nodes_missing_value_tracks_true"] = int(flag)
        return original(*args, **kwargs)

    te.add_node = add_node
    try:
        yield
    finally:
        te.add_node = original


def convert(model: Any, dim: int) -> bytes:
    """skl2onnx's conversion of ``model`` for float rows of ``dim`` columns, probabilities as a
    plain tensor (no ZipMap), without the workaround (the contract test calls this)."""
    import numpy as np
    from skl2onnx import to_onnx

    sample = np.zeros((1, dim), dtype=np.float32)
    graph = to_onnx(model, sample, options={id(model): {"zipmap": False}})
    out: bytes = graph.SerializeToString()
    return out


def hist_gradient_boosting_to_onnx(model: Any, dim: int) -> bytes:
    """The serialized ONNX graph of a fitted ``HistGradientBoostingClassifier``: input ``X``
    [rows, ``dim``] float32; outputs ``label`` and ``probabilities`` [rows, classes]."""
    try:
        with _int_missing_flags():
            return convert(model, dim)
    except Exception as e:
        raise AdapterError(f"trees: skl2onnx could not convert {type(model).__name__}: {str(e)[:300]}") from e

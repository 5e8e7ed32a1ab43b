"""Running exported graphs in ONNX Runtime (torch-free: see :mod:`streamtune.model.tokens`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamtune.core.errors import AdapterError
from streamtune.model.tokens import TextBatcher

ONNX_BACKENDS = ("onnx-fp32", "onnx-int8")
MODEL_FILE = "model.onnx"
CLICK_BACKEND = "onnx-fp32"  # the click MLP, when it runs in ONNX Runtime (tiny: never quantized)


@dataclass(frozen=True)
class OnnxOptions:
    threads: int = 0  # ONNX Runtime intra-op threads (0: ORT's default, one per core)
    batch_size: int = 16


def session(path: Path, threads: int, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session with deliberate thread counts (intra-op ``threads``, one
    inter-op thread: batches run one at a time on the scorer's model thread).

    ``spinning``: ORT's intra-op workers busy-wait for work between runs (its default). That
    saves a wake-up per run but burns the core the event loop needs between batches; off, they
    sleep."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise AdapterError(f"ONNX Runtime cannot load {path}: {e}") from e


def run_text(sess: Any, batcher: TextBatcher, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """Class probabilities for ``texts`` (length-sorted chunks inside), in input order."""
    out: np.ndarray | None = None
    for rows, ids, mask in batcher.chunks(texts, batch_size):
        probs = _run(sess, {"input_ids": ids, "attention_mask": mask})
        if out is None:
            out = np.zeros((len(texts), probs.shape[1]), dtype=np.float32)
        out[rows] = probs
    assert out is not None, "no texts"
    return out


def run_click(sess: Any, rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Purchase probability per session row, shape [rows, 1]. A graph with a fixed, narrower
    input (exported before derived feature columns were appended: ``core/features.py``) reads
    the leading columns it was exported with, as ``ClickNet`` itself does."""
    x = np.asarray(rows, dtype=np.float32)
    width = sess.get_inputs()[0].shape[-1]
    if isinstance(width, int) and x.ndim == 2 and x.shape[1] > width:
        x = x[:, :width]
    return np.asarray(_run(sess, {"x": x}), dtype=np.float32).reshape(len(rows), 1)


def _run(sess: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    try:
        out: np.ndarray = sess.run(None, feeds)[0]
    except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
        raise AdapterError(f"ONNX Runtime run failed: {e}") from e
    return out

"""Export an adapter version to ONNX Runtime: merge, export, fuse, quantize, gate, publish.

For one text adapter version and one ONNX backend:

1. merge the LoRA weights into a copy of the base encoder (peft ``merge_and_unload``) and wrap
   encoder + mean pooling + head + softmax into one module, so one graph maps tokens to labels;
2. export it (TorchScript exporter, eager attention, dynamic batch and sequence axes) and run
   ONNX Runtime's BERT optimizer (fused attention, skip layer-norm, bias-GELU);
3. ``onnx-int8``: dynamic quantization with per-channel int8 weights. BERT's feed-forward output
   projections carry large activation outliers that per-tensor activation scales cannot hold, so
   the plans tried in order keep more of them in fp32 until the labels agree (see ``INT8_PLANS``);
4. gate: the artifact's labels must equal torch fp32's on ``min_agreement`` of an evaluation slice
   (the held-out split); the agreement and what stayed fp32 are recorded either way, and only a
   passing artifact carries a model file.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from streamtune.errors import AdapterError
from streamtune.model.encoder import Head, base_model_sha256, load_base, mean_pool, sorted_batches
from streamtune.registry import Artifact, LocalRegistry
from streamtune.settings import Settings

log = structlog.get_logger(__name__)

ONNX_BACKENDS = ("onnx-fp32", "onnx-int8")
MODEL_FILE = "model.onnx"


def _ffn_out(name: str) -> bool:
    return "/output/dense/" in name and "/attention/" not in name


def _attn_out(name: str) -> bool:
    return "/attention/output/dense/" in name


# Which quantizable nodes stay fp32, tried in order until the gate passes (cheapest first).
INT8_PLANS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("all-int8", lambda name: False),
    ("ffn-out-fp32", _ffn_out),
    ("ffn-out+attn-out-fp32", lambda name: _ffn_out(name) or _attn_out(name)),
)


class TextClassifier(nn.Module):
    """Encoder (adapter merged) + mean pooling + head + softmax: tokens in, probabilities out."""

    def __init__(self, encoder: nn.Module, head: Head) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return torch.softmax(self.head.linear(mean_pool(hidden, attention_mask)), dim=-1)


@dataclass(frozen=True)
class OnnxOptions:
    threads: int = 0  # ONNX Runtime intra-op threads (0: ORT's default, one per core)
    batch_size: int = 16
    max_len: int = 128


def session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session with deliberate thread counts (intra-op ``threads``, one
    inter-op thread: batches run one at a time on the scorer's model thread)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise AdapterError(f"ONNX Runtime cannot load {path}: {e}") from e


def run_session(sess: Any, tokenizer: Any, texts: Sequence[str], opts: OnnxOptions) -> np.ndarray:
    """Probabilities for ``texts``, length-sorted chunks, in input order."""
    out: np.ndarray | None = None
    for rows, batch in sorted_batches(tokenizer, list(texts), opts.max_len, opts.batch_size, tensors="np"):
        probs = sess.run(
            None,
            {
                "input_ids": batch["input_ids"].astype(np.int64),
                "attention_mask": batch["attention_mask"].astype(np.int64),
            },
        )[0]
        if out is None:
            out = np.zeros((len(texts), probs.shape[1]), dtype=np.float32)
        out[rows] = probs
    assert out is not None
    return out


def _torch_probs(
    model: TextClassifier, tokenizer: Any, texts: Sequence[str], opts: OnnxOptions
) -> np.ndarray:
    out: np.ndarray | None = None
    with torch.inference_mode():
        for rows, batch in sorted_batches(tokenizer, list(texts), opts.max_len, opts.batch_size):
            probs = model(batch["input_ids"], batch["attention_mask"]).numpy()
            if out is None:
                out = np.zeros((len(texts), probs.shape[1]), dtype=np.float32)
            out[rows] = probs
    assert out is not None
    return out


def _export_fp32(model: TextClassifier, tokenizer: Any, work: Path) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    raw, fused = work / "raw.onnx", work / "fused.onnx"
    sample = tokenizer(["an example", "a slightly longer example text"], padding=True, return_tensors="pt")
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "probs": {0: "batch"},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (sample["input_ids"], sample["attention_mask"]),
            str(raw),
            input_names=["input_ids", "attention_mask"],
            output_names=["probs"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    cfg: Any = getattr(model.encoder, "config")  # noqa: B009 (a transformers config)
    opt = optimize_model(
        str(raw),
        model_type="bert",
        num_heads=cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
        opt_level=1,
    )
    opt.save_model_to_file(str(fused))
    return fused


def _quantize(fused: Path, out: Path, keep_fp32: Callable[[str], bool]) -> list[str]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = [
        n.name for n in onnx.load(str(fused), load_external_data=False).graph.node if n.op_type == "MatMul"
    ]
    excluded = [n for n in names if keep_fp32(n)]
    quantize_dynamic(
        str(fused),
        str(out),
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # fused ops lack shape info
    )
    return excluded


def export_artifact(
    registry: LocalRegistry,
    base_path: str,
    task: str,
    version: int,
    backend: str,
    eval_texts: Sequence[str],
    min_agreement: float = 0.99,
    opts: OnnxOptions | None = None,
) -> Artifact:
    """Export, gate and publish the ``backend`` artifact of a text adapter version.

    Returns the published record (``passed`` false when every plan missed the gate; then no
    model file is stored). Raises :class:`AdapterError` for versions that cannot be exported.
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    if backend not in ONNX_BACKENDS:
        raise AdapterError(f"no export for backend {backend!r} (exportable: {', '.join(ONNX_BACKENDS)})")
    opts = opts or OnnxOptions()
    manifest = registry.verify(task, version, base_sha256=base_model_sha256(base_path))
    if manifest.kind != "text-lora":
        raise AdapterError(
            f"{task} v{version}: only text adapters are exported (the click MLP runs in torch)"
        )
    if not eval_texts:
        raise AdapterError(f"{task}: empty evaluation slice")
    started = time.monotonic()
    path = registry.fetch(task, version)
    tokenizer, base = load_base(base_path)
    try:
        merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        weights = load_file(str(path / "head.safetensors"))
    except Exception as e:  # peft/safetensors raise many types for corrupt files
        raise AdapterError(f"{task} v{version}: cannot load for export: {e}") from e
    head = Head(weights["linear.weight"].shape[1], weights["linear.weight"].shape[0])
    head.load_state_dict(weights)
    model = TextClassifier(merged, head).eval()
    reference = _torch_probs(model, tokenizer, eval_texts, opts).argmax(1)
    plans = INT8_PLANS if backend == "onnx-int8" else (("fp32", lambda name: True),)
    tried: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="streamtune-export-") as tmp:
        work = Path(tmp)
        fused = _export_fp32(model, tokenizer, work)
        build = work / "build"
        build.mkdir()
        best: tuple[float, str, list[str]] = (-1.0, "", [])
        for plan, keep_fp32 in plans:
            candidate = work / f"{plan}.onnx"
            if backend == "onnx-fp32":
                fused.rename(candidate)
                excluded: list[str] = []
            else:
                excluded = _quantize(fused, candidate, keep_fp32)
            labels = run_session(session(candidate, opts.threads), tokenizer, eval_texts, opts).argmax(1)
            agreement = float((labels == reference).mean())
            tried.append({"plan": plan, "agreement": agreement, "fp32_nodes": len(excluded)})
            log.info(
                "export_plan", task=task, version=version, backend=backend, plan=plan, agreement=agreement
            )
            if agreement > best[0]:
                best = (agreement, plan, excluded)
                for old in build.iterdir():
                    old.unlink()
                candidate.rename(build / MODEL_FILE)
            if agreement >= min_agreement:
                break
        agreement, plan, excluded = best
        art = Artifact(
            task=manifest.task,
            version=version,
            backend=backend,
            manifest_sha256=registry.manifest_sha256(task, version),
            created_at=datetime.now(UTC),
            agreement=agreement,
            eval_rows=len(eval_texts),
            min_agreement=min_agreement,
            passed=agreement >= min_agreement,
            fp32_nodes=excluded,
            details={
                "plan": plan,
                "plans_tried": tried,
                "quantization": "dynamic, per-channel int8 weights, uint8 activations"
                if backend == "onnx-int8"
                else "none",
                "graph": "ORT BERT optimizer: fused attention, skip layer-norm, bias-GELU",
                "seconds": round(time.monotonic() - started, 1),
            },
        )
        published = registry.publish_artifact(build, art)
    log.info("export_done", task=task, version=version, backend=backend, passed=published.passed,
             agreement=round(agreement, 4), plan=plan, seconds=published.details["seconds"])  # fmt: skip
    return published


def export_for(
    settings: Settings, registry: LocalRegistry, task: str, version: int, backend: str
) -> Artifact:
    """:func:`export_artifact` with the deployment's settings; the evaluation slice is the task's
    fixed reference set (held-out split of the shipped data, never trained on)."""
    from streamtune.training.candidate import reference_set

    texts = [str(x) for x in reference_set(task, settings.data_dir, settings.export_eval_rows).x]
    opts = OnnxOptions(settings.torch_threads, settings.model_batch_size_for(task), settings.max_seq_len)
    return export_artifact(
        registry, settings.base_model, task, version, backend, texts, settings.onnx_min_agreement, opts
    )


def ensure_artifact(settings: Settings, registry: LocalRegistry, task: str, version: int) -> Artifact | None:
    """Export the artifact ``task`` v``version`` needs under the configured backend, if it has
    none yet (None: the task runs in torch). A refused record is returned as is, not retried."""
    backend = settings.backend_for(task)
    if backend not in ONNX_BACKENDS:
        return None
    existing = registry.artifact(task, version, backend)
    if existing is not None:
        return existing
    try:
        return export_for(settings, registry, task, version, backend)
    except AdapterError:
        raced = registry.artifact(task, version, backend)  # another worker published it meanwhile
        if raced is not None:
            return raced
        raise

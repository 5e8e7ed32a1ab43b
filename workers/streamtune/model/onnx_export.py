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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from streamtune.core.errors import AdapterError
from streamtune.core.settings import Settings
from streamtune.datasets.reference import reference_set
from streamtune.model.encoder import Head, base_model_sha256, load_base, mean_pool
from streamtune.model.onnx_session import (
    CLICK_BACKEND,
    MODEL_FILE,
    ONNX_BACKENDS,
    OnnxOptions,
    run_click,
    run_text,
    session,
)
from streamtune.model.tokens import TextBatcher
from streamtune.rollout.registry import AdapterStore, Artifact, Manifest

log = structlog.get_logger(__name__)


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


class ClickProbability(nn.Module):
    """The click MLP (adapter merged) with its sigmoid: features in, purchase probability out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x)).unsqueeze(-1)


def _torch_probs(model: nn.Module, batcher: TextBatcher, texts: Sequence[str], batch_size: int) -> np.ndarray:
    out: np.ndarray | None = None
    with torch.inference_mode():
        for rows, ids, mask in batcher.chunks(texts, batch_size):
            probs = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            if out is None:
                out = np.zeros((len(texts), probs.shape[1]), dtype=np.float32)
            out[rows] = probs
    assert out is not None
    return out


def _decide(probs: np.ndarray) -> np.ndarray:
    """Chosen label per row (a single column is a probability: threshold 0.5)."""
    return (probs[:, 0] >= 0.5).astype(np.int64) if probs.shape[1] == 1 else probs.argmax(1)


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], out: Path) -> None:
    axes = {name: {0: "batch", 1: "seq"} for name in names if name != "x"}
    axes.update({"x": {0: "batch"}, "probs": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            inputs,
            str(out),
            input_names=names,
            output_names=["probs"],
            dynamic_axes={k: v for k, v in axes.items() if k in (*names, "probs")},
            opset_version=17,
            dynamo=False,
        )


def _text_graph(model: TextClassifier, batcher: TextBatcher, work: Path) -> Path:
    """TorchScript export, then ONNX Runtime's BERT fusions; returns the fused fp32 graph."""
    from onnxruntime.transformers.optimizer import optimize_model

    raw, fused = work / "raw.onnx", work / "fused.onnx"
    _, ids, mask = next(batcher.chunks(["an example", "a slightly longer example text"], 2))
    _export(model, (torch.from_numpy(ids), torch.from_numpy(mask)), ["input_ids", "attention_mask"], raw)
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
    registry: AdapterStore,
    base_path: str,
    task: str,
    version: int,
    backend: str,
    eval_inputs: Sequence[Any],
    min_agreement: float = 0.99,
    opts: OnnxOptions | None = None,
    max_len: int = 128,
) -> Artifact:
    """Export, gate and publish the ``backend`` artifact of an adapter version (text tasks: any
    ONNX backend; the click MLP: fp32 only). ``eval_inputs`` are texts or session feature rows.

    Returns the published record (``passed`` false when every plan missed the gate; then no
    model file is stored). Raises :class:`AdapterError` for versions that cannot be exported.
    """
    if backend not in ONNX_BACKENDS:
        raise AdapterError(f"no export for backend {backend!r} (exportable: {', '.join(ONNX_BACKENDS)})")
    opts = opts or OnnxOptions()
    manifest = registry.verify(task, version, base_sha256=base_model_sha256(base_path))
    if manifest.kind != "text-lora" and backend != CLICK_BACKEND:
        raise AdapterError(f"{task} v{version}: the click MLP is exported to {CLICK_BACKEND} only")
    if not eval_inputs:
        raise AdapterError(f"{task}: empty evaluation slice")
    started = time.monotonic()
    log.info("export_started", task=task, version=version, backend=backend, eval_rows=len(eval_inputs))
    tried: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="streamtune-export-") as tmp:
        work = Path(tmp)
        if manifest.kind == "text-lora":
            batcher = TextBatcher(base_path, max_len)
            model = _text_model(registry, base_path, manifest)
            reference = _decide(_torch_probs(model, batcher, eval_inputs, opts.batch_size))
            fused = _text_graph(model, batcher, work)

            def labels(path: Path) -> np.ndarray:
                return _decide(run_text(session(path, opts.threads), batcher, eval_inputs, opts.batch_size))
        else:
            click = ClickProbability(_click_model(registry, manifest)).eval()
            x = torch.tensor(eval_inputs, dtype=torch.float32)
            with torch.inference_mode():
                reference = _decide(click(x).numpy())
            fused = work / "fused.onnx"
            _export(click, (x[:2],), ["x"], fused)

            def labels(path: Path) -> np.ndarray:
                return _decide(run_click(session(path, opts.threads), eval_inputs))

        plans = INT8_PLANS if backend == "onnx-int8" else (("fp32", lambda name: True),)
        build = work / "build"
        build.mkdir()
        best: tuple[float, str, list[str]] = (-1.0, "", [])
        for plan, keep_fp32 in plans:
            candidate = work / f"{plan}.onnx"
            excluded: list[str] = []
            if backend == "onnx-fp32":
                fused.rename(candidate)
            else:
                excluded = _quantize(fused, candidate, keep_fp32)
            agreement = float((labels(candidate) == reference).mean())
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
            eval_rows=len(eval_inputs),
            min_agreement=min_agreement,
            passed=agreement >= min_agreement,
            fp32_nodes=excluded,
            details={
                "plan": plan,
                "plans_tried": tried,
                "quantization": "dynamic, per-channel int8 weights, uint8 activations"
                if backend == "onnx-int8"
                else "none",
                "graph": "ORT BERT optimizer: fused attention, skip layer-norm, bias-GELU"
                if manifest.kind == "text-lora"
                else "MLP with sigmoid",
                "seconds": round(time.monotonic() - started, 1),
            },
        )
        published = registry.publish_artifact(build, art)
    log.info("export_done", task=task, version=version, backend=backend, passed=published.passed,
             agreement=round(agreement, 4), plan=plan, seconds=published.details["seconds"])  # fmt: skip
    return published


def _text_model(registry: AdapterStore, base_path: str, manifest: Manifest) -> TextClassifier:
    from peft import PeftModel
    from safetensors.torch import load_file

    path = registry.fetch(manifest.task, manifest.version)
    _, base = load_base(base_path)
    try:
        merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        weights = load_file(str(path / "head.safetensors"))
    except Exception as e:  # peft/safetensors raise many types for corrupt files
        raise AdapterError(f"{manifest.task} v{manifest.version}: cannot load for export: {e}") from e
    head = Head(weights["linear.weight"].shape[1], weights["linear.weight"].shape[0])
    head.load_state_dict(weights)
    return TextClassifier(merged, head).eval()


def _click_model(registry: AdapterStore, manifest: Manifest) -> nn.Module:
    from peft import PeftModel

    from streamtune.model.click import load_click_net

    path = registry.fetch(manifest.task, manifest.version)
    try:
        merged: nn.Module = PeftModel.from_pretrained(load_click_net(path), str(path)).merge_and_unload()
    except Exception as e:
        raise AdapterError(f"{manifest.task} v{manifest.version}: cannot load for export: {e}") from e
    return merged.eval()


def export_for(settings: Settings, registry: AdapterStore, task: str, version: int, backend: str) -> Artifact:
    """:func:`export_artifact` with the deployment's settings; the evaluation slice is the task's
    fixed reference set (held-out split of the shipped data, never trained on)."""

    inputs = reference_set(task, settings.model.data_dir, settings.model.export_eval_rows).x
    opts = OnnxOptions(settings.model.torch_threads, settings.model_batch_size_for(task))
    return export_artifact(
        registry, settings.model.base_model, task, version, backend, inputs,
        settings.model.onnx_min_agreement, opts, settings.model.max_seq_len,
    )  # fmt: skip


def ensure_artifact(settings: Settings, registry: AdapterStore, task: str, version: int) -> Artifact | None:
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

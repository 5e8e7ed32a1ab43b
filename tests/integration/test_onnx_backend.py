"""ONNX Runtime backends with the real base model and the committed adapters: export, gate,
artifact checks in the registry, scoring and hot-swap through the same runtime as torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from streamtune.core.errors import AdapterError, StartupError
from streamtune.core.settings import Settings
from streamtune.model.onnx_export import ensure_artifact, export_for
from streamtune.model.runtime import ModelRuntime
from streamtune.rollout.registry import Artifact, LocalRegistry, sha256_file
from streamtune.training.candidate import reference_set
from support.registry import pinned_registry

TASK = "query_class"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> LocalRegistry:
    root = tmp_path_factory.mktemp("onnx") / "adapters"
    pinned_registry(root, artifacts=False)
    return LocalRegistry(root)


@pytest.fixture(scope="module")
def settings(reg: LocalRegistry) -> Settings:
    return Settings(adapter_dir=reg.root, export_eval_rows=60, torch_threads=1, backend="onnx-fp32")


@pytest.fixture(scope="module")
def fp32_artifact(settings: Settings, reg: LocalRegistry) -> Artifact:
    return export_for(settings, reg, TASK, 1, "onnx-fp32")


def _queries(settings: Settings) -> list[str]:
    return [str(x) for x in reference_set(TASK, settings.model.data_dir, 40, seed=5).x]


def test_fp32_export_passes_its_gate_and_scores_like_torch(
    settings: Settings, reg: LocalRegistry, fp32_artifact: Artifact
) -> None:
    art = fp32_artifact
    assert art.passed and art.agreement >= 0.99 and art.eval_rows == 60
    assert art.manifest_sha256 == reg.manifest_sha256(TASK, 1)
    stored = reg.artifact_dir(TASK, 1, "onnx-fp32")
    assert sorted(p.name for p in stored.iterdir()) == ["artifact.json", "model.onnx"]
    assert art.files["model.onnx"] == sha256_file(stored / "model.onnx")
    queries = _queries(settings)
    torch_rt = ModelRuntime(settings.model.base_model, reg, threads=1, backend="torch")
    onnx_rt = ModelRuntime(settings.model.base_model, reg, threads=1, backend="onnx-fp32")
    assert onnx_rt._base is None  # ONNX only: no torch encoder held in memory
    for rt in (torch_rt, onnx_rt):
        rt.activate(rt.load(TASK, 1))
    a, b = torch_rt.score(TASK, queries), onnx_rt.score(TASK, queries)
    assert b.labels == a.labels and b.version == 1
    np.testing.assert_allclose(b.probs, a.probs, atol=1e-4)
    assert (b.probs.argmax(1) == a.probs.argmax(1)).all()


def test_a_passed_artifact_is_immutable_and_ensure_reuses_it(
    settings: Settings, reg: LocalRegistry, fp32_artifact: Artifact
) -> None:
    with pytest.raises(AdapterError, match="immutable"):
        reg.publish_artifact(reg.artifact_dir(TASK, 1, "onnx-fp32"), fp32_artifact)
    assert ensure_artifact(settings, reg, TASK, 1) == reg.artifact(TASK, 1, "onnx-fp32")
    # All text tasks in ONNX Runtime: the click MLP follows (fp32), so the scorer needs no torch.
    click = ensure_artifact(settings, reg, "purchase_intent", 1)
    assert click is not None and click.backend == "onnx-fp32" and click.passed and click.agreement == 1.0
    mixed = settings.replace(task_backends={"review_sentiment": "torch"})
    assert ensure_artifact(mixed, reg, "purchase_intent", 1) is None  # a torch text task: click in torch too
    rows = reference_set("purchase_intent", settings.model.data_dir, 30).x
    torch_rt = ModelRuntime(settings.model.base_model, reg, threads=1, backend="torch")
    onnx_rt = ModelRuntime(settings.model.base_model, reg, threads=1, backend="onnx-fp32")
    for rt in (torch_rt, onnx_rt):
        rt.activate(rt.load("purchase_intent", 1))
    np.testing.assert_allclose(
        onnx_rt.score("purchase_intent", rows).probs, torch_rt.score("purchase_intent", rows).probs, atol=1e-5
    )


def _version_2(reg: LocalRegistry) -> Path:
    """v2 = a copy of v1 (same weights), published without artifacts."""
    src, dst = reg.fetch(TASK, 1), reg.root / TASK / "2"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("artifacts"))
    m = json.loads((dst / "manifest.json").read_text())
    m.update(version=2, parent_version=1)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_hot_swap_refuses_a_bad_artifact_and_the_live_version_keeps_serving(
    settings: Settings, reg: LocalRegistry, fp32_artifact: Artifact
) -> None:
    rt = ModelRuntime(settings.model.base_model, reg, threads=1, backend="onnx-fp32")
    rt.activate(rt.load(TASK, 1))
    v2 = _version_2(reg)
    with pytest.raises(AdapterError, match="no onnx-fp32 artifact"):
        rt.verify(TASK, 2)
    # Copied from v1: the record names v1's manifest, so it is refused as derived from another one.
    shutil.copytree(reg.artifact_dir(TASK, 1, "onnx-fp32"), v2 / "artifacts" / "onnx-fp32")
    with pytest.raises(AdapterError, match="derived from another manifest"):
        rt.verify(TASK, 2)
    shutil.rmtree(v2 / "artifacts")
    export_for(settings, reg, TASK, 2, "onnx-fp32")
    rt.verify(TASK, 2)  # a real export passes
    model = reg.artifact_dir(TASK, 2, "onnx-fp32") / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum mismatch"):
        rt.verify(TASK, 2)
    assert rt.score(TASK, ["red dress"]).version == 1  # live untouched


def test_int8_gate_records_agreement_and_refuses_below_the_threshold(
    settings: Settings, reg: LocalRegistry
) -> None:
    strict = settings.replace(onnx_min_agreement=1.0)
    art = export_for(strict, reg, TASK, 1, "onnx-int8")
    plans = art.details["plans_tried"]
    assert plans[0]["plan"] == "all-int8" and 0 < art.agreement <= 1
    assert art.agreement == max(p["agreement"] for p in plans)
    if art.passed:  # int8 happened to agree on every row: nothing to refuse here
        assert art.agreement == 1.0
        return
    assert len(plans) == 3 and art.files == {}  # every plan tried; no model file is stored
    assert not (reg.artifact_dir(TASK, 1, "onnx-int8") / "model.onnx").exists()
    rt = ModelRuntime(settings.model.base_model, reg, threads=1, backend="onnx-int8")
    with pytest.raises(AdapterError, match="refused by its gate"):
        rt.load(TASK, 1)
    # A refused record may be replaced by a new export (here with a gate it can pass).
    lenient = settings.replace(onnx_min_agreement=0.0)
    again = export_for(lenient, reg, TASK, 1, "onnx-int8")
    assert again.passed and (reg.artifact_dir(TASK, 1, "onnx-int8") / "model.onnx").is_file()
    rt.activate(rt.load(TASK, 1))
    assert rt.score(TASK, ["running shoes"]).probs.shape[0] == 1


def test_backend_settings_are_validated() -> None:
    assert Settings(task_backends={"query_class": "onnx-fp32"}).backend_for("query_class") == "onnx-fp32"
    assert Settings(backend="onnx-int8").backend_for("purchase_intent") == "onnx-fp32"
    assert Settings(backend="torch-bf16").backend_for("purchase_intent") == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        Settings(backend="tensorrt")
    with pytest.raises(ValueError, match="not a text task"):
        Settings(task_backends={"purchase_intent": "onnx-int8"})


def test_torch_and_bf16_cannot_share_the_base(reg: LocalRegistry) -> None:
    with pytest.raises(StartupError, match="share one base"):
        ModelRuntime(Settings().model.base_model, reg, backend="torch", task_backends={TASK: "torch-bf16"})


def test_a_swapped_out_onnx_version_releases_its_session(
    settings: Settings, reg: LocalRegistry, fp32_artifact: Artifact
) -> None:
    """Each ONNX version holds a whole merged model: only versions a route uses stay loaded."""
    src, dst = reg.fetch(TASK, 1), reg.root / TASK / "3"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("artifacts"))
    m = json.loads((dst / "manifest.json").read_text())
    m.update(version=3, parent_version=1)
    (dst / "manifest.json").write_text(json.dumps(m))
    export_for(settings, reg, TASK, 3, "onnx-fp32")
    rt = ModelRuntime(settings.model.base_model, reg, threads=1, backend="onnx-fp32")
    rt.activate(rt.load(TASK, 1))
    assert (TASK, 1) in rt._loaded
    rt.activate(rt.load(TASK, 3))
    assert (TASK, 3) in rt._loaded and (TASK, 1) not in rt._loaded
    assert rt.score(TASK, ["winter boots"]).version == 3
    rt.activate(rt.load(TASK, 1))  # a rollback loads it again
    assert rt.score(TASK, ["winter boots"]).version == 1

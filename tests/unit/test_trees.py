"""The click model's boosted trees (``streamtune.model.trees``) on real shipped sessions: the ONNX
export agrees with scikit-learn, save and load give identical probabilities, a tampered file is
refused like any adapter file, and the blend weight is chosen on validation rows only. Also the
contract of ``model/skl2onnx_compat.py``: skl2onnx still fails without its workaround."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from streamtune.core.errors import AdapterError
from streamtune.core.features import BASE_FEATURE_DIM, FEATURE_DIM, vectorize
from streamtune.core.settings import Settings
from streamtune.core.tasks import CLICK
from streamtune.datasets import loaders
from streamtune.model import skl2onnx_compat, trees
from streamtune.rollout.registry import BaseModelRef, LocalRegistry, Manifest

FILES = (trees.TREES_MODEL, trees.TREES_META)


@pytest.fixture(scope="module")
def sessions() -> tuple[np.ndarray, np.ndarray]:
    pct = CLICK.held_out_percent
    rows = [
        r
        for r in loaders.load_sessions(Settings().model.data_dir)
        if not loaders.is_held_out(r["session_id"], pct)
    ]
    x = np.array([vectorize(r) for r in rows[:3000]], dtype=np.float32)
    y = np.array([int(r["Revenue"]) for r in rows[:3000]])
    return x, y


@pytest.fixture(scope="module")
def fitted(sessions: tuple[np.ndarray, np.ndarray]) -> object:
    x, y = sessions
    return trees.fit(x[:2000], list(y[:2000]), seed=3)


def test_export_agrees_with_scikit_learn_and_round_trips(
    fitted: object, sessions: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, _ = sessions
    trees.export(fitted, x[2000:2500], 0.6, tmp_path, {"train_rows": 2000})
    meta = json.loads((tmp_path / trees.TREES_META).read_text())
    assert meta["format"] == trees.FORMAT and meta["dim"] == FEATURE_DIM and meta["weight"] == 0.6
    assert meta["export_max_abs_diff"] <= trees.EXPORT_TOLERANCE
    assert (tmp_path / trees.TREES_MODEL).read_bytes()[:1] != b"\x80"  # an ONNX protobuf, not a pickle
    stage = trees.TreeStage.load(tmp_path)
    got = stage.predict(x[2500:])
    want = fitted.predict_proba(x[2500:])[:, 1]  # type: ignore[attr-defined]
    assert np.max(np.abs(got - want)) <= trees.EXPORT_TOLERANCE
    again = trees.TreeStage.load(tmp_path).predict(x[2500:])
    assert np.array_equal(got, again)  # loading twice: identical probabilities
    # columns appended after the model's own are not read
    wider = np.concatenate([x[2500:], np.full((len(x) - 2500, 3), 1e6, dtype=np.float32)], axis=1)
    assert np.array_equal(stage.predict(wider), got)


def test_load_refuses_malformed_files(
    fitted: object, sessions: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, _ = sessions
    trees.export(fitted, x[:50], 0.5, tmp_path, {})
    meta_path = tmp_path / trees.TREES_META
    good = json.loads(meta_path.read_text())
    for bad in ({**good, "format_version": 99}, {**good, "weight": 1.5}, {**good, "dim": 0}):
        meta_path.write_text(json.dumps(bad))
        with pytest.raises(AdapterError):
            trees.TreeStage.load(tmp_path)
    meta_path.write_text(json.dumps(good))
    (tmp_path / trees.TREES_MODEL).write_bytes(b"not a graph")
    with pytest.raises(AdapterError, match="ONNX Runtime refused"):
        trees.TreeStage.load(tmp_path)


@pytest.mark.parametrize("name", FILES)
def test_a_tampered_trees_file_is_refused_like_any_adapter_file(
    fitted: object, sessions: tuple[np.ndarray, np.ndarray], tmp_path: Path, name: str
) -> None:
    build = tmp_path / "build"
    build.mkdir()
    (build / "adapter_model.safetensors").write_bytes(b"weights")
    trees.export(fitted, sessions[0][:50], 0.5, build, {})
    reg = LocalRegistry(tmp_path / "reg")
    manifest = Manifest(
        task="purchase_intent",
        version=1,
        kind="click-mlp-lora",
        base_model=BaseModelRef(name="base", sha256="b" * 64),
        labels=[],
        created_at=datetime.now(UTC),
    )
    published = reg.publish(build, manifest)
    assert set(FILES) <= set(published.files)
    reg.verify("purchase_intent", 1)
    path = tmp_path / "reg" / "purchase_intent" / "1" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match=f"checksum mismatch for {re.escape(name)}"):
        reg.verify("purchase_intent", 1)


def test_the_weight_is_chosen_on_the_rows_it_is_given() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good = np.clip(y + rng.normal(0, 0.3, 400), 0, 1)  # informative
    noise = rng.random(400)  # uninformative
    w, by_weight = trees.choose_weight(noise, good, list(y), roc_auc_score)
    assert w == 1.0 and set(by_weight) == {f"{v:.2f}" for v in trees.DEFAULT_WEIGHTS}
    w, _ = trees.choose_weight(good, noise, list(y), roc_auc_score)
    assert w == 0.0
    # the same predictions on rows whose labels the other model knows: the other weight
    w_other, _ = trees.choose_weight(good, noise, list((noise > 0.5).astype(int)), roc_auc_score)
    assert w_other == 1.0
    assert np.allclose(trees.blend(np.zeros(3), np.ones(3), 0.3), 0.3)


def test_skl2onnx_still_needs_the_workaround(fitted: object) -> None:
    """Contract: skl2onnx 1.20 + onnx 1.23 refuse the leaf flags of a HistGradientBoosting tree.
    When this fails, upstream fixed it: drop ``_int_missing_flags`` (docs/skl2onnx-workarounds.md)."""
    with pytest.raises(ValueError, match="TreeEnsembleClassifier"):
        skl2onnx_compat.convert(fitted, FEATURE_DIM)
    assert skl2onnx_compat.hist_gradient_boosting_to_onnx(fitted, FEATURE_DIM)[:2]  # with it: a graph
    import skl2onnx.common.tree_ensemble as te

    assert te.add_node.__module__ == "skl2onnx.common.tree_ensemble"  # the wrapper is gone afterwards


def test_base_columns_come_first() -> None:
    row = loaders.load_sessions(Settings().model.data_dir)[0]
    assert len(vectorize(row)) == FEATURE_DIM > BASE_FEATURE_DIM

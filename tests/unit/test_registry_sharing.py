"""Versions that share files with their parent (the trainer's fast path): hard links, not
copies; checked against the parent's manifest; the parent's ONNX artifacts inherited without a
re-export; what changed is recorded. Real files in a temporary registry."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr

from streamtune.core.errors import AdapterError, FileMismatch
from streamtune.model.linear import LINEAR_FILES
from streamtune.rollout import registry as registry_mod
from streamtune.rollout.registry import Artifact, BaseModelRef, LocalRegistry, Manifest, registry_for

TASK = "review_sentiment"
BACKEND = "onnx-int8"
TRANSFORMER = ("adapter_config.json", "adapter_model.safetensors", "head.safetensors")


def _manifest(version: int, parent: int | None = None) -> Manifest:
    return Manifest(
        task=TASK, version=version, parent_version=parent, kind="text-lora",
        base_model=BaseModelRef(name="base", sha256="b" * 64), labels=["negative", "neutral", "positive"],
        created_at=datetime.now(UTC),
    )  # fmt: skip


def _build(tmp: Path, name: str, files: dict[str, bytes]) -> Path:
    d = tmp / name
    d.mkdir()
    for file, payload in files.items():
        (d / file).write_bytes(payload)
    return d


def _parent(reg: LocalRegistry, tmp: Path) -> None:
    files = {n: f"transformer {n}".encode() for n in TRANSFORMER}
    files.update({n: f"linear v1 {n}".encode() for n in LINEAR_FILES})
    reg.publish(_build(tmp, "v1", files), _manifest(1))


def _child(reg: LocalRegistry, tmp: Path, version: int = 2, parent: int = 1) -> Manifest:
    build = _build(tmp, f"v{version}", {n: f"linear v{version} {n}".encode() for n in LINEAR_FILES})
    return reg.publish(build, _manifest(version, parent), shared=dict.fromkeys(TRANSFORMER, parent))


def test_shared_files_are_hard_links_checked_and_recorded(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    _parent(reg, tmp_path)
    m = _child(reg, tmp_path)
    parent, child = reg.fetch(TASK, 1), reg.fetch(TASK, 2)
    for name in TRANSFORMER:
        assert os.stat(parent / name).st_ino == os.stat(child / name).st_ino  # one file, not a copy
        assert m.files[name] == reg.manifest(TASK, 1).files[name]
    assert m.shared == dict.fromkeys(TRANSFORMER, 1)
    assert m.changed == sorted(LINEAR_FILES)
    assert (child / "linear.json").read_bytes() == b"linear v2 linear.json"
    assert reg.verify(TASK, 2).shared == m.shared
    # a third version sharing from the second still points at the first one's files
    grandchild = _child(reg, tmp_path, 3, 2)
    assert grandchild.shared == dict.fromkeys(TRANSFORMER, 2)
    third = reg.fetch(TASK, 3)
    assert os.stat(parent / "head.safetensors").st_ino == os.stat(third / "head.safetensors").st_ino


def test_tampering_with_a_shared_file_is_caught_in_every_version(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    _parent(reg, tmp_path)
    _child(reg, tmp_path)
    (reg.fetch(TASK, 2) / "head.safetensors").write_bytes(b"tampered")
    for version in (1, 2):
        with pytest.raises(FileMismatch, match=r"head\.safetensors"):
            reg.verify(TASK, version)
    with pytest.raises(FileMismatch, match="checksum mismatch"):  # the source is verified first
        _child(reg, tmp_path, 3, 1)
    assert reg.versions(TASK) == [1, 2]


def test_sharing_is_refused_where_it_cannot_hold(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    _parent(reg, tmp_path)
    build = _build(tmp_path, "b", {n: b"x" for n in LINEAR_FILES})
    with pytest.raises(AdapterError, match="both built and shared"):
        reg.publish(build, _manifest(2, 1), shared={"linear.json": 1})
    with pytest.raises(AdapterError, match="an older version"):
        reg.publish(build, _manifest(2, 1), shared={"head.safetensors": 2})
    with pytest.raises(AdapterError, match=r"no file tokenizer\.json"):
        reg.publish(build, _manifest(2, 1), shared={"tokenizer.json": 1})
    assert reg.versions(TASK) == [1]


def test_a_signed_manifest_covers_what_it_shares(tmp_path: Path) -> None:
    reg = registry_for(tmp_path / "reg", SecretStr("key"))
    assert isinstance(reg, LocalRegistry)
    _parent(reg, tmp_path)
    _child(reg, tmp_path)
    assert reg.verify(TASK, 2).shared
    path = reg.fetch(TASK, 2) / "manifest.json"
    path.write_text(path.read_text().replace('"head.safetensors": 1', '"head.safetensors": 0'))
    with pytest.raises(AdapterError, match="signature"):
        reg.verify(TASK, 2)


def _passed_artifact(reg: LocalRegistry, tmp: Path, version: int) -> None:
    build = _build(tmp, f"art{version}", {"model.onnx": b"graph"})
    art = Artifact(
        task=TASK, version=version, backend=BACKEND, manifest_sha256=reg.manifest_sha256(TASK, version),
        created_at=datetime.now(UTC), agreement=0.997, eval_rows=300, min_agreement=0.99, passed=True,
        fp32_nodes=["/head/MatMul"], details={"seconds": 61.0},
    )  # fmt: skip
    reg.publish_artifact(build, art)


def test_artifacts_are_inherited_without_a_re_export(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    _parent(reg, tmp_path)
    _passed_artifact(reg, tmp_path, 1)
    _child(reg, tmp_path)
    [art] = reg.inherit_artifacts(TASK, 2, 1)
    checked, model = reg.verify_artifact(TASK, 2, BACKEND)  # derived from v2's own manifest
    assert checked == art
    assert art.details["inherited_from"] == 1
    assert art.agreement == 0.997 and art.fp32_nodes == ["/head/MatMul"]
    parent_model = reg.artifact_dir(TASK, 1, BACKEND) / "model.onnx"
    assert os.stat(model).st_ino == os.stat(parent_model).st_ino
    assert reg.inherit_artifacts(TASK, 2, 1) == []  # already there: left alone


def test_a_version_with_its_own_transformer_inherits_no_artifact(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    _parent(reg, tmp_path)
    _passed_artifact(reg, tmp_path, 1)
    files = {n: f"retrained {n}".encode() for n in (*TRANSFORMER, *LINEAR_FILES)}
    reg.publish(_build(tmp_path, "v2", files), _manifest(2, 1))
    with pytest.raises(AdapterError, match="does not share"):
        reg.inherit_artifacts(TASK, 2, 1)
    assert reg.artifact(TASK, 2, BACKEND) is None


def test_the_files_no_artifact_is_derived_from_are_the_linear_stage() -> None:
    assert frozenset(LINEAR_FILES) == registry_mod._NOT_IN_ARTIFACTS

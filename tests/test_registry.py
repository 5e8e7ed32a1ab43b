from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from streamtune.errors import AdapterError
from streamtune.registry import BaseModelRef, LocalRegistry, Manifest


def _manifest(version: int, sha: str = "b" * 64) -> Manifest:
    return Manifest(
        task="review_sentiment",
        version=version,
        kind="text-lora",
        base_model=BaseModelRef(name="base", sha256=sha),
        labels=["negative", "neutral", "positive"],
        created_at=datetime.now(UTC),
    )


def _build(tmp: Path, payload: bytes = b"weights") -> Path:
    d = tmp / "build"
    d.mkdir(exist_ok=True)
    (d / "adapter_model.safetensors").write_bytes(payload)
    (d / "adapter_config.json").write_text("{}")
    return d


def test_publish_then_verify(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    m = reg.publish(_build(tmp_path), _manifest(1))
    assert set(m.files) == {"adapter_model.safetensors", "adapter_config.json"}
    assert reg.versions("review_sentiment") == [1]
    assert reg.verify("review_sentiment", 1, base_sha256="b" * 64).version == 1
    # no temporary directory is left behind
    assert [p.name for p in (tmp_path / "reg" / "review_sentiment").iterdir()] == ["1"]


def test_versions_are_immutable(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(_build(tmp_path), _manifest(1))
    with pytest.raises(AdapterError, match="immutable"):
        reg.publish(_build(tmp_path, b"other"), _manifest(1))
    assert reg.next_version("review_sentiment") == 2


def test_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(_build(tmp_path), _manifest(1))
    (tmp_path / "reg" / "review_sentiment" / "1" / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(AdapterError, match=r"checksum mismatch for adapter_model\.safetensors"):
        reg.verify("review_sentiment", 1)


def test_missing_file_and_manifest_are_refused(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(_build(tmp_path), _manifest(1))
    d = tmp_path / "reg" / "review_sentiment" / "1"
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"file adapter_config\.json missing"):
        reg.verify("review_sentiment", 1)
    (d / "manifest.json").unlink()
    with pytest.raises(AdapterError, match="manifest missing"):
        reg.verify("review_sentiment", 1)


def test_wrong_base_model_is_refused(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(_build(tmp_path), _manifest(1, sha="c" * 64))
    with pytest.raises(AdapterError, match="trained for base model"):
        reg.verify("review_sentiment", 1, base_sha256="b" * 64)

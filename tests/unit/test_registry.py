from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from streamtune.core.errors import AdapterError
from streamtune.rollout.registry import BaseModelRef, LocalRegistry, Manifest


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


def test_signed_manifests_refuse_tampering_and_unsigned_versions(tmp_path: Path) -> None:
    import json
    import shutil

    from streamtune.core.errors import AdapterError
    from streamtune.core.settings import Settings
    from streamtune.rollout.registry import LocalRegistry

    root = tmp_path / "adapters"
    shutil.copytree(Settings().model.adapter_dir / "purchase_intent", root / "purchase_intent")
    signed = LocalRegistry(root, b"k1")
    with pytest.raises(AdapterError, match="not signed"):
        signed.verify("purchase_intent", 1)  # the committed version predates signing
    assert signed.sign_existing("purchase_intent", 1) is True
    assert signed.sign_existing("purchase_intent", 1) is False
    signed.verify("purchase_intent", 1)
    LocalRegistry(root).verify("purchase_intent", 1)  # a reader without a key still verifies checksums
    with pytest.raises(AdapterError, match="signature does not match"):
        LocalRegistry(root, b"another key").verify("purchase_intent", 1)
    path = root / "purchase_intent" / "1" / "manifest.json"
    m = json.loads(path.read_text())
    m["metrics"]["roc_auc"] = 0.99  # a tampered manifest
    path.write_text(json.dumps(m))
    with pytest.raises(AdapterError, match="signature does not match"):
        signed.verify("purchase_intent", 1)


def test_publish_signs_with_the_key_and_a_changed_weight_file_is_still_refused(tmp_path: Path) -> None:
    reg = LocalRegistry(tmp_path / "reg", b"secret")
    m = reg.publish(_build(tmp_path), _manifest(1))
    assert len(m.signature) == 64
    reg.verify("review_sentiment", 1)
    (tmp_path / "reg" / "review_sentiment" / "1" / "adapter_model.safetensors").write_bytes(b"evil")
    with pytest.raises(AdapterError, match="checksum mismatch"):
        reg.verify("review_sentiment", 1)


def test_the_key_never_appears_in_settings_output() -> None:
    from streamtune.core.settings import Settings

    s = Settings(manifest_hmac_key="planted-secret-123")
    assert "planted-secret-123" not in repr(s) and "planted-secret-123" not in str(s.model_dump())

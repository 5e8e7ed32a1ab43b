"""The adapters CLI refuses, before touching the broker, a version its gate rejected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from streamtune.cli import app
from streamtune.core.errors import StreamtuneError
from support.registry import pinned_registry


def test_promoting_a_rejected_version_needs_force(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    pinned_registry(root)
    v2 = root / "review_sentiment" / "2"
    shutil.copytree(root / "review_sentiment" / "1", v2)
    manifest = json.loads((v2 / "manifest.json").read_text())
    manifest.update(
        version=2, parent_version=1, gate={"passed": False, "reason": "gain +0.001 < margin 0.01"}
    )
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    env = {"STREAMTUNE_ADAPTER_DIR": str(root), "STREAMTUNE_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    for args in (
        ["promote", "review_sentiment", "2"],
        ["canary", "review_sentiment", "2", "--fraction", "0.1"],
    ):
        result = CliRunner().invoke(app, ["adapters", *args], env=env)
        assert isinstance(result.exception, StreamtuneError), result.output
        assert "failed its release gate (gain +0.001 < margin 0.01)" in str(result.exception)
        assert "--force" in str(result.exception)


def test_releasing_a_version_without_its_onnx_artifact_is_refused(tmp_path: Path) -> None:
    """Scorers on an ONNX backend would refuse it: the CLI says so and how to export it."""
    root = tmp_path / "adapters"
    pinned_registry(root, artifacts=False)
    v2 = root / "query_class" / "2"
    shutil.copytree(root / "query_class" / "1", v2)
    manifest = json.loads((v2 / "manifest.json").read_text())
    manifest.update(version=2, parent_version=1)
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    env = {
        "STREAMTUNE_ADAPTER_DIR": str(root),
        "STREAMTUNE_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "STREAMTUNE_BACKEND": "onnx-fp32",
    }
    result = CliRunner().invoke(app, ["adapters", "promote", "query_class", "2"], env=env)
    assert isinstance(result.exception, StreamtuneError), result.output
    assert "no onnx-fp32 artifact" in str(result.exception)
    assert "streamtune adapters export --task query_class --version 2" in str(result.exception)

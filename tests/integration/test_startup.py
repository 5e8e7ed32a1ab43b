"""Startup errors are one clear line naming the setting, with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamtune.core.settings import Settings
from streamtune.devtools.stack import find_free_port
from support import Stack, settings_env
from support.registry import pinned_registry

pytestmark = pytest.mark.integration


def run_scorer(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamtune.cli", "scorer"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_broker_unreachable(settings: Settings) -> None:
    s = settings.replace(bootstrap_servers=f"127.0.0.1:{find_free_port()}")
    proc = run_scorer(s)
    assert proc.returncode == 2
    assert last_line(proc).startswith("error: cannot reach Kafka at STREAMTUNE_BOOTSTRAP_SERVERS=")


def test_redis_unreachable(settings: Settings) -> None:
    s = settings.replace(redis_url=f"redis://127.0.0.1:{find_free_port()}/0")
    proc = run_scorer(s)
    assert proc.returncode == 2
    assert last_line(proc).startswith("error: cannot reach Redis at STREAMTUNE_REDIS_URL=")


def test_adapter_directory_empty(settings: Settings, tmp_path: Path, stack: Stack) -> None:
    empty = tmp_path / "empty-registry"
    empty.mkdir()
    proc = run_scorer(settings.replace(adapter_dir=empty))
    assert proc.returncode == 2
    line = last_line(proc)
    assert line.startswith("error: no adapter for task review_sentiment in STREAMTUNE_ADAPTER_DIR=")
    assert "streamtune train --task review_sentiment" in line


def test_invalid_setting_names_the_variable() -> None:
    env = {**settings_env(Settings()), "STREAMTUNE_BATCH_MAX_EVENTS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "streamtune.cli", "topics"], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "STREAMTUNE_BATCH_MAX_EVENTS" in proc.stderr


def test_signing_key_refuses_unsigned_adapters_and_is_never_logged(
    settings: Settings, tmp_path: Path
) -> None:

    registry = tmp_path / "adapters"
    pinned_registry(registry)
    secret = "planted-secret-7f3a"
    s = settings.replace(adapter_dir=registry, manifest_hmac_key=secret)
    proc = run_scorer(s)
    assert proc.returncode == 2
    assert "manifest is not signed" in last_line(proc)
    assert secret not in proc.stdout + proc.stderr


def test_credentials_never_reach_error_output(settings: Settings) -> None:
    redis_secret, sasl_secret = "planted-redis-pw-91", "planted-sasl-pw-42"
    s = settings.replace(redis_url=f"redis://:{redis_secret}@127.0.0.1:{find_free_port()}/0")
    proc = run_scorer(s)
    assert proc.returncode == 2
    assert "STREAMTUNE_REDIS_URL=redis://:***@127.0.0.1" in last_line(proc)
    assert redis_secret not in proc.stdout + proc.stderr
    sasl = settings.replace(
        kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="svc",
                kafka_sasl_password=sasl_secret
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "streamtune.cli", "topics"], env=settings_env(sasl), capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode != 0  # a SASL client against a plaintext listener cannot connect
    assert sasl_secret not in proc.stdout + proc.stderr

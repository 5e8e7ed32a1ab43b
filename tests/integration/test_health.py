"""Liveness and readiness endpoints of a real scorer and trainer, and the lag they export."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from streamtune.core.settings import Settings
from streamtune.kafka.topics import ensure_topics
from support import ScorerProcess, wait_until
from support.registry import pinned_registry

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_scorer_is_live_then_ready_and_exports_lag(
    settings: Settings, scorer_factory: Callable[[Settings], ScorerProcess]
) -> None:
    ensure_topics(settings)
    scorer = scorer_factory(settings).start()
    port = settings.ops.metrics_port
    assert get(port, "/healthz") == (200, "ok\n")
    wait_until(lambda: get(port, "/readyz") == (200, "ready\n"), 120, "readiness", guard=scorer.assert_alive)
    wait_until(lambda: "streamtune_consumer_lag{" in get(port, "/metrics")[1], 60, "the lag gauge")
    assert 'streamtune_oldest_in_progress_seconds{task="purchase_intent"} 0.0' in get(port, "/metrics")[1]


def test_trainer_readiness(settings: Settings, tmp_path: Path) -> None:
    pinned_registry(tmp_path / "adapters")
    s = settings.replace(adapter_dir=tmp_path / "adapters", trainer_group_id=f"tr-{settings.kafka.group_id}")
    ensure_topics(s)
    trainer = ScorerProcess(s, tmp_path / "trainer.log", command="trainer").start()
    try:
        assert get(s.ops.metrics_port, "/healthz")[0] == 200
        wait_until(lambda: get(s.ops.metrics_port, "/readyz") == (200, "ready\n"), 120, "readiness",
                   guard=trainer.assert_alive)  # fmt: skip
    finally:
        assert trainer.stop() == 0

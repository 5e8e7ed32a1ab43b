"""Hot-swap, canary, rollback and refusals on a running scorer (real broker, Redis, model)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from test_e2e import check_aggregates, event_id
from typer.testing import CliRunner

from streamtune.cli import app as cli_app
from streamtune.core.settings import Settings
from streamtune.devtools.demo.replay import plan, replay
from streamtune.devtools.workers import settings_env as worker_env
from streamtune.kafka.topics import ensure_topics
from streamtune.rollout.registry import LocalRegistry
from streamtune.rollout.releases import ReleaseLog
from streamtune.rollout.state import canary_bucket, promote
from streamtune.scorer.sink import score_key
from support import ScorerProcess, consume_all, wait_until
from support.registry import pinned_registry

pytestmark = pytest.mark.integration
TASK = "review_sentiment"


def new_version(settings: Settings, src: int, dst: int) -> None:
    """A new immutable version with v1's weights (the rollout, not the training, is under test)."""
    root = settings.model.adapter_dir / TASK
    # without derived artifacts: those of src were made for src's manifest
    shutil.copytree(root / str(src), root / str(dst), ignore=shutil.ignore_patterns("artifacts"))
    m = json.loads((root / str(dst) / "manifest.json").read_text())
    m.update(version=dst, parent_version=src)
    (root / str(dst) / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def rsettings(settings: Settings, tmp_path: Path) -> Settings:
    registry = tmp_path / "adapters"
    pinned_registry(registry)
    s = settings.replace(adapter_dir=registry)
    ensure_topics(s)
    return s


def cli(settings: Settings, *args: str) -> str:
    env = {k: v for k, v in worker_env(settings).items() if k.startswith("STREAMTUNE_")}
    result = CliRunner().invoke(cli_app, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def metric(scorer: ScorerProcess, name: str) -> float:
    for line in scorer.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def review_versions(settings: Settings, n: int) -> list[tuple[int, int, str, int]]:
    """(partition, offset, product, version) of every review result."""
    msgs = consume_all(settings, "scores.review", n)
    assert len(msgs) == n
    values = [json.loads(m.value) for m in msgs]
    return [
        (m.partition, m.offset, v["product_id"], v["adapter"]["version"])
        for m, v in zip(msgs, values, strict=True)
    ]


def test_promote_mid_stream_swaps_between_batches_and_refuses_a_corrupt_release(
    rsettings: Settings, redis_client: redis.Redis, scorer_factory: Callable[[Settings], ScorerProcess]
) -> None:
    s = rsettings
    outs = [o for o in plan(s.model.data_dir, [TASK], 240) if o.valid]
    keys = [score_key(TASK, event_id(o)) for o in outs]
    scorer = scorer_factory(s).start()
    producer = threading.Thread(
        target=replay, kwargs={"settings": s, "tasks": [TASK], "limit": 240, "rate": 40.0}
    )
    producer.start()
    wait_until(lambda: redis_client.exists(*keys) >= 40, 120, "v1 results", 0.1, scorer.assert_alive)
    new_version(s, 1, 2)
    cli(s, "adapters", "promote", TASK, "2")
    wait_until(lambda: metric(scorer, 'streamtune_adapter_version{task="review_sentiment"}') == 2, 60,
               "the scorer to swap to v2", 0.1, scorer.assert_alive)  # fmt: skip

    # A release of a corrupt version (written after any CLI check): while the bad file is fresh
    # it may be a copy in progress, so the release waits; once the file has stood still for
    # release_settle_s it is refused, and v2 keeps serving throughout.
    new_version(s, 1, 3)
    weights = s.model.adapter_dir / TASK / "3" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    registry = LocalRegistry(s.model.adapter_dir)
    ReleaseLog(s).publish(promote(TASK, 3, registry.manifest_sha256(TASK, 3)))
    wait_until(lambda: metric(scorer, 'streamtune_releases_pending{task="review_sentiment"}') == 1, 60,
               "the fresh corrupt file to hold the release as pending", 0.1, scorer.assert_alive)  # fmt: skip
    assert metric(scorer, 'streamtune_adapter_refusals_total{task="review_sentiment"}') == 0
    assert metric(scorer, 'streamtune_adapter_version{task="review_sentiment"}') == 2
    stood_still = time.time() - 3600
    for f in weights.parent.rglob("*"):  # every file of v3 (a fresh checkout's are fresh too)
        os.utime(f, (stood_still, stood_still))  # the next retry (back-off <= 60 s) refuses it
    wait_until(lambda: metric(scorer, 'streamtune_adapter_refusals_total{task="review_sentiment"}') == 1, 120,
               "the refusal", 0.1, scorer.assert_alive)  # fmt: skip
    refusals = [r for r in ReleaseLog(s).read_all()[0] if r.stage == "refused"]
    assert refusals and "checksum mismatch" in refusals[-1].reason and refusals[-1].live_version == 2
    # A release whose manifest hash is not the manifest on disk (edited after release) is refused too.
    ReleaseLog(s).publish(promote(TASK, 2, "0" * 64))
    wait_until(lambda: metric(scorer, 'streamtune_adapter_refusals_total{task="review_sentiment"}') == 2, 60,
               "the second refusal", 0.1, scorer.assert_alive)  # fmt: skip
    refusals = [r for r in ReleaseLog(s).read_all()[0] if r.stage == "refused"]
    assert "differs from the release's" in refusals[-1].reason

    producer.join(timeout=120)
    wait_until(
        lambda: redis_client.exists(*keys) == len(keys), 180, "every review scored", 0.3, scorer.assert_alive
    )
    results = review_versions(s, len(keys))
    by_partition: dict[int, list[int]] = defaultdict(list)
    for partition, _, _, version in sorted(results):
        by_partition[partition].append(version)
    versions = [v for _, _, _, v in results]
    assert set(versions) == {1, 2}, "both versions served, the corrupt v3 never did"
    for seq in by_partition.values():
        assert seq == sorted(seq), "after the swap no result carries v1 again"
    check_aggregates(redis_client, outs)
    assert metric(scorer, 'streamtune_adapter_version{task="review_sentiment"}') == 2
    scorer.stop()


@pytest.mark.parametrize("backend", ["torch", "onnx-fp32"])
def test_canary_share_is_stable_per_entity_and_rollback_ends_it(
    rsettings: Settings,
    redis_client: redis.Redis,
    scorer_factory: Callable[[Settings], ScorerProcess],
    backend: str,
) -> None:
    """Canary routing, hot-swaps and rollback, the same on torch and on ONNX Runtime."""
    s = rsettings.replace(backend=backend, export_eval_rows=100)
    new_version(s, 1, 2)
    if backend != "torch":  # a release needs its artifact: exported ahead, as operators do
        for v in ("1", "2"):
            cli(s, "adapters", "export", "--task", TASK, "--version", v, "--backend", backend)
    cli(s, "adapters", "promote", TASK, "1")
    cli(s, "adapters", "canary", TASK, "2", "--fraction", "0.3")
    scorer = scorer_factory(s).start()  # a new scorer reads the current rollout state on start
    assert metric(scorer, 'streamtune_canary_version{task="review_sentiment"}') == 2
    outs = [o for o in plan(s.model.data_dir, [TASK], 300) if o.valid]
    replay(s, [TASK], limit=300)
    keys = [score_key(TASK, event_id(o)) for o in outs]
    wait_until(
        lambda: redis_client.exists(*keys) == len(keys), 180, "every review scored", 0.3, scorer.assert_alive
    )
    results = review_versions(s, len(keys))
    per_product: dict[str, set[int]] = defaultdict(set)
    for _, _, product, version in results:
        per_product[product].add(version)
    assert all(len(v) == 1 for v in per_product.values()), "one product, one version"
    for product, (version,) in per_product.items():
        assert (version == 2) == (canary_bucket(product) < 0.3)
    share = sum(v == {2} for v in per_product.values()) / len(per_product)
    n = len(per_product)
    assert abs(share - 0.3) < 3 * (0.3 * 0.7 / n) ** 0.5 + 0.02, (share, n)
    assert metric(scorer, "streamtune_shadow_rows_total" + '{task="review_sentiment"}') > 0

    listing = cli(s, "adapters", "list")
    assert "canary 30%" in listing
    cli(s, "adapters", "rollback", TASK)
    wait_until(lambda: metric(scorer, 'streamtune_canary_version{task="review_sentiment"}') == 0, 60,
               "the rollback to reach the scorer", 0.1, scorer.assert_alive)  # fmt: skip
    more = [o for o in plan(s.model.data_dir, [TASK], 60, skip=400) if o.valid]
    replay(s, [TASK], limit=60, skip=400)
    more_keys = [score_key(TASK, event_id(o)) for o in more]
    wait_until(lambda: redis_client.exists(*more_keys) == len(more_keys), 120, "post-rollback results", 0.3,
               scorer.assert_alive)  # fmt: skip
    for key in more_keys:
        assert json.loads(redis_client.get(key) or "{}")["adapter"]["version"] == 1
    diff = cli(s, "adapters", "diff", TASK, "1", "2")
    assert "macro_f1" in diff
    scorer.stop()

"""The cascade on the real stack: a version built from the committed v1 transformer with a linear
stage fitted on real training rows (``training/attach.py``), served by a real scorer process to a
replayed stream of reviews and queries."""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from test_e2e import all_scored, check_aggregates, event_id, expected
from test_rollout import metric

from streamtune.core.events import ReviewEvent
from streamtune.core.settings import Settings
from streamtune.devtools.demo.replay import replay
from streamtune.kafka.topics import ensure_topics
from streamtune.model.cascade import CascadeRule, ScorePath, route
from streamtune.model.linear import LinearStage
from streamtune.rollout.registry import LocalRegistry, Manifest
from streamtune.rollout.releases import ReleaseLog
from streamtune.rollout.state import canary, in_canary
from streamtune.scorer.sink import score_key
from streamtune.training.attach import cascade_from
from streamtune.training.bootstrap import TrainConfig
from support import ScorerProcess, consume_all, read_topic, wait_until
from support.registry import pinned_registry

pytestmark = pytest.mark.integration

TASK = "review_sentiment"
# Small but real: the stage on 3,000 training rows, the rule on 400 validation rows.
CFG = TrainConfig(linear_rows=3000, validation_rows=400, eval_rows=300)


@pytest.fixture(scope="module")
def cascade_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cascade") / "adapters"
    pinned_registry(root)
    s = Settings()
    registry = LocalRegistry(root)
    m = cascade_from(TASK, 1, s.model.base_model, s.model.data_dir, registry, CFG)
    assert m.version == 2 and m.parent_version == 1
    return root


def _manifest(root: Path, version: int = 2) -> Manifest:
    return LocalRegistry(root).manifest(TASK, version)


def test_a_cascade_version_carries_its_stage_rule_and_report(cascade_registry: Path) -> None:
    registry = LocalRegistry(cascade_registry)
    m = registry.verify(TASK, 2)  # every checksum, the linear files included
    v1 = registry.manifest(TASK, 1)
    assert {"linear.safetensors", "linear.json"} <= set(m.files)
    assert {k: v for k, v in m.files.items() if not k.startswith("linear.")} == v1.files  # same transformer
    report = m.cascade
    assert set(report["rule"]) == {"threshold", "weight", "min_coverage"}
    assert report["validation_rows"] == m.training["validation_rows"] > 0
    # v1 sampled its rows from the whole training split: those validation rows are left out
    assert m.training["validation_rows_left_out_as_seen"] > 0
    held = report["held_out"]
    assert held["rows"] == 300 and m.metrics == held["cascade"]
    assert set(m.baselines) == {"majority", "tfidf_logreg", "tfidf_logreg_unbalanced"}
    assert math.isclose(sum(held["shares"].values()), 1.0)
    # the rule was chosen on validation: its cascade reached the better single model there
    assert report["metric_cascade"] >= report["metric_best_single"] - 1e-12 or not report["satisfied"]
    # tampering with the stage's file is refused like any adapter file
    meta = cascade_registry / TASK / "2" / "linear.json"
    original = meta.read_bytes()
    try:
        meta.write_bytes(original.replace(b'"C"', b'"C" '))
        with pytest.raises(Exception, match="checksum"):
            registry.verify(TASK, 2)
    finally:
        meta.write_bytes(original)


@pytest.fixture
def adapters(cascade_registry: Path, tmp_path: Path) -> Path:
    """This test's own copy of the registry with the cascade version."""
    root = tmp_path / "adapters"
    shutil.copytree(cascade_registry, root)
    return root


def test_a_stream_is_scored_through_the_cascade_and_survives_a_sigkill(
    settings: Settings,
    redis_client: redis.Redis,
    scorer_factory: Callable[[Settings], ScorerProcess],
    adapters: Path,
) -> None:
    s = settings.replace(adapter_dir=adapters)
    ensure_topics(s)
    tasks = [TASK, "query_class"]
    outs = list(expected(s, limit=240, malformed=0.0, seed=21))
    outs = [o for o in outs if o.task in tasks]
    reviews = [o for o in outs if o.task == TASK]
    replay(s, tasks, limit=240, seed=21)
    first = scorer_factory(s).start()
    review_keys = [score_key(TASK, event_id(o)) for o in reviews]
    wait_until(
        lambda: redis_client.exists(*review_keys) >= 30, 300, "some cascade results", 0.1, first.assert_alive
    )
    first.kill()
    second = scorer_factory(s).start()
    wait_until(all_scored(redis_client, outs), 300, "every event scored after the restart", 0.5,
               second.assert_alive, context=second.log_tail)  # fmt: skip
    check_aggregates(redis_client, outs)

    # at least once across the kill: some results twice, so read the whole topic
    results = [json.loads(m.value) for m in read_topic(s, "scores.review")]
    latest: dict[str, dict] = {r["event_id"]: r for r in results}  # type: ignore[type-arg]
    assert len(latest) == len(reviews)
    for r in latest.values():
        assert r["adapter"] == {"task": TASK, "version": 2}
        assert r["path"] in {"linear", "blend", "transformer"}
        assert isinstance(r["reasons"], list) and len(r["reasons"]) <= 5
        weights = [t["weight"] for t in r["reasons"]]
        assert weights == sorted(weights, reverse=True)
    queries = [
        json.loads(m.value)
        for m in consume_all(s, "scores.search", sum(o.task == "query_class" for o in outs))
    ]
    assert queries and all(q["path"] == "transformer" and q["adapter"]["version"] == 1 for q in queries)

    # Each event took the path its text and the version decide, whatever batch it was in and
    # across the kill (the stage and rule read back from the version's own files).
    stage = LinearStage.load(adapters / TASK / "2")
    rule = CascadeRule.from_dict(_manifest(adapters).cascade["rule"])
    texts = {event_id(o): ReviewEvent.model_validate_json(o.value).model_text() for o in reviews}
    ids = sorted(texts)
    probs, coverage = stage.score([texts[i] for i in ids])
    predicted_paths = [ScorePath(int(c)).label for c in route(probs, coverage, rule)]
    assert [latest[i]["path"] for i in ids] == predicted_paths

    # The share answered by the linear stage alone is what validation predicted, within
    # sampling error of both samples (4.5 standard errors). The replayed reviews are a fixed
    # sample (partly training rows), so this is a coarse check; the exact one is above.
    m = _manifest(adapters)
    predicted = m.cascade["share_linear"]
    n_val, n = m.cascade["validation_rows"], len(latest)
    seen = Counter(r["path"] for r in latest.values())
    share = seen["linear"] / n
    se = math.sqrt(max(predicted * (1 - predicted), 0.25 / n) * (1 / n + 1 / n_val))
    assert abs(share - predicted) <= 4.5 * se, (share, predicted, seen)
    assert second.stop() == 0


def test_a_canary_with_its_own_threshold_serves_its_own_entities_only(
    settings: Settings,
    redis_client: redis.Redis,
    scorer_factory: Callable[[Settings], ScorerProcess],
    adapters: Path,
    tmp_path: Path,
) -> None:
    registry = LocalRegistry(adapters)
    v2 = registry.manifest(TASK, 2)
    build = tmp_path / "build-v3"
    shutil.copytree(adapters / TASK / "2", build, ignore=shutil.ignore_patterns("manifest.json", "artifacts"))
    rule = {**v2.cascade["rule"], "threshold": 1.0}  # v3: the linear stage never answers alone
    v3 = registry.publish(
        build,
        v2.model_copy(update={"version": 3, "parent_version": 2, "cascade": {**v2.cascade, "rule": rule},
                              "files": {}, "signature": ""}),
    )  # fmt: skip
    s = settings.replace(adapter_dir=adapters)
    ensure_topics(s)
    ReleaseLog(s).publish(canary(TASK, 3, 0.5, 2, registry.manifest_sha256(TASK, v3.version)))
    outs = [o for o in expected(s, limit=120, malformed=0.0, seed=23) if o.task == TASK]
    scorer = scorer_factory(s).start()
    t = threading.Thread(target=replay, kwargs={"settings": s, "tasks": [TASK], "limit": 120, "seed": 23})
    t.start()
    t.join(timeout=120)
    wait_until(all_scored(redis_client, outs), 300, "every review scored", 0.5, scorer.assert_alive)
    messages = [json.loads(m.value) for m in consume_all(s, "scores.review", len(outs))]
    results = {r["event_id"]: r for r in messages}
    assert len(results) == len(outs)
    # what the scorer counted per path is what it published (one scorer, no re-delivery)
    for path in ("linear", "blend", "transformer"):
        counted = metric(scorer, f'streamtune_results_by_path_total{{path="{path}",task="{TASK}"}}')
        assert counted == sum(r["path"] == path for r in messages), path
    by_version = Counter(r["adapter"]["version"] for r in results.values())
    assert by_version[2] and by_version[3], by_version
    for r in results.values():
        version = r["adapter"]["version"]
        assert version == (3 if in_canary(r["product_id"], 0.5) else 2), r["product_id"]
        if version == 3:
            assert r["path"] != "linear", "v3's threshold of 1 never lets the linear stage answer alone"
    assert scorer.stop() == 0

"""The end-to-end path against a 3-node Redis Cluster (Debian's redis packages, started here):
every event scored, every aggregate exact, as against a single Redis; and the sink's product
script on hostile product ids (an empty hash tag, braces, a newline) still one slot per product."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.cluster import RedisCluster
from test_e2e import TASKS, all_scored, check_aggregates, expected
from test_sink_keys_on_redis import HOSTILE_IDS, two_reviews_each, write

from streamtune.core.settings import Settings
from streamtune.devtools.demo.replay import replay
from streamtune.devtools.stack import RedisClusterStack
from streamtune.kafka.topics import ensure_topics
from streamtune.scorer.sink import product_key, product_ledger_key
from support import ScorerProcess, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterStack]:
    with RedisClusterStack(tmp_path / "redis-cluster") as c:
        yield c


def test_scoring_against_a_redis_cluster_is_exact(
    settings: Settings, cluster: RedisClusterStack, scorer_factory: Callable[[Settings], ScorerProcess]
) -> None:
    s = settings.replace(redis_url=cluster.url, redis_cluster=True)
    client = RedisCluster.from_url(cluster.url, decode_responses=True)
    assert len(client.get_primaries()) == 3
    # A product's view and its ledger are updated by one script: one hash slot.
    for product_id in ["1077", *HOSTILE_IDS]:
        assert client.keyslot(product_key(product_id)) == client.keyslot(product_ledger_key(product_id))
    ensure_topics(s)
    outs = expected(s, limit=40, malformed=0.05, seed=13)
    replay(s, TASKS, limit=40, malformed_share=0.05, seed=13)
    scorer = scorer_factory(s).start()
    wait_until(all_scored(client, outs), 240, "every event scored in the cluster", 0.3, scorer.assert_alive)  # type: ignore[arg-type]
    check_aggregates(client, outs)  # type: ignore[arg-type]
    # Hostile ids through the cluster client: a script whose keys span two slots is refused
    # before it is sent (and the sink would retry it for ever; write() bounds the wait).
    write(cluster.url, two_reviews_each(HOSTILE_IDS), "cluster")
    for product_id in HOSTILE_IDS:
        view = client.hgetall(product_key(product_id))
        assert view["product_id"] == product_id and view["reviews"] == "2", product_id
    # The keys really are spread over the nodes.
    per_node = [n.redis_connection.dbsize() for n in client.get_primaries()]
    assert all(n > 0 for n in per_node), per_node
    client.close()
    assert scorer.stop() == 0

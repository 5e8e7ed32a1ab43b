"""Redis key names survive any id: a product's view and its ledger share a Redis Cluster slot
(the sink updates both in one script, which a cluster client refuses across slots), keys are short
printable ASCII, distinct ids never share a key, and braces in ids cannot steer keys into one slot.
Slots are computed as Redis does (CRC16/XMODEM of the hash tag, modulo 16384), both with redis-py's
``key_slot`` (what its cluster client checks before sending) and with an independent reference.
The sink's writes are checked against a recording client; the scripts themselves run against a
real Redis in tests/integration/test_sink_keys.py."""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import string
from typing import Any

import pytest
from redis.crc import key_slot

from streamtune.scorer import sink
from streamtune.scorer.sink import (
    RedisSink,
    key_tag,
    product_key,
    product_ledger_key,
    product_terms_key,
    score_key,
    session_key,
)
from support.results import NOW, click, review

HOSTILE_IDS = [
    "}",  # old keys: "streamtune:product:{}}", an empty tag, so view and ledger hashed apart
    "}{",
    "}abc{",
    "}{x}",
    "{}",
    "{}x",
    "{x}",
    "a{b}c",
    "a}b{c",
    "p:1:scored",
    "with space",
    "new\nline",
    "tab\tand\r",
    "ünïcødé 商品 🛒",
    "}{" * 64,  # the longest id a payload may carry (128 characters)
    "{" * 128,
]
SLOTS = 16384


def reference_slot(key: str) -> int:
    """The Redis Cluster spec, written out: the hash tag is what lies between the first ``{`` and
    the first ``}`` after it, if that is not empty; CRC16/XMODEM (``binascii.crc_hqx``, seed 0)."""
    raw = key.encode("utf-8")
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return binascii.crc_hqx(raw, 0) % SLOTS


def slot(key: str) -> int:
    ours, redis_py = reference_slot(key), key_slot(key.encode("utf-8"))
    assert ours == redis_py, key
    return ours


def short(entity_id: str) -> str:
    return repr(entity_id)[:14]


def every_key(entity_id: str) -> list[str]:
    return [
        product_key(entity_id),
        product_ledger_key(entity_id),
        session_key(entity_id),
        score_key("review_sentiment", entity_id),
    ]


def test_the_reference_slot_is_the_redis_one() -> None:
    """CRC16/XMODEM check value of the spec, and the spec's tag rules, on which both agree."""
    assert binascii.crc_hqx(b"123456789", 0) == 0x31C3
    for key in ["user1000", "{user1000}.following", "foo{}{bar}", "foo{{bar}}zap", "foo{bar}{zap}", "}{"]:
        slot(key)
    assert slot("{user1000}.following") == slot("user1000")
    assert slot("foo{}{bar}") == reference_slot("foo{}{bar}")  # an empty tag: the whole key counts


@pytest.mark.parametrize("product_id", HOSTILE_IDS, ids=short)
def test_a_products_view_and_ledger_share_a_slot(product_id: str) -> None:
    view, ledger = product_key(product_id), product_ledger_key(product_id)
    assert view != ledger
    assert slot(view) == slot(ledger) == slot(key_tag(product_id))


@pytest.mark.parametrize("entity_id", HOSTILE_IDS, ids=short)
def test_every_key_is_short_printable_ascii_tagged_by_the_digest(entity_id: str) -> None:
    allowed = set(string.ascii_letters + string.digits + ":_{}")
    for key in every_key(entity_id):
        assert set(key) <= allowed, key
        assert len(key) <= 80, key
        assert key.count("{") == 1 and key.count("}") == 1, key
        assert f"{{{key_tag(entity_id)}}}" in key
        assert key.startswith("streamtune:v2:")


def test_the_tag_is_the_documented_digest() -> None:
    """Subscribers in other languages rebuild keys from the module docstring: keep both true."""
    for entity_id in ["1077", *HOSTILE_IDS]:
        tag = hashlib.sha256(entity_id.encode("utf-8")).hexdigest()[:32]
        assert product_key(entity_id) == f"streamtune:v2:product:{{{tag}}}"
        assert product_ledger_key(entity_id) == f"streamtune:v2:product:{{{tag}}}:scored"
        assert session_key(entity_id) == f"streamtune:v2:session:{{{tag}}}"
        assert score_key("query_class", entity_id) == f"streamtune:v2:score:query_class:{{{tag}}}"
    assert sink.__doc__ is not None
    assert f'product_key("1077") == "{product_key("1077")}"' in sink.__doc__


def test_distinct_ids_never_share_a_key() -> None:
    near = ["a", "a:scored", "{a}", "a}", "{a", "a ", " a", "A", "p:1", "p", *HOSTILE_IDS]
    keys = [k for entity_id in near for k in every_key(entity_id)]
    assert len(set(keys)) == len(keys)


def test_ids_sharing_a_braced_part_spread_over_the_slots() -> None:
    """Old keys took ``{hot}`` in an id as the hash tag: every such session in one slot."""
    ids = [f"{{hot}}-{i}" for i in range(200)]
    for key_of in (session_key, lambda i: score_key("purchase_intent", i), product_key):
        assert len({slot(key_of(i)) for i in ids}) > 150


# The sink's writes, against a client that records them --------------------------------------


class RecordingPipeline:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def __aenter__(self) -> RecordingPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def set(self, key: str, value: bytes, ex: int | None = None) -> None:
        self.calls.append(("set", key, ex))

    def hset(self, key: str, mapping: dict[str, Any]) -> None:
        self.calls.append(("hset", key, mapping))

    def expire(self, key: str, seconds: int) -> None:
        self.calls.append(("expire", key, seconds))

    async def execute(self) -> list[Any]:
        return []


class RecordingClient:
    """What RedisSink uses of a redis.asyncio client: scripts and a non-transactional pipeline."""

    def __init__(self) -> None:
        self.scripts: list[tuple[list[str], list[str]]] = []
        self.pipelines: list[RecordingPipeline] = []

    def register_script(self, script: str) -> Any:
        async def run(keys: list[str], args: list[str], client: Any = None) -> int:
            self.scripts.append((list(keys), list(args)))
            return 1

        return run

    def pipeline(self, transaction: bool = True) -> RecordingPipeline:
        self.pipelines.append(RecordingPipeline())
        return self.pipelines[-1]


@pytest.mark.parametrize("cluster", [False, True], ids=["pipeline", "cluster"])
def test_each_product_script_names_one_slot_and_sets_the_product_ttl(cluster: bool) -> None:
    client = RecordingClient()
    s = RedisSink(client, score_ttl_s=100, session_ttl_s=200, product_ttl_s=3000, cluster=cluster)  # type: ignore[arg-type]
    results = [review(f"r{i}", p) for i, p in enumerate(HOSTILE_IDS)]
    results += [click(f"c{i}", p) for i, p in enumerate(HOSTILE_IDS)]
    asyncio.run(s.write(results, NOW.isoformat()))

    assert len(client.scripts) == len(HOSTILE_IDS)
    for (keys, args), product_id in zip(client.scripts, HOSTILE_IDS, strict=True):
        # What redis-py's cluster client checks before it sends a script.
        assert len({slot(k) for k in keys}) == 1, (product_id, keys)
        assert keys == [
            product_key(product_id),
            product_ledger_key(product_id),
            product_terms_key(product_id),
        ]
        assert args[4] == "3000" and args[5] == product_id
    (pipe,) = client.pipelines
    hsets = {c[1]: c[2] for c in pipe.calls if c[0] == "hset"}
    expires = {c[1]: c[2] for c in pipe.calls if c[0] == "expire"}
    for session_id in HOSTILE_IDS:
        assert hsets[session_key(session_id)]["session_id"] == session_id
        assert expires[session_key(session_id)] == 200
    sets = {c[1]: c[2] for c in pipe.calls if c[0] == "set"}
    assert sets[score_key("review_sentiment", "r0")] == 100

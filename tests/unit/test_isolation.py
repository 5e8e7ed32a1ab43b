"""A batch that keeps failing while the services answer is retried a bounded number of times,
then bisected: the records that succeed are written and published once, and a record that
fails alone goes to the dead-letter topic with its stage, topic, partition and offset. A
transient failure (broker away) is raised for the batch to be read again, and what was
delivered before is not sent again.

The model runtime, the Redis sink and the producer are unit-level stand-ins; the batch runs
through the real :class:`BatchProcessor` (decode, encoders, isolation)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    ProducerClosed,
    TopicAuthorizationFailedError,
)

from streamtune.core.decode import Source
from streamtune.core.errors import SinkError
from streamtune.core.scored import Scored
from streamtune.core.settings import Settings
from streamtune.ops.telemetry import ScorerMetrics
from streamtune.scorer.isolation import is_transient
from streamtune.scorer.pipeline import BatchProcessor

LABELS = ["negative", "neutral", "positive"]
TOPIC = "events.review"


class Runtime:
    """Scores texts; a text containing POISON makes the whole call raise (as a model error
    would), NAN gives a non-finite row."""

    def __init__(self) -> None:
        self.calls = 0

    def split(self, task: str, inputs: list[str], keys: list[str], shadow: bool) -> None:
        return None  # a version without a linear stage: one pass (test_pipeline covers two)

    def score(self, task: str, inputs: list[str], keys: list[str], shadow: bool) -> Scored:
        self.calls += 1
        if any("POISON" in x for x in inputs):
            raise ValueError("input the model cannot take")
        probs = np.tile(np.array([[0.1, 0.2, 0.7]], dtype=np.float32), (len(inputs), 1))
        for i, x in enumerate(inputs):
            if "NAN" in x:
                probs[i, 0] = np.nan
        return Scored(task, LABELS, probs, np.ones(len(inputs), dtype=np.int64))


class Sink:
    """Records written event ids; a batch holding SINKPOISON is refused (not an outage)."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.discarded: list[tuple[str, str]] = []

    async def write(self, results: Any, now_iso: str) -> None:
        if any("sinkpoison" in r.event_id for r in results):
            raise SinkError("CROSSSLOT Keys in request don't hash to the same slot")
        self.written.extend(r.event_id for r in results)

    async def discard(self, task: str, event_id: str) -> None:
        self.discarded.append((task, event_id))


class Publisher:
    """Deliveries resolve at once; a value holding TOOBIG is refused by the broker (its future
    fails), and ``down`` makes every flush fail as a lost connection does."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.down = False
        self.dlq_refuses: Exception | None = None  # what the dead-letter topic answers, if not ok

    async def send(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if topic.endswith("events.dlq") and self.dlq_refuses is not None:
            fut.set_exception(self.dlq_refuses)
        elif b"TOOBIG" in value:
            fut.set_exception(MessageSizeTooLargeError())
        else:
            self.sent.append((topic, value))
            fut.set_result(None)
        return fut

    async def flush(self, deliveries: Any) -> None:
        if self.down:
            raise KafkaConnectionError("broker went away")
        for fut in deliveries:
            fut.result()

    def results(self) -> list[str]:
        return [json.loads(v)["event_id"] for t, v in self.sent if t.endswith("scores.review")]

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(v) for t, v in self.sent if t.endswith("events.dlq")]


def review(i: int, text: str = "lovely dress") -> tuple[bytes, Source]:
    raw = json.dumps(
        {"event_id": f"r{i}", "ts": "2026-01-01T00:00:00Z", "product_id": f"p{i % 3}", "text": text}
    ).encode()
    return raw, Source(TOPIC, i % 2, 100 + i, f"p{i % 3}".encode())


def make(
    runtime: Runtime | None = None, retries: int = 2
) -> tuple[BatchProcessor, Sink, Publisher, ScorerMetrics]:
    settings = Settings(batch_step_timeout_s=5.0, batch_retries=retries, batch_retry_backoff_s=0.0)
    sink, publisher, metrics = Sink(), Publisher(), ScorerMetrics()
    proc = BatchProcessor(
        settings,
        runtime or Runtime(),
        ThreadPoolExecutor(1),
        sink,
        publisher,
        metrics,  # type: ignore[arg-type]
    )
    return proc, sink, publisher, metrics


def value(metrics: ScorerMetrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def run(proc: BatchProcessor, records: list[tuple[bytes, Source]]) -> Any:
    async def go() -> Any:
        return await proc.finish(await proc.start("review_sentiment", records))

    return asyncio.run(go())


def test_a_record_the_model_cannot_take_is_isolated_and_the_rest_scored_once() -> None:
    records = [review(i) for i in range(8)]
    records[5] = review(5, "POISON pill")
    proc, _, pub, metrics = make(retries=2)
    outcome = run(proc, records)
    assert (outcome.scored, outcome.isolated) == (7, 1)
    assert sorted(pub.results()) == sorted(f"r{i}" for i in range(8) if i != 5)
    assert Counter(pub.results()).most_common(1)[0][1] == 1, "no result published twice"
    (dl,) = pub.dead_letters()
    assert (dl["source_topic"], dl["partition"], dl["offset"]) == (TOPIC, 1, 105)
    assert dl["error"].startswith("model: ValueError: input the model cannot take")
    assert "POISON pill" in dl["raw"] and dl["stage"] == "model"
    assert value(metrics, "streamtune_batch_retries_total", task="review_sentiment", stage="model") == 3
    assert value(metrics, "streamtune_isolated_records_total", task="review_sentiment", stage="model") == 1


def test_a_non_finite_model_output_is_isolated_without_a_retry() -> None:
    records = [review(i) for i in range(4)]
    records[2] = review(2, "NAN maker")
    proc, _, pub, metrics = make()
    outcome = run(proc, records)
    assert (outcome.scored, outcome.isolated) == (3, 1)
    assert sorted(pub.results()) == ["r0", "r1", "r3"]
    (dl,) = pub.dead_letters()
    assert dl["offset"] == 102 and "not finite" in dl["error"]
    assert value(metrics, "streamtune_batch_retries_total", task="review_sentiment", stage="model") == 0


def test_a_write_redis_refuses_isolates_that_record_at_the_sink_stage() -> None:
    records = [review(i) for i in range(6)]
    raw = json.loads(records[3][0])
    raw["event_id"] = "sinkpoison-3"
    records[3] = (json.dumps(raw).encode(), records[3][1])
    proc, sink, pub, _ = make(retries=1)
    outcome = run(proc, records)
    assert (outcome.scored, outcome.isolated) == (5, 1)
    assert sorted(sink.written) == ["r0", "r1", "r2", "r4", "r5"]
    (dl,) = pub.dead_letters()
    assert dl["offset"] == 103 and dl["error"].startswith("sink: SinkError: CROSSSLOT")
    assert dl["stage"] == "sink"
    # the score key its failed pipeline may have written is deleted: no result for a dead letter
    assert sink.discarded == [("review_sentiment", "sinkpoison-3")]


def test_a_result_the_broker_refuses_is_isolated_and_no_result_is_sent_twice() -> None:
    records = [review(i) for i in range(5)]
    raw = json.loads(records[1][0])
    raw["event_id"] = "TOOBIG-1"  # its result is refused; its dead letter too (raw holds it)
    records[1] = (json.dumps(raw).encode(), records[1][1])
    proc, _, pub, _ = make(retries=2)
    outcome = run(proc, records)
    assert (outcome.scored, outcome.isolated) == (4, 1)
    assert Counter(pub.results()) == Counter({"r0": 1, "r2": 1, "r3": 1, "r4": 1})
    (dl,) = [d for d in pub.dead_letters() if d["offset"] == 101]
    assert dl["error"].startswith("publish: MessageSizeTooLargeError") and dl["stage"] == "publish"
    assert dl["raw"] is None, "the refused dead letter went again without its raw value"


@pytest.mark.parametrize(
    "refusal",
    [TopicAuthorizationFailedError(), ProducerClosed(), RuntimeError("nobody foresaw this")],
    ids=["acl", "producer-closed", "unforeseen"],
)
def test_a_dead_letter_refused_for_no_size_reason_pauses_the_batch_and_loses_nothing(
    refusal: Exception,
) -> None:
    """Before: refused with its raw value, then without it, the dead letter was counted lost and
    the batch completed, so its offsets were committed past a record that reached no topic. Now
    the batch fails as in an outage (read again later), and once the dead-letter topic takes
    records again the record lands there, once."""
    records = [review(0), review(1, "POISON"), review(2)]
    proc, _, pub, metrics = make(retries=1)
    pub.dlq_refuses = refusal

    async def go() -> None:
        with pytest.raises(Exception) as err:
            await proc.finish(await proc.start("review_sentiment", records))
        assert is_transient(err.value), "the scorer pauses and re-reads; it does not commit"
        assert value(metrics, "streamtune_dead_letters_lost_total", task="review_sentiment") == 0
        # an ACL or a closing producer is an outage everywhere (batch failures count it); an
        # unforeseen refusal of both letters is counted here
        unforeseen = not isinstance(refusal, TopicAuthorizationFailedError | ProducerClosed)
        assert (
            value(metrics, "streamtune_dead_letters_unavailable_total", task="review_sentiment") == unforeseen
        )
        pub.dlq_refuses = None  # the operator fixes the ACL
        outcome = await proc.finish(await proc.start("review_sentiment", records))  # read again
        assert (outcome.scored, outcome.isolated) == (2, 1)

    asyncio.run(go())
    (dl,) = pub.dead_letters()
    assert dl["offset"] == 101 and dl["stage"] == "model" and "POISON" in dl["raw"]
    assert Counter(pub.results()) == Counter({"r0": 1, "r2": 1}), "delivered once"


def test_a_dead_letter_refused_for_its_size_goes_again_without_its_raw_value() -> None:
    records = [review(0), review(1, "POISON " + "x" * 200)]
    proc, _, pub, metrics = make(retries=0)
    real_send = pub.send

    async def refuse_big(topic: str, key: bytes | None, value: bytes) -> asyncio.Future[Any]:
        if topic.endswith("events.dlq") and b"xxxx" in value:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_exception(MessageSizeTooLargeError())
            return fut
        return await real_send(topic, key, value)

    pub.send = refuse_big  # type: ignore[method-assign]
    outcome = run(proc, records)
    assert (outcome.scored, outcome.isolated) == (1, 1)
    (dl,) = pub.dead_letters()
    assert dl["offset"] == 101 and dl["raw"] is None and dl["raw_b64"] is None
    assert value(metrics, "streamtune_dead_letters_lost_total", task="review_sentiment") == 0


def test_decode_dead_letters_are_not_sent_again_when_the_batch_is_retried() -> None:
    records = [review(0), (b"{not json", Source(TOPIC, 0, 50)), review(1, "POISON")]
    proc, _, pub, _ = make(retries=3)
    outcome = run(proc, records)
    assert outcome.scored == 1 and outcome.isolated == 1
    offsets = Counter(d["offset"] for d in pub.dead_letters())
    assert offsets == Counter({50: 1, 101: 1}), "each dead letter exactly once"


def test_a_broker_outage_is_raised_for_a_re_read_and_delivered_results_are_not_resent() -> None:
    records = [review(i) for i in range(4)]
    proc, _, pub, metrics = make()

    async def go() -> None:
        pub.down = True
        with pytest.raises(KafkaConnectionError) as err:
            await proc.finish(await proc.start("review_sentiment", records))
        assert is_transient(err.value)
        assert sorted(pub.results()) == ["r0", "r1", "r2", "r3"]  # sent before the flush failed
        pub.down = False
        outcome = await proc.finish(await proc.start("review_sentiment", records))  # read again
        assert outcome.scored == 4 and outcome.isolated == 0

    asyncio.run(go())
    assert Counter(pub.results()) == Counter({f"r{i}": 1 for i in range(4)}), "delivered once"
    retried = [value(metrics, "streamtune_batch_retries_total", task="review_sentiment", stage=s)
               for s in ("model", "encode", "sink", "publish", "dead_letter", "batch")]  # fmt: skip
    assert sum(retried) == 0, "an outage is re-read, never retried in place"
    assert len(proc.delivered) == 0, "a completed batch leaves nothing behind"


def test_without_retries_the_batch_is_bisected_at_once() -> None:
    runtime = Runtime()
    records = [review(i) for i in range(16)]
    records[9] = review(9, "POISON")
    proc, _, _, _ = make(runtime, retries=0)
    outcome = run(proc, records)
    assert (outcome.scored, outcome.isolated) == (15, 1)
    # 1 full run + the bisection's runs: O(log n) groups fail, never one run per record
    assert runtime.calls <= 1 + 2 * 4 + 1


def test_transient_and_deterministic_failures_are_told_apart() -> None:
    from streamtune.core.errors import BatchStalledError
    from streamtune.scorer.isolation import StageError

    assert is_transient(KafkaConnectionError())
    assert is_transient(BatchStalledError("flush took too long"))
    assert is_transient(StageError("publish", ConnectionError("reset")))
    assert not is_transient(MessageSizeTooLargeError())
    assert not is_transient(StageError("model", ValueError("nan")))
    assert not is_transient(SinkError("CROSSSLOT"))
    assert is_transient(StageError("publish", TopicAuthorizationFailedError()))  # every record alike
    assert is_transient(ProducerClosed())

"""Where a consumer group resumes, asked of the real broker (the offset guard's baseline)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

from streamtune.core.settings import Settings
from streamtune.kafka.group_offsets import GroupOffsetsError, GroupStartOffsets


def test_resume_offset_is_the_commit_else_the_log_start(settings: Settings) -> None:
    topic = settings.topic("group-offsets")
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    try:
        admin.create_topics([NewTopic(topic, 3, 1)])
        for p in range(3):
            for i in range(4):
                producer.send(topic, value=b"x%d" % i, partition=p)
        producer.flush()
        t0, t1, t2 = (TopicPartition(topic, p) for p in range(3))
        admin.delete_records({t2: 2})  # retention moved partition 2's log start to 2
        group = "g-offsets"
        committer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, group_id=group)
        try:
            # partition 1: a commit; partition 2: a commit below the log start (retention)
            committer.commit({t1: OffsetAndMetadata(3, "", -1), t2: OffsetAndMetadata(1, "", -1)})
        finally:
            committer.close()
        starts = GroupStartOffsets(settings, group)
        found = asyncio.run(starts.starts({(topic, 0), (topic, 1), (topic, 2)}))
        # a committed 0 is a commit too (Faust's cache maps it to "none")
        committer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, group_id=group)
        try:
            committer.commit({t0: OffsetAndMetadata(0, "", -1)})
        finally:
            committer.close()
        again = starts.starts_sync({(topic, 0)})
        new_group = GroupStartOffsets(settings, "a-group-never-seen").starts_sync({(topic, 1), (topic, 2)})
    finally:
        producer.close()
        admin.close()
    assert found == {(topic, 0): 0, (topic, 1): 3, (topic, 2): 2}
    assert again == {(topic, 0): 0}
    assert new_group == {(topic, 1): 0, (topic, 2): 2}


def test_an_unreachable_broker_is_a_clear_error(settings: Settings) -> None:
    bad = settings.replace(bootstrap_servers="127.0.0.1:9")
    starts = GroupStartOffsets(bad, "g", timeout_s=2)
    with pytest.raises(GroupOffsetsError, match="group g"):
        starts.starts_sync({("t", 0)})
    with pytest.raises(GroupOffsetsError, match="group g"):  # the async form says the same
        asyncio.run(starts.starts({("t", 0)}))


def test_a_lookup_without_answer_is_abandoned_and_the_next_one_starts_afresh(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wedged client (a call that never returns: a unit-level stand-in for the blocking
    kafka-python call) costs one bounded wait, and does not hold up the next lookup."""
    import threading

    release = threading.Event()
    starts = GroupStartOffsets(settings, "g-wedged", timeout_s=0.5)
    real = starts.starts_sync
    calls = []

    def first_call_wedges(tps: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
        calls.append(threading.get_ident())  # the first thread is still blocked: idents differ
        if len(calls) == 1:
            release.wait(30)
            return {}
        return real(tps)

    monkeypatch.setattr(starts, "starts_sync", first_call_wedges)
    topic = settings.topic("group-offsets-wedged")
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])
        with pytest.raises(GroupOffsetsError, match=r"no answer in 0\.5 s"):
            asyncio.run(starts.starts({(topic, 0)}))
        starts.timeout_s = 10
        assert asyncio.run(starts.starts({(topic, 0)})) == {(topic, 0): 0}
        assert len(calls) == 2 and calls[0] != calls[1], "the second lookup ran on a new thread"
    finally:
        release.set()
        admin.close()


def test_the_assignment_handler_runs_once_whatever_the_lookup_does(settings: Settings) -> None:
    """SkipGuard wraps Faust's assignment handler: the lookup runs first, and Faust's handler
    runs exactly once after it, also when the lookup fails or raises something unexpected
    (without it the assignment would never be fetched). Faust's consumer handler is the
    unit-level stand-in here; the wrapper runs for real in test_e2e and test_lifecycle."""
    import faust
    from faust.types import TP

    from streamtune.kafka.guard import SkipGuard

    app = faust.App("wrap-test", broker=f"kafka://{settings.kafka.bootstrap_servers}")
    topic = app.topic("in")

    @app.agent(topic, name="a")
    async def agent(stream: Any) -> None:
        async for _ in stream:
            pass

    guard = SkipGuard(app, settings=settings)
    handled: list[tuple[set[TP], int]] = []

    async def faust_handler(assigned: set[TP], generation_id: int = 0) -> None:
        handled.append((assigned, generation_id))

    app.consumer.on_partitions_assigned = faust_handler  # type: ignore[method-assign]
    guard._install_start_lookup()
    guard._install_start_lookup()  # installed once, however often revocations come

    class Failing:
        def __init__(self, error: Exception) -> None:
            self.error = error

        async def starts(self, tps: Any) -> dict[tuple[str, int], int]:
            raise self.error

    class Answering:
        async def starts(self, tps: Any) -> dict[tuple[str, int], int]:
            return dict.fromkeys(tps, 7)

    assigned = {TP("in", 0), TP("wrap-test-sessions-changelog", 0)}
    for starts in (Failing(GroupOffsetsError("no answer")), Failing(KeyError("bug")), Answering()):
        guard.starts = starts  # type: ignore[assignment]
        asyncio.run(app.consumer.on_partitions_assigned(assigned, 3))
    assert handled == [(assigned, 3)] * 3
    assert guard.guard.expected(("in", 0)) == 7, "the answer became the guard's baseline"
    assert guard.guard.expected(("wrap-test-sessions-changelog", 0)) is None, "input topics only"

    # A bug in the guard's own handling (not just in the lookup) still lets Faust's handler run.
    async def broken(assigned: Any) -> None:
        raise RuntimeError("a bug in the guard")

    learn = guard._learn_starts
    guard._learn_starts = broken  # type: ignore[method-assign]
    asyncio.run(app.consumer.on_partitions_assigned(assigned, 4))
    assert handled[-1] == (assigned, 4)
    # While the worker stops, no lookup starts (its result would serve nobody).
    looked: list[Any] = []

    async def record(assigned: Any) -> None:
        looked.append(assigned)

    guard._learn_starts = record  # type: ignore[method-assign]
    app._stopped.set()
    asyncio.run(app.consumer.on_partitions_assigned(assigned, 5))
    assert looked == [] and handled[-1] == (assigned, 5)
    guard._learn_starts = learn  # type: ignore[method-assign]

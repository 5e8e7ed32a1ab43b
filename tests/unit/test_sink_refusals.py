"""Which Redis errors pause the sink (an outage: retried in place, nothing isolated) and which
are about the batch (raised, so the scorer isolates the record). A server-wide refusal, such as
memory full under noeviction, must pause: isolating records would dead-letter the whole stream."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    NoPermissionError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)

from streamtune.core.errors import SinkError
from streamtune.scorer.isolation import is_transient
from streamtune.scorer.sink import RedisSink, is_refusing

PAUSING = [
    RedisConnectionError("Connection refused"),
    OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."),
    ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist"),
    ResponseError("BUSY Redis is busy running a script."),
    NoPermissionError("NOPERM this user has no permissions to run the 'evalsha' command"),
]
RAISING = [
    ResponseError("WRONGTYPE streamtune:v2:product:{ab} holds a string, not a hash"),
    ResponseError("ERR Error running script (call to f_1): @user_script:3: bad argument"),
]


class NoClient:
    """The sink's client is never reached: the operation under test is passed to ``_retry``."""

    def register_script(self, script: str) -> None:
        return None


def run(errors: list[RedisError]) -> tuple[int, int]:
    """(attempts, on_retry calls) of one sink operation that raises ``errors`` in turn, then works."""
    calls = {"op": 0, "retry": 0}

    def on_retry() -> None:
        calls["retry"] += 1

    sink = RedisSink(NoClient(), score_ttl_s=1, session_ttl_s=1, retry_max_s=0.01, on_retry=on_retry)  # type: ignore[arg-type]

    async def op() -> str:
        calls["op"] += 1
        if calls["op"] <= len(errors):
            raise errors[calls["op"] - 1]
        return "ok"

    async def go() -> Any:
        return await sink._retry(op)

    assert asyncio.run(go()) == "ok"
    return calls["op"], calls["retry"]


@pytest.mark.parametrize("error", PAUSING, ids=lambda e: str(e).split()[0])
def test_an_outage_or_a_server_wide_refusal_pauses_and_retries(error: RedisError) -> None:
    assert is_refusing(error) or isinstance(error, RedisConnectionError)
    assert run([error, error]) == (3, 2)


@pytest.mark.parametrize("error", RAISING, ids=lambda e: str(e).split()[0])
def test_an_error_about_the_batch_is_raised_for_isolation(error: RedisError) -> None:
    assert not is_refusing(error)
    with pytest.raises(SinkError) as raised:
        run([error])
    assert not is_transient(raised.value)

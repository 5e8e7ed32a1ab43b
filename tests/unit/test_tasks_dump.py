"""The compact asyncio task dump a stalled worker writes on SIGUSR2 (ops/tasks_dump.py)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import structlog

from streamtune.ops.tasks_dump import DUMP_SIGNAL, install_task_dump, task_chains


async def _inner(event: asyncio.Event) -> None:
    await event.wait()


async def _outer(event: asyncio.Event) -> None:
    await _inner(event)


def test_a_task_chain_follows_the_await_chain_down_to_what_it_waits_on() -> None:
    async def main() -> dict[str, list[str]]:
        event = asyncio.Event()
        task = asyncio.create_task(_outer(event), name="waiter")
        await asyncio.sleep(0)
        chains = task_chains(asyncio.get_running_loop())
        event.set()
        await task
        return chains

    chains = asyncio.run(main())
    (waiter,) = [chain for name, chain in chains.items() if name.startswith("waiter")]
    names = [frame.split(" ")[-1] for frame in waiter]
    assert names[:3] == ["_outer", "_inner", "wait"]
    assert waiter[0].startswith("test_tasks_dump.py:")


def test_sigusr2_logs_every_task_as_one_line() -> None:
    async def main(logs: list[dict[str, Any]]) -> None:
        install_task_dump(asyncio.get_running_loop())
        event = asyncio.Event()
        task = asyncio.create_task(_outer(event), name="waiter")
        await asyncio.sleep(0)
        os.kill(os.getpid(), DUMP_SIGNAL)
        for _ in range(100):  # the handler runs on a later loop iteration
            if logs:
                break
            await asyncio.sleep(0.01)
        asyncio.get_running_loop().remove_signal_handler(DUMP_SIGNAL)
        event.set()
        await task

    with structlog.testing.capture_logs() as logs:
        asyncio.run(main(logs))
    (line,) = [e for e in logs if e["event"] == "asyncio_tasks"]
    (waiter,) = [chain for name, chain in line["tasks"].items() if name.startswith("waiter")]
    assert any(frame.endswith(" _inner") for frame in waiter)
    json.dumps(line["tasks"])  # one JSON log line


class _Actor:
    """Like Faust's actors: awaiting it awaits ``coro.__await__()``, a frameless wrapper."""

    def __init__(self, coro: Any) -> None:
        self.coro = coro

    def __await__(self) -> Any:
        return self.coro.__await__()


def test_the_chain_goes_through_a_coroutine_wrapper_as_faust_actors_await() -> None:
    async def through(actor: _Actor) -> None:
        await actor

    async def main() -> dict[str, list[str]]:
        event = asyncio.Event()
        task = asyncio.create_task(through(_Actor(_inner(event))), name="actor")
        await asyncio.sleep(0)
        chains = task_chains(asyncio.get_running_loop())
        event.set()
        await task
        return chains

    (chain,) = [c for name, c in asyncio.run(main()).items() if name.startswith("actor")]
    assert [frame.split(" ")[-1] for frame in chain][:3] == ["through", "_inner", "wait"]

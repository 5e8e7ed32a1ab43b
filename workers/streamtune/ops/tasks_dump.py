"""What every asyncio task of a worker awaits, as one log line, on SIGUSR2.

mode's SIGUSR1 dump prints every frame's local variables and runs to hundreds of kilobytes, so a
stalled test's failure message (and CI's copy of it) is cut before the agents' tasks. This one
is a compact ``file:line function`` chain per task, following each coroutine's ``await`` chain
(``Task.get_stack`` stops at the outermost frame of a suspended coroutine), with the tasks that
run our own code first."""

from __future__ import annotations

import asyncio
import gc
import signal
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

DUMP_SIGNAL = signal.SIGUSR2
DUMP_EVENT = "asyncio_tasks"


def await_chain(coro: Any, limit: int = 40) -> list[str]:
    """``file:line function`` for a coroutine (or async generator) and everything it awaits."""
    frames: list[str] = []
    while coro is not None and len(frames) < limit:
        frame = _first(coro, "cr_frame", "ag_frame", "gi_frame")
        if frame is None:
            inner = _wrapped(coro)  # Faust's actors await ``coro.__await__()``: a coroutine_wrapper
            if inner is None:
                frames.append(type(coro).__name__)
                break
            coro = inner
            continue
        frames.append(f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = _first(coro, "cr_await", "ag_await", "gi_yieldfrom")
    return frames


def _first(obj: Any, *names: str) -> Any:
    for name in names:
        if (value := getattr(obj, name, None)) is not None:
            return value
    return None


def _wrapped(obj: Any) -> Any:
    """The coroutine, async generator or generator a frameless awaitable refers to, if any (a
    ``coroutine_wrapper`` exposes its coroutine only to the garbage collector)."""
    for ref in gc.get_referents(obj):
        if _first(ref, "cr_frame", "ag_frame", "gi_frame") is not None:
            return ref
    return None


def _short(path: str) -> str:
    """A path from its package down: ``faust/streams.py``, ``streamtune/scorer/app.py``."""
    parts = Path(path).parts
    if "site-packages" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("site-packages") :])
    for root in ("streamtune", "asyncio"):
        if root in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(root) :])
    return Path(path).name


def task_chains(loop: asyncio.AbstractEventLoop) -> dict[str, list[str]]:
    """Every task of ``loop`` by name (numbered when names repeat), ours first."""
    chains: list[tuple[str, list[str]]] = []
    for task in asyncio.all_tasks(loop):
        coro = task.get_coro()
        name = f"{task.get_name()[:60]} {getattr(coro, '__qualname__', type(coro).__name__)}"
        chains.append((name, await_chain(coro)))
    chains.sort(key=lambda c: (not any(f.startswith("streamtune/") for f in c[1]), c[0]))
    out: dict[str, list[str]] = {}
    for name, chain in chains:
        key, n = name, 1
        while key in out:
            n += 1
            key = f"{name} #{n}"
        out[key] = chain
    return out


def install_task_dump(loop: asyncio.AbstractEventLoop) -> None:
    """Log :func:`task_chains` as one ``asyncio_tasks`` line whenever the process gets SIGUSR2."""
    loop.add_signal_handler(DUMP_SIGNAL, lambda: log.warning(DUMP_EVENT, tasks=task_chains(loop)))

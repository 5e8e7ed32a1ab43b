"""Bounded waits on a condition: the suite never synchronises with a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(
    cond: Callable[[], Any],
    timeout_s: float,
    what: str,
    poll_s: float = 0.1,
    guard: Callable[[], None] | None = None,
    context: Callable[[], str] | None = None,
) -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout_s``.

    ``guard`` runs before each poll and fails fast (e.g. when a worker process died);
    ``context`` adds what helps explain a timeout (a worker's log tail) to the failure.
    """
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        if guard is not None:
            guard()
        try:
            value = cond()
            if value:
                return value
        except Exception as e:
            last_exc = e
        time.sleep(poll_s)
    raise AssertionError(
        f"timed out after {timeout_s} s waiting for {what}"
        + (f" (last error: {last_exc})" if last_exc else "")
        + (f"\n{context()}" if context is not None else "")
    )

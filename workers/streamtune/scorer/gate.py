"""Whether agents may start a batch: plain asyncio, no Faust (the rebalance hand-over and the
SIGTERM drain close it; see :mod:`streamtune.kafka.handover`)."""

from __future__ import annotations

import asyncio


class BatchGate:
    """Whether agents may start a batch, and which batches are in progress.

    Closed while partitions are being handed over (a rebalance) and for good on SIGTERM, so
    that what a scorer has started it finishes and commits before anyone else takes over the
    partition: nothing lost, nothing scored twice."""

    def __init__(self) -> None:
        self.closed = False
        self.stopping = False
        self._in_flight = 0
        self._idle: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._idle is None:  # created on the worker's loop, not at import or build time
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    def begin(self) -> None:
        """A batch starts (synchronously, so a close that follows waits for it)."""
        self._in_flight += 1
        self._event().clear()

    def end(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._event().set()

    async def close(self, timeout_s: float) -> bool:
        """Close and wait for the batches in progress; False when they outlasted ``timeout_s``."""
        self.closed = True
        try:
            await asyncio.wait_for(self._event().wait(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True

    def reopen(self) -> None:
        if not self.stopping:
            self.closed = False

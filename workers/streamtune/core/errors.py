"""The one exception root of streamtune.

Third-party errors are wrapped (``raise StreamtuneError(...) from e``) where they cross
a module boundary, so callers only ever need to catch :class:`StreamtuneError`.
"""

from __future__ import annotations


class StreamtuneError(Exception):
    """Root of every error streamtune raises on purpose."""


class StackError(StreamtuneError):
    """The embedded local stack (Kafka, Redis) could not be fetched or started."""


class StartupError(StreamtuneError):
    """A worker cannot start: a dependency is unreachable or a required file is missing.

    The message is one line that names the setting to fix.
    """


class AdapterError(StreamtuneError):
    """An adapter version is missing, corrupt, incompatible or fails verification."""


class FileMismatch(AdapterError):
    """A version's file is missing or its checksum differs from its manifest's: what a copy still
    in progress looks like too (the swapper waits before it refuses one)."""


class SinkError(StreamtuneError):
    """Writing results to Redis or the output topics failed."""


class BatchStalledError(StreamtuneError):
    """One step of a batch did not finish within ``batch_step_timeout_s`` (the batch is read again)."""

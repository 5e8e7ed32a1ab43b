"""Which batch failures isolate records, and which pause the scorer.

A batch can fail for two kinds of reasons, and they need opposite answers:

* **Transient**: a service is away (the broker is down or has no leader, Redis is down, a step
  stalled past ``batch_step_timeout_s``), or refuses every record alike (a missing ACL, a closing
  producer, a dead-letter topic that takes nothing). Every record would fail the same way, and retrying is
  the cure: the batch is read again after a back-off, for as long as the outage lasts (the
  Redis sink already pauses inside ``write`` while Redis answers nothing).
* **Deterministic**: the services answer, and something in the batch fails anyway (a value the
  model or an encoder cannot take, a record the broker refuses as too large, a key a Redis
  Cluster refuses). Retrying forever stalls every partition of the task behind one record. So
  the batch is retried a bounded number of times (``batch_retries``), then bisected: halves that
  succeed are written, and a record that fails alone goes to the dead-letter topic with the
  stage and the error.

:class:`StageError` names the step of a batch that failed, so an isolated record's dead letter
says where it broke.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerClosed,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)

from streamtune.core.errors import BatchStalledError, StreamtuneError
from streamtune.scorer.sink import RETRIABLE

T = TypeVar("T")

# The steps of a batch, as dead letters and metrics name them.
MODEL = "model"
ENCODE = "encode"
SINK = "sink"
PUBLISH = "publish"
DEAD_LETTER = "dead_letter"


class StageError(StreamtuneError):
    """A step of a batch failed; ``cause`` is what it raised."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause


class DeadLetterUnavailable(StreamtuneError):
    """The dead-letter topic refused a record for a reason other than its size: nothing could be
    dead-lettered now, so the batch is read again later (like an outage) instead of committing
    past a record that is nowhere."""


# The broker refuses these for every record alike, whatever the record holds: a missing ACL
# (fixed by an operator) or a producer closing (the scorer is stopping). Isolating records
# would send the whole stream to the dead-letter topic, or lose it; the batch waits instead.
REFUSES_EVERYTHING = (ProducerClosed, TopicAuthorizationFailedError, ClusterAuthorizationFailedError)
# The broker refuses these for this record's size: dropping the raw value makes it fit.
SIZE_REFUSALS = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)


def root_cause(exc: BaseException) -> BaseException:
    return exc.cause if isinstance(exc, StageError) else exc


def is_transient(exc: BaseException) -> bool:
    """A failure that a service outage explains (retry the batch as it is, for as long as it
    lasts), as opposed to one that the batch's content explains (isolate the records)."""
    cause = root_cause(exc)
    if isinstance(cause, BatchStalledError | KafkaTimeoutError | DeadLetterUnavailable):
        return True  # a step that did not finish: the broker (or Redis) is not answering
    if isinstance(cause, REFUSES_EVERYTHING):
        return True
    if isinstance(cause, KafkaError):
        return bool(getattr(cause, "retriable", False))  # no leader, connection lost, ...
    return isinstance(cause, (*RETRIABLE, ConnectionError, TimeoutError))


def is_size_refusal(exc: BaseException) -> bool:
    """The broker refused a record for its size (see :data:`SIZE_REFUSALS`)."""
    return isinstance(root_cause(exc), SIZE_REFUSALS)


def stage_of(exc: BaseException, default: str = "batch") -> str:
    return exc.stage if isinstance(exc, StageError) else default


def halves(items: Sequence[T]) -> tuple[Sequence[T], Sequence[T]]:
    """The two halves a failing group is split into (the first one gets the smaller half)."""
    mid = len(items) // 2
    return items[:mid], items[mid:]


def describe(exc: BaseException) -> str:
    """The error in words, for a dead letter: the stage's cause, type and message, bounded."""
    cause = root_cause(exc)
    text = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return text if len(text) <= 1000 else text[:997] + "..."

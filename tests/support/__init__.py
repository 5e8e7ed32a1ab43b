"""Test helpers shipped with the suite: bounded waits, worker processes, topic readers and the
fixtures that start the real broker and Redis (used by ``tests/integration`` only)."""

from support.waiting import wait_until  # noqa: I001  (waiting first: the others use it)
from support.processes import ScorerProcess, settings_env
from support.topics import consume_all, load_json, read_topic
from support.fixtures import Stack

__all__ = ["ScorerProcess", "Stack", "consume_all", "load_json", "read_topic", "settings_env", "wait_until"]

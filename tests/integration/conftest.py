"""The integration tier's fixtures: a real broker and Redis for the session, isolated settings
and real scorer processes per test (:mod:`support.fixtures`)."""

from support.fixtures import redis_client, scorer_factory, settings, stack

__all__ = ["redis_client", "scorer_factory", "settings", "stack"]

"""Versions and releases: the adapter registry, the releases topic, rollout state, and the
``streamtune adapters`` CLI."""

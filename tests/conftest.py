"""Test tiers by directory: ``tests/unit`` needs no service, ``tests/integration`` runs against
the real broker, Redis and model (marked ``integration``; its fixtures are in ``support``)."""

from __future__ import annotations

from pathlib import Path

import pytest

_INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)

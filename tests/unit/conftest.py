"""The unit tier needs no service: a test here that asks for the broker or Redis fails at once
(move it to ``tests/integration``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def stack() -> None:
    pytest.fail("unit tests start no Kafka or Redis: this test belongs in tests/integration")

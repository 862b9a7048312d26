"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_clock import FakeClock
from tests.support.redis_server import RedisServer

pytest_plugins = ["tests.support.oauth_server"]


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock that only moves when the test advances it."""
    return FakeClock()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port; the test fails if it cannot start."""
    server = RedisServer(directory=tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()

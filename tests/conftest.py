"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_clock import FakeClock
from tests.support.redis_server import RedisServer, chosen_redis_server
from tests.support.redis_topologies import RedisCluster, RedisSentinel

# leftovers: a test (or the session) that leaves a process or a listening port behind fails.
pytest_plugins = [
    "tests.support.oauth_server",
    "tests.support.upstream",
    "tests.support.twilio_api",
    "tests.support.leftovers",
    "pytester",
]


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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A three-master Redis Cluster."""
    c = RedisCluster(tmp_path / "cluster")
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[RedisSentinel]:
    """A master watched by one Sentinel."""
    s = RedisSentinel(tmp_path / "sentinel")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which redis-server the tests started; print the recovery times the fault tests measured."""
    from tests.support.recovery import RECOVERY_SECONDS

    if chosen_redis_server.cache_info().currsize:
        terminalreporter.write_line(f"redis-server used: {chosen_redis_server()}")
    if RECOVERY_SECONDS:
        terminalreporter.section("fault recovery times (seconds until tokens are served again)")
        for fault, seconds in sorted(RECOVERY_SECONDS.items()):
            terminalreporter.write_line(f"{fault:50} {seconds:8.3f}")

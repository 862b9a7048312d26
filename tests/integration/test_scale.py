"""Three hundred apps on one real Redis: a warm restart asks for no token, over a few connections."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.support.broker_process import BrokerFiles, BrokerProcess
from tests.support.oauth_server import OAuthTestServer
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

APPS = 300
# Four command connections and one pub/sub subscription (broker/store/redis_pool.py).
MAX_CONNECTIONS = 5
READY_TIMEOUT = 180.0  # generous: 300 apps on a machine other suites share


def many_apps(token_url: str) -> dict[str, dict[str, Any]]:
    """APPS client-credentials apps against one token endpoint; no refresh falls in the test."""
    return {
        f"app{i:03d}": {
            "token_url": token_url,
            "client_id": "test-client",
            "client_secret_file": "client_secret",
            "refresh": {"at_fraction": 0.75, "min_remaining": 1, "safety_margin": 1},
        }
        for i in range(APPS)
    }


async def connections_named(port: int, name: str) -> int:
    """Clients in Redis's CLIENT LIST that carry `name`."""
    async with aioredis.Redis(port=port) as admin:
        clients: list[dict[str, Any]] = await admin.client_list()
    return sum(1 for client in clients if client.get("name") == name)


class TestWarmRestartAtScale:
    """A replica restarted over a warm Redis serves 300 apps from the store."""

    async def test_300_apps_warm_restart_makes_no_token_request_over_five_connections(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """After a cold start stored 300 tokens, a restart makes 0 token requests and opens <= 5
        Redis connections, and never reports the store down."""
        oauth_server.lifetime = 600.0  # the stored tokens outlive the test
        files = BrokerFiles(
            directory=tmp_path / "broker",
            token_url=oauth_server.token_url,
            store_url=redis_server.url,
            apps=many_apps(oauth_server.token_url),
        )
        config = files.write()
        cold = BrokerProcess(config, tmp_path / "cold.log")
        cold.start()
        try:
            await cold.wait_ready(files.metrics, timeout=READY_TIMEOUT)
        finally:
            assert await cold.terminate_async() == 0
        assert oauth_server.count() == APPS

        warm = BrokerProcess(config, tmp_path / "warm.log")
        warm.start()
        try:
            await warm.wait_ready(files.metrics, timeout=READY_TIMEOUT)
            await asyncio.sleep(1.0)  # anything a warm start would still ask for
            assert warm.process is not None
            name = f"token-broker:{socket.gethostname()}:{warm.process.pid}"
            connections = await connections_named(redis_server.port, name)
        finally:
            assert await warm.terminate_async() == 0
        events = [line["event"] for line in warm.log_lines()]
        assert oauth_server.count() == APPS, "the warm restart asked for tokens"
        assert 1 <= connections <= MAX_CONNECTIONS
        assert "store.unavailable" not in events

"""Fault injection: the token endpoint down or flapping, Redis paused, SIGKILL and restart.

Each test checks that no expired token is served and measures the recovery time.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import redis

from tests.support.broker_process import BrokerFiles, BrokerProcess
from tests.support.fleet import Fleet
from tests.support.oauth_server import OAuthTestServer
from tests.support.recovery import record
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.faults]


async def until_served(files: BrokerFiles, oauth: OAuthTestServer, timeout: float) -> float:
    """Seconds until the broker answers 200 with a valid token."""
    start = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - start < timeout:
            async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as r:
                if r.status == 200:
                    body = await r.json()
                    assert oauth.expiry[body["access_token"]] > time.time()
                    return time.monotonic() - start
            await asyncio.sleep(0.05)
    raise AssertionError(f"not served within {timeout}s")


class TestTokenEndpointFaults:
    async def test_server_down_then_back(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """The token endpoint stops listening for two lifetimes, then returns on the same port."""
        oauth_server.lifetime = 3.0
        fleet = Fleet(tmp_path, oauth_server.token_url, redis_server.url, 1)
        await fleet.start()
        try:
            port = int(oauth_server.base_url.rsplit(":", 1)[1])
            await oauth_server.stop()
            down = await fleet.poll(oauth_server, 6)
            await oauth_server.start(port=port)
            recovery = await until_served(fleet.replicas[0].files, oauth_server, 35)
        finally:
            fleet.stop()
        record("token endpoint down 6 s", recovery)
        assert down.expired == 0
        assert down.server_errors == 0
        assert down.unavailable > 0

    async def test_flapping_server(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """Every other answer is a 500: tokens keep flowing, none expired."""
        oauth_server.lifetime = 3.0
        fleet = Fleet(tmp_path, oauth_server.token_url, redis_server.url, 1)
        await fleet.start()
        try:
            for _ in range(20):
                oauth_server.fail_next(1, status=500)
                oauth_server.delays.append(0.0)
            stats = await fleet.poll(oauth_server, 12)
        finally:
            fleet.stop()
        assert stats.expired == 0
        assert stats.server_errors == 0
        assert stats.ok > 0


class TestRedisFaults:
    async def test_paused_redis_does_not_stall_serving(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """CLIENT PAUSE for 4 s (a slow Redis): callers are served from memory, no 5xx."""
        oauth_server.lifetime = 3.0
        fleet = Fleet(tmp_path, oauth_server.token_url, redis_server.url, 2)
        await fleet.start()
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            client.client_pause(4000, all=True)
            stats = await fleet.poll(oauth_server, 8)
        finally:
            client.close()
            fleet.stop()
        assert stats.expired == 0
        assert stats.server_errors == 0
        assert stats.unavailable == 0


class TestCrash:
    async def test_sigkill_and_restart_is_warm(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """SIGKILL a broker; its replacement serves the stored token without a token request."""
        oauth_server.lifetime = 60.0
        files = BrokerFiles(
            directory=tmp_path / "b", token_url=oauth_server.token_url, store_url=redis_server.url
        )
        config = files.write()
        first = BrokerProcess(config, tmp_path / "first.log")
        first.start()
        await first.wait_ready(files.metrics)
        first.kill()
        requests = oauth_server.count()
        second = BrokerProcess(config, tmp_path / "second.log")
        started = time.monotonic()
        second.start()
        try:
            await second.wait_ready(files.metrics)
            ready = time.monotonic() - started
        finally:
            second.terminate()
        record("SIGKILL, restart to ready (warm Redis)", ready)
        assert oauth_server.count() == requests

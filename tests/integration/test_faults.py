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
from tests.support.redis_topologies import RedisSentinel
from tests.support.store_keys import bound_key

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
        try:
            await fleet.start()
            port = int(oauth_server.base_url.rsplit(":", 1)[1])
            await oauth_server.stop()
            down = await fleet.poll(oauth_server, 6)
            await oauth_server.start(port=port)
            recovery = await until_served(fleet.replicas[0].files, oauth_server, 35)
        finally:
            await fleet.stop_async()
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
        try:
            await fleet.start()
            for _ in range(20):
                oauth_server.fail_next(1, status=500)
                oauth_server.delays.append(0.0)
            stats = await fleet.poll(oauth_server, 12)
        finally:
            await fleet.stop_async()
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
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            await fleet.start()
            client.client_pause(4000, all=True)
            stats = await fleet.poll(oauth_server, 8)
        finally:
            client.close()
            await fleet.stop_async()
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
        try:
            await first.wait_ready(files.metrics)
        finally:
            first.kill()
        requests = oauth_server.count()
        second = BrokerProcess(config, tmp_path / "second.log")
        started = time.monotonic()
        second.start()
        try:
            await second.wait_ready(files.metrics)
            ready = time.monotonic() - started
        finally:
            await second.terminate_async()
        record("SIGKILL, restart to ready (warm Redis)", ready)
        assert oauth_server.count() == requests


class TestSentinelFailover:
    async def test_master_dies_and_sentinel_promotes_the_replica(
        self, tmp_path: Path, oauth_server: OAuthTestServer
    ) -> None:
        """Kill the master: serving never stops, and the promoted replica gets the tokens."""
        oauth_server.lifetime = 3.0
        sentinel = RedisSentinel(tmp_path / "sentinel", with_replica=True)
        sentinel.start()
        fleet = Fleet(tmp_path / "fleet", oauth_server.token_url, sentinel.url, 2)
        try:
            await fleet.start()
            await fleet.poll(oauth_server, 2)
            sentinel.master.stop()
            killed_at = time.monotonic()
            assert sentinel.replica is not None
            replica_port = sentinel.replica.port

            def wait_for_promotion() -> float | None:
                while time.monotonic() - killed_at < 20:
                    if sentinel.current_master_port() == replica_port:
                        return time.monotonic() - killed_at
                    time.sleep(0.1)
                return None

            promotion = asyncio.ensure_future(asyncio.to_thread(wait_for_promotion))
            during = await fleet.poll(oauth_server, 8)
            failover_s = await promotion
            promoted = failover_s is not None
            await fleet.poll(oauth_server, 4)
            client = redis.Redis(host="127.0.0.1", port=sentinel.replica.port)
            stored = client.hget(bound_key(client, "token"), "version")
            client.close()
        finally:
            await fleet.stop_async()
            sentinel.stop()
        assert promoted, "sentinel did not promote the replica"
        assert failover_s is not None
        record("sentinel failover: replica promoted after", failover_s)
        assert during.expired == 0
        assert during.server_errors == 0
        assert during.unavailable == 0
        assert stored is not None, "the promoted master holds no token set"

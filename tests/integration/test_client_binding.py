"""Two fleets sharing one Redis, one key prefix and one app name, with different clients.

Issue 20, M6: a stored set is bound to its client (token URL, client id, grant, scopes,
audience). Two brokers whose app `app1` belongs to different clients at different servers,
with the default-style shared prefix and even the same store encryption key, must each serve
their own server's tokens: never adopt, spend or write over the other's set.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import redis

from tests.support.broker_process import BrokerFiles, BrokerProcess
from tests.support.oauth_server import OAuthTestServer
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

# Short tokens, so that each broker refreshes several times while the other does too.
LIFETIME = 4.0


async def served_tokens(files: BrokerFiles, session: aiohttp.ClientSession) -> str | None:
    """The access token the broker serves now, or None when it answers otherwise."""
    async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as response:
        if response.status != 200:
            return None
        body = await response.json()
        return str(body["access_token"])


class TestTwoFleetsShareAStore:
    async def test_each_broker_serves_only_its_own_servers_tokens(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """Brokers of client-a (server A) and client-b (server B) share the Redis, the prefix,
        the app name and the store key: each serves only tokens its own server issued, both
        keep refreshing, and the store holds one set per client binding."""
        servers = {name: OAuthTestServer(client_id=f"client-{name}") for name in "ab"}
        brokers: dict[str, tuple[BrokerFiles, BrokerProcess]] = {}
        served: dict[str, list[str]] = {name: [] for name in servers}
        refused: dict[str, int] = {name: 0 for name in servers}
        try:
            for name, server in servers.items():
                server.lifetime = LIFETIME
                await server.start(port=free_port())
                files = BrokerFiles(
                    directory=tmp_path / name,
                    token_url=server.token_url,
                    store_url=redis_server.url,
                    client_id=server.client_id,
                )
                process = BrokerProcess(files.write(), tmp_path / f"{name}.log")
                brokers[name] = (files, process)
                process.start()
            for files, process in brokers.values():
                await process.wait_ready(files.metrics)
            deadline = time.monotonic() + 4 * LIFETIME
            async with aiohttp.ClientSession() as session:
                while time.monotonic() < deadline:
                    for name, (files, _) in brokers.items():
                        token = await served_tokens(files, session)
                        if token is None:
                            refused[name] += 1
                        else:
                            served[name].append(token)
                    await asyncio.sleep(0.1)
            client = redis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
            token_keys = sorted(str(k) for k in client.keys("tb-test:{app1*}:token"))
            client.close()
        finally:
            for _, process in brokers.values():
                process.signal_stop()
            for _, process in brokers.values():
                # In a thread: the OAuth servers share this loop and answer a last refresh.
                await asyncio.to_thread(process.wait_stopped)
            for server in servers.values():
                await server.stop()
        for name, other in (("a", "b"), ("b", "a")):
            mine = set(served[name])
            assert mine, f"broker {name} served nothing ({refused[name]} refusals)"
            assert mine <= set(servers[name].issued_tokens), f"broker {name} served foreign tokens"
            assert not mine & set(servers[other].issued_tokens), (
                f"broker {name} served the other client's tokens"
            )
            assert len(mine) >= 3, f"broker {name} did not keep refreshing: {len(mine)} tokens"
        assert len(token_keys) == 2, token_keys
        assert all("@" in key for key in token_keys), token_keys

"""A replica whose Redis subscription went half-open re-syncs (issue 20, M2).

Real broker processes, a real redis-server and the rotating test server. One replica reaches
Redis through a TCP proxy that forgets every connection open at one moment (a NAT or load
balancer losing its flows): no byte passes on them again and no reset comes, while new
connections work. Its subscription only listens, so nothing but the broker's own heartbeat
deadline can tell it that the notices stopped.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.core import SILENCE_DEADLINE
from broker.serving import FORCE_MIN_AGE
from tests.support import recovery
from tests.support.authorization import ac_app, authorize_via_code
from tests.support.broker_process import BrokerFiles, wall_time
from tests.support.fleet import Fleet, Replica
from tests.support.oauth_server import OAuthTestServer
from tests.support.redis_server import RedisServer
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# Long enough that no replica refreshes on its own during the test (due 30 s after a forced
# rotation; the half-open replica also re-reads the store on its own only every 30 s): the
# rotations are forced, and the half-open replica learns of one only through its notices.
LIFETIME = 40.0
# The silence deadline (5 s), the reconnect delay, and a 1 s timeout for each pooled command
# connection the proxy silenced; generous for a loaded 2-core machine (it takes about 7 s).
ADOPTED_WITHIN = 20.0


async def force_refresh(session: aiohttp.ClientSession, replica: Replica) -> str:
    """POST /v1/token/app1/refresh on `replica`: the new access token."""
    async with session.post(
        f"{replica.files.api}/v1/token/app1/refresh", headers=replica.files.auth
    ) as response:
        body: dict[str, Any] = await response.json()
        assert response.status == 200, body
    return str(body["access_token"])


async def serving(
    session: aiohttp.ClientSession, replica: Replica, access_token: str, within: float
) -> float:
    """Wait until `replica` serves `access_token`; the wall time it first did."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        async with session.get(
            f"{replica.files.api}/v1/token/app1", headers=replica.files.auth
        ) as response:
            body: dict[str, Any] = await response.json()
        if response.status == 200 and body["access_token"] == access_token:
            return time.time()
        await asyncio.sleep(0.1)
    raise AssertionError(f"the replica did not serve the rotated token within {within} s")


def events(replica: Replica, name: str, since: float) -> list[dict[str, Any]]:
    """`replica`'s log lines of event `name` from wall time `since` on."""
    return [
        line
        for line in replica.process.log_lines()
        if line["event"] == name and wall_time(line) >= since
    ]


class TestHalfOpenSubscription:
    async def test_the_deaf_replica_notices_and_adopts_the_rotated_set(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """Replica 2's connections go half-open, then replica 0 rotates the grant: replica 2
        reports `store.subscription_stale`, re-subscribes, and serves the rotated set within
        ADOPTED_WITHIN s (it would otherwise wait for its own 30 s look); no refresh token is
        presented twice."""
        oauth_server.lifetime = LIFETIME
        app = ac_app(oauth_server, at_fraction=0.75)
        seed = BrokerFiles(
            directory=tmp_path / "seed",
            token_url=oauth_server.token_url,
            store_url=redis_server.url,
            apps={"app1": app},
        )
        await authorize_via_code(seed.write(), oauth_server)
        fleet = Fleet(
            tmp_path / "fleet", oauth_server.token_url, redis_server.url, 3, apps={"app1": app}
        )
        proxy = TcpProxy(redis_server.port)
        await proxy.start()
        deaf, rotator = fleet.replicas[2], fleet.replicas[0]
        deaf.files.store_url = proxy.url
        deaf.process.config = deaf.files.write()
        try:
            await fleet.start()
            async with aiohttp.ClientSession() as session:
                before = await force_refresh(session, rotator)
                forced_at = time.monotonic()
                await serving(session, deaf, before, within=10.0)  # its notices arrive
                # A forced refresh of a set younger than FORCE_MIN_AGE answers that set.
                await asyncio.sleep(forced_at + FORCE_MIN_AGE + 0.5 - time.monotonic())
                half_open_at = time.time()
                proxy.half_open()
                await asyncio.sleep(0.5)
                rotated = await force_refresh(session, rotator)
                assert rotated != before
                adopted_at = await serving(session, deaf, rotated, within=ADOPTED_WITHIN)
        finally:
            try:
                await fleet.stop_async()
            finally:
                await proxy.stop()
        stale = events(deaf, "store.subscription_stale", half_open_at)
        assert stale, "the half-open replica never noticed its silent subscription"
        assert stale[0]["level"] == "warning"
        assert float(stale[0]["silent_for"]) >= SILENCE_DEADLINE
        assert wall_time(stale[0]) <= adopted_at, "adopted before it noticed: not by re-syncing"
        assert not events(rotator, "store.subscription_stale", half_open_at)
        refreshes = [
            r for r in oauth_server.requests if r.form.get("grant_type") == "refresh_token"
        ]
        presented = [r.form["refresh_token"] for r in refreshes]
        assert len(presented) == len(set(presented)), "a refresh token was presented twice"
        assert oauth_server.reuse_detected == 0
        assert [r.status for r in refreshes] == [200] * len(refreshes)
        took = adopted_at - half_open_at
        recovery.record("half-open subscription: rotated set adopted", took)
        print(
            f"\nhalf-open subscription: noticed and re-synced, rotated set served after {took:.2f} s"
        )

"""Many replicas, one Redis: outages and dead lease holders (the fleet's pace against one broker
is tests/integration/test_fleet_pace.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import redis

from broker.clock import SystemClock
from broker.metrics import Metrics
from broker.store.crypto import Keyring
from broker.store.redis_store import RedisStore, redis_client
from tests.support.broker_process import BrokerFiles, wall_time
from tests.support.fleet import Fleet, Poller
from tests.support.oauth_server import OAuthTestServer
from tests.support.redis_server import RedisServer
from tests.support.store_keys import bound_key, stored_name_at

pytestmark = pytest.mark.integration

LIFETIME = 3.0


async def stored_token_expiry(files: BrokerFiles, redis_url: str) -> tuple[str, float] | None:
    """(access token, expires_at) of what the store holds for app1, read with the fleet's key."""
    store = RedisStore(
        redis_client(redis_url),
        key_prefix="tb-test",
        keyring=Keyring.from_file(files.directory / "store.key"),
        metrics=Metrics(),
        clock=SystemClock(),
    )
    try:
        token = await store.load(stored_name_at(redis_url))
    finally:
        await store.close()
    return (token.access_token, token.expires_at) if token else None


class TestRedisOutage:
    async def test_replicas_serve_through_an_outage_and_catch_the_store_up(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """Redis down for more than a lifetime: no expired token, no 5xx; the store catches up."""
        oauth_server.lifetime = LIFETIME
        fleet = Fleet(tmp_path, oauth_server.token_url, redis_server.url, 3)
        try:
            await fleet.start()
            before = await fleet.poll(oauth_server, 2)
            redis_server.stop()
            during = await fleet.poll(oauth_server, LIFETIME * 2)
            redis_server.start()  # empty: it kept nothing
            after = await fleet.poll(oauth_server, 3)
            stored = await stored_token_expiry(fleet.replicas[0].files, redis_server.url)
            newest = max(oauth_server.expiry[t] for t in after.tokens)
            logs = [line for r in fleet.replicas for line in r.process.log_lines()]
        finally:
            await fleet.stop_async()
        for stats in (before, during, after):
            assert stats.expired == 0
            assert stats.server_errors == 0
            assert stats.unavailable == 0
        assert len(during.tokens) >= 2, "the replicas did not refresh on their own"
        assert stored is not None, "nothing was written back to the store"
        assert stored[1] >= newest - LIFETIME * 0.5
        events = [line["event"] for line in logs]
        assert "store.unavailable" in events
        assert "store.reconnected" in events
        # Said once per outage per replica, not once per request.
        assert events.count("store.unavailable") <= 2 * len(fleet.replicas)


@pytest.mark.faults
class TestLeaseHolderDies:
    async def test_another_replica_refreshes_in_time(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """SIGKILL the replica holding the lease mid-refresh: another takes over in time."""
        # The lease covers one request (half the servable time left), its commit and a margin
        # (broker/fleet/ Timing): with 10 s tokens refreshed 3 s in, a takeover after the
        # lease runs out still has about 1.5 s before the token stops being served.
        oauth_server.lifetime = 10.0
        fleet = Fleet(
            tmp_path,
            oauth_server.token_url,
            redis_server.url,
            3,
            app_overrides={
                "refresh": {
                    "at_fraction": 0.3,
                    "min_remaining": 3,
                    "jitter": 0.02,
                    "safety_margin": 1,
                }
            },
        )
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        poller = Poller(fleet, oauth_server)
        try:
            await fleet.start()
            requests_before = oauth_server.count()
            oauth_server.delays = [12.0]  # the next refresh hangs at the server
            poller.start()
            owner = None
            deadline = time.monotonic() + 10
            while owner is None and time.monotonic() < deadline:
                owner = client.get(bound_key(client, "lease"))
                await asyncio.sleep(0.02)
            assert owner is not None, "no replica took the lease"
            while oauth_server.count() == requests_before:  # its request is in flight
                await asyncio.sleep(0.01)
            owner_text = owner.decode() if isinstance(owner, bytes) else str(owner)
            pid = int(owner_text.rsplit("-", 2)[1])
            victim = next(r for r in fleet.replicas if r.process.pid == pid)
            successes = oauth_server.successes()
            os.kill(pid, signal.SIGKILL)
            killed_at = time.time()
            deadline = time.monotonic() + 15
            while oauth_server.successes() == successes and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(2)
            stats = await poller.stop()
            survivors = [r for r in fleet.replicas if r is not victim]
            refreshed = [
                line
                for r in survivors
                for line in r.process.log_lines()
                if line["event"] == "token.refreshed" and wall_time(line) > killed_at
            ]
        finally:
            await poller.stop()
            client.close()
            await fleet.stop_async()
        assert stats.expired == 0
        assert stats.unavailable == 0, "the fleet went without a valid token"
        assert stats.server_errors == 0
        assert oauth_server.successes() > successes, "no survivor refreshed"
        assert refreshed, "no survivor refreshed"

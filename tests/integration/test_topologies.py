"""Brokers serving tokens through a real Redis Cluster and a real Sentinel setup."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fleet import Fleet
from tests.support.oauth_server import OAuthTestServer
from tests.support.redis_topologies import RedisCluster, RedisSentinel

pytestmark = pytest.mark.integration


class TestCluster:
    async def test_two_replicas_share_tokens_through_a_cluster(
        self, tmp_path: Path, oauth_server: OAuthTestServer, cluster: RedisCluster
    ) -> None:
        """Through redis+cluster://, two replicas serve valid tokens and share refreshes."""
        oauth_server.lifetime = 3.0
        fleet = Fleet(tmp_path / "fleet", oauth_server.token_url, cluster.url, 2)
        try:
            await fleet.start()
            stats = await fleet.poll(oauth_server, 9)
        finally:
            await fleet.stop_async()
        # The fleet clock's TIME script is routed by a key, so it works on a Cluster too.
        for replica in fleet.replicas:
            events = [line["event"] for line in replica.process.log_lines()]
            assert "clock.offset_measured" in events
            assert "clock.offset_unmeasured" not in events
        assert stats.expired == 0
        assert stats.unavailable == 0
        assert stats.server_errors == 0
        assert len(stats.tokens) >= 3
        # Shared: one broker refreshes every ~2 s (about 5 requests in 9 s); two unshared
        # replicas would make about 10.
        assert oauth_server.count() <= 7


class TestSentinel:
    async def test_a_broker_serves_through_sentinel(
        self, tmp_path: Path, oauth_server: OAuthTestServer, sentinel: RedisSentinel
    ) -> None:
        """Through redis+sentinel://, a second replica starts warm from the master."""
        oauth_server.lifetime = 30.0
        first = Fleet(tmp_path / "first", oauth_server.token_url, sentinel.url, 1)
        try:
            await first.start()
            stats = await first.poll(oauth_server, 1)
            second = Fleet(tmp_path / "second", oauth_server.token_url, sentinel.url, 1)
            try:
                await second.start()
                warm = await second.poll(oauth_server, 1)
            finally:
                await second.stop_async()
        finally:
            await first.stop_async()
        assert stats.ok > 0
        assert warm.ok > 0
        assert warm.tokens == stats.tokens  # the stored token, not a new one
        assert oauth_server.count() == 1

"""Replicas whose wall clocks are off by seconds (libfaketime): one clock for the whole fleet."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.support.fleet import (
    RunSpec,
    metric_value,
    requests_per_lifetime,
    requests_since,
    side_by_side,
)
from tests.support.oauth_server import Scripted
from tests.support.skew import skewed_env

pytestmark = pytest.mark.integration

LIFETIME = 8.0
LIFETIMES = 5
# Three replicas with a correct clock, one 5 s behind and one 5 s ahead (broken NTP on two nodes).
SKEWS = (0.0, 0.0, 0.0, -5.0, 5.0)


class TestSkewedClocks:
    async def test_skewed_replicas_serve_no_expired_token_at_one_brokers_pace(
        self, tmp_path: Path
    ) -> None:
        """Two of five replicas 5 s off: no expired token served, <= 1.2x one broker's requests.

        The replica 5 s ahead serves a token only while its own clock agrees too (issue 20,
        M3): on 8 s tokens its own clock says each token is nearly out 5 s early, so its
        callers pull a refresh then (the documented price of a clock that far off, alerted by
        TokenBrokerClockSkew). The pace is therefore measured with callers on the other four,
        the ahead replica's own schedule included; its callers are checked on their own.
        """
        envs = [skewed_env(skew) if skew else None for skew in SKEWS]
        specs = [RunSpec("single", 1), RunSpec("fleet", len(SKEWS), envs)]
        async with side_by_side(tmp_path, LIFETIME, specs) as runs:
            single, fleet = runs["single"], runs["fleet"]
            offsets = [
                await metric_value(r, "token_broker_clock_offset_seconds")
                for r in fleet.fleet.replicas
            ]
            ahead = SKEWS.index(max(SKEWS))
            fleet.fleet.replicas[ahead].polled = False
            since = time.time()
            single_stats, fleet_stats = await asyncio.gather(
                single.poll(LIFETIME * LIFETIMES), fleet.poll(LIFETIME * LIFETIMES)
            )
            single_times = requests_since(single.oauth, since)
            fleet_times = requests_since(fleet.oauth, since)
            fleet.fleet.replicas[ahead].polled = True
            ahead_stats = await fleet.poll(LIFETIME * 2)
            # Then nobody can refresh: a replica that is behind must still stop serving the
            # last token at its true expiry (minus the margin), like the others.
            fleet.oauth.mode = Scripted(status=503)
            outage_stats = await fleet.poll(LIFETIME * 1.5)
        # 0 tokens served that are expired by the true clock (the OAuth server's record).
        assert single_stats.expired == 0
        assert fleet_stats.expired == 0, "a replica served an expired token"
        assert ahead_stats.expired == 0, "the replica ahead served an expired token"
        assert ahead_stats.of(ahead) and ahead_stats.of(ahead).count(200) > 0
        assert outage_stats.expired == 0, "a replica behind served a token past its expiry"
        assert outage_stats.unavailable > 0, "the outage did not outlast the last token"
        assert fleet_stats.unavailable == 0
        assert fleet_stats.server_errors == 0
        assert fleet_stats.ok > 0
        single_rate = requests_per_lifetime(single_times, LIFETIME)
        fleet_rate = requests_per_lifetime(fleet_times, LIFETIME)
        figures = (fleet_rate, single_rate, len(fleet_times), len(single_times))
        assert fleet_rate <= 1.2 * single_rate, figures
        # The clocks really were skewed, and each replica measured its own offset to Redis.
        for skew, offset in zip(SKEWS, offsets, strict=True):
            assert offset == pytest.approx(-skew, abs=0.5), offsets

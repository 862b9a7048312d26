"""A fleet asks the token endpoint as often as one broker: in fair weather and after an outage."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from broker.model import RefreshPolicy
from tests.support.authorization import ac_app
from tests.support.broker_process import DEFAULT_REFRESH
from tests.support.fleet import (
    FleetStats,
    RunSpec,
    paced_requests_per_lifetime,
    requests_per_lifetime,
    requests_since,
    side_by_side,
)
from tests.support.oauth_server import OAuthTestServer, Scripted

pytestmark = pytest.mark.integration


def served_no_expired(*stats: FleetStats) -> None:
    for s in stats:
        assert s.expired == 0, "a replica served an expired token"
        assert s.server_errors == 0


def refreshes_between(
    oauth: OAuthTestServer, since: float, until: float, grant_type: str | None = "refresh_token"
) -> list[float]:
    """Times of the token requests (of `grant_type`, or any) received from `since` to `until`."""
    return [
        r.at
        for r in oauth.requests
        if since <= r.at <= until and grant_type in (None, r.form.get("grant_type"))
    ]


def grant_intact(oauth: OAuthTestServer) -> None:
    """Every refresh token was presented once and accepted: the grant was never revoked."""
    refreshes = [r for r in oauth.requests if r.form.get("grant_type") == "refresh_token"]
    presented = [r.form["refresh_token"] for r in refreshes]
    assert len(set(presented)) == len(presented), "a refresh token was presented twice"
    assert oauth.reuse_detected == 0, "the server saw a spent refresh token again"
    assert [r.status for r in refreshes if r.status != 200] == [], "a refresh was rejected"
    assert not any(g.revoked for g in oauth.grants.values()), "the grant was revoked"


class TestFairWeather:
    async def test_eight_replicas_refresh_at_one_brokers_pace(self, tmp_path: Path) -> None:
        """Over 10 lifetimes, 8 replicas make at most 1.05x the token requests of one broker."""
        # Measured net of the token-derived jitter, as the rotating test below: a raw rate over
        # about 12 intervals carries the jitter drawn for each token (5 % either way), and CI
        # once saw one broker and the fleet make 13 requests each yet differ by 5.2 % in raw
        # rate. An extra request, or a replica refreshing before the shared due time, still
        # shows in full in the paced rate.
        lifetime, lifetimes = 6.0, 10
        specs = [RunSpec("single", 1), RunSpec("fleet", 8)]
        async with side_by_side(tmp_path, lifetime, specs) as runs:
            single, fleet = runs["single"], runs["fleet"]
            # One lifetime to settle: every replica has its first token.
            await asyncio.gather(single.poll(lifetime, 0.25), fleet.poll(lifetime, 0.25))
            since = time.time()
            stats = await asyncio.gather(
                single.poll(lifetime * lifetimes, 0.25), fleet.poll(lifetime * lifetimes, 0.25)
            )
            until = time.time()
        served_no_expired(*stats)
        assert stats[1].unavailable == 0
        refresh = RefreshPolicy(
            at_fraction=DEFAULT_REFRESH["at_fraction"],
            min_remaining=DEFAULT_REFRESH["min_remaining"],
            jitter=DEFAULT_REFRESH["jitter"],
            safety_margin=DEFAULT_REFRESH["safety_margin"],
        )
        single_rate = paced_requests_per_lifetime(single.oauth, since, until, lifetime, refresh)
        fleet_rate = paced_requests_per_lifetime(fleet.oauth, since, until, lifetime, refresh)
        counts = [len(refreshes_between(run.oauth, since, until, None)) for run in runs.values()]
        assert fleet_rate <= 1.05 * single_rate, (fleet_rate, single_rate, counts)

    async def test_five_replicas_rotate_a_refresh_token_at_one_brokers_pace(
        self, tmp_path: Path
    ) -> None:
        """Over 10 lifetimes, 5 replicas rotating a grant make <= 1.05x one broker's requests."""
        # Every refresh of this grant first waits out the fleet protocol's objection window: 0.5 s,
        # a quarter of the servable time left when that is shorter, 6 s once nothing is servable.
        # With 6 s tokens refreshed at half their life (+-5 % jitter), about 2.1 s are still
        # servable at the due time: the window stays 0.5 s and the spend has over 1.5 s to spare
        # on a loaded machine, so no refresh slides into the long window. At the default 0.75
        # under 0.5 s would be left for the request.
        # The pace is measured net of the token-derived jitter (see paced_requests_per_lifetime):
        # a raw rate's noise (about 1.5 %) would hide a fleet refreshing 6 % early, as one whose
        # replicas each drew their own jitter does.
        lifetime, lifetimes = 6.0, 10
        specs = [RunSpec("single", 1), RunSpec("fleet", 5)]
        rotating = {"at_fraction": 0.5}
        async with side_by_side(tmp_path, lifetime, specs, rotating=rotating) as runs:
            single, fleet = runs["single"], runs["fleet"]
            # One lifetime to settle: every replica has adopted the onboarded set.
            await asyncio.gather(single.poll(lifetime, 0.25), fleet.poll(lifetime, 0.25))
            since = time.time()
            stats = await asyncio.gather(
                single.poll(lifetime * lifetimes, 0.25), fleet.poll(lifetime * lifetimes, 0.25)
            )
            until = time.time()
        served_no_expired(*stats)
        for run in (single, fleet):
            grant_intact(run.oauth)
        refresh = RefreshPolicy(**ac_app(single.oauth, **rotating)["refresh"])
        single_rate = paced_requests_per_lifetime(single.oauth, since, until, lifetime, refresh)
        fleet_rate = paced_requests_per_lifetime(fleet.oauth, since, until, lifetime, refresh)
        raw = [
            requests_per_lifetime(refreshes_between(run.oauth, since, until), lifetime)
            for run in runs.values()
        ]
        assert fleet_rate <= 1.05 * single_rate, (fleet_rate, single_rate, raw)


class TestEndpointDown:
    async def test_twenty_replicas_back_off_as_one_broker(self, tmp_path: Path) -> None:
        """Endpoint down past the tokens' expiry, then back: 20 replicas <= 1.5x one broker."""
        # After 8 s down the next attempt is at most 8 + 16 s after the outage began (the
        # fifth backoff), so 18 s of recovery lets one broker and the fleet serve again.
        lifetime, down, after = 4.0, 8.0, 18.0
        specs = [RunSpec("single", 1), RunSpec("fleet", 20)]
        async with side_by_side(tmp_path, lifetime, specs) as runs:
            single, fleet = runs["single"], runs["fleet"]
            await asyncio.gather(single.poll(lifetime, 0.25), fleet.poll(lifetime, 0.25))
            since = time.time()
            for run in (single, fleet):
                run.oauth.mode = Scripted(status=503)
            during = await asyncio.gather(single.poll(down, 0.25), fleet.poll(down, 0.25))
            for run in (single, fleet):
                run.oauth.mode = None
            recovered = await asyncio.gather(single.poll(after, 0.25), fleet.poll(after, 0.25))
            single_requests = len(requests_since(single.oauth, since))
            fleet_requests = len(requests_since(fleet.oauth, since))
            # Everyone serves again at the end.
            final = await fleet.poll(1.0, 0.25)
        served_no_expired(*during, *recovered, final)
        assert during[1].unavailable > 0, "the outage did not outlast the tokens"
        assert final.unavailable == 0
        assert final.ok > 0
        assert fleet_requests <= 1.5 * single_requests, (fleet_requests, single_requests)

"""Issue 22: an upstream that revokes the fleet's token costs the fleet ONE refresh, not one per
replica.

Four broker processes share a real Redis, the real test OAuth server and the real TLS API
(tests/support/upstream.py, which answers 401 to a revoked token). The token is revoked; every
replica's proxied request meets the 401 at once. The first replica's report is recorded in the
store (a compare-and-set on the stored set's fingerprint), one replica refreshes under the
lease, the others adopt its set from the notice, and each retries its request with the new
token: the OAuth server counts one token request for the whole fleet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.authorization import ac_app, authorize_via_code
from tests.support.broker_process import BrokerFiles
from tests.support.fleet import Fleet, Replica
from tests.support.oauth_server import OAuthTestServer
from tests.support.redis_server import RedisServer
from tests.support.upstream import UpstreamServer

pytestmark = pytest.mark.integration

# Long enough that no refresh falls due during a test: every token request is the purge's.
LIFETIME = 600.0
REPLICAS = 4
REFRESH = {"at_fraction": 0.75, "min_remaining": 1, "jitter": 0.05, "safety_margin": 1}


def with_proxy(app: Mapping[str, Any], upstream: UpstreamServer, ca_file: Path) -> dict[str, Any]:
    """`app` proxied to the upstream under /v1/."""
    return {
        **app,
        "proxy": {
            "upstream": upstream.url,
            "ca_file": str(ca_file),
            "path_prefixes": ["/v1/"],
            # The test API listens on loopback, which the egress guard refuses unless allowed.
            "allowed_networks": ["127.0.0.0/8"],
        },
    }


async def proxied(replica: Replica, method: str, path: str, **kwargs: Any) -> int:
    """One request through `replica`'s proxy; its status."""
    files = replica.files
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, f"{files.api}/v1/proxy/app1{path}", headers=files.auth, **kwargs
        ) as response:
            await response.read()
            return response.status


async def purges_recorded(replica: Replica) -> float:
    """The replica's token_broker_token_refused_total{outcome="recorded"} (0 without one)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{replica.files.metrics}/metrics") as response,
    ):
        text = await response.text()
    series = 'token_broker_token_refused_total{app="app1",outcome="recorded"} '
    values = [float(line[len(series) :]) for line in text.splitlines() if line.startswith(series)]
    return sum(values)


def bearer_of_hits(upstream: UpstreamServer, since: int) -> list[tuple[int, str]]:
    """(status, bearer token) of every request the upstream received from `since` on."""
    return [
        (hit.status, hit.headers.get("Authorization", "").removeprefix("Bearer "))
        for hit in upstream.hits[since:]
    ]


async def one_purge_for_the_fleet(
    fleet: Fleet, oauth: OAuthTestServer, upstream: UpstreamServer, grant_type: str
) -> None:
    """Revoke the fleet's token; every replica's request meets the 401 at once; check that the
    fleet made one token request and every replica retried, and then serves, the new token."""
    await fleet.start(timeout=40.0)
    # Every replica holds the fleet's one token (adopted from the store, or its notice).
    for replica in fleet.replicas:
        assert await proxied(replica, "GET", "/v1/items/1") == 200
    held = {token for _, token in bearer_of_hits(upstream, 0)}
    assert len(held) == 1, "the replicas do not share one token"
    [revoked] = held
    oauth.revoke(revoked)
    before, seen = oauth.count(grant_type), len(upstream.hits)

    answers = await asyncio.gather(
        *(proxied(r, "POST", "/v1/items", json={"n": i}) for i, r in enumerate(fleet.replicas))
    )

    assert answers == [201] * REPLICAS
    assert oauth.count(grant_type) == before + 1, "not exactly one refresh for the fleet"
    hits = bearer_of_hits(upstream, seen)
    assert sorted(status for status, _ in hits) == [201] * REPLICAS + [401] * REPLICAS
    assert {token for status, token in hits if status == 401} == {revoked}
    successors = {token for status, token in hits if status == 201}
    assert len(successors) == 1 and revoked not in successors
    # The next request of every replica succeeds with the new token, without a 401.
    seen = len(upstream.hits)
    for replica in fleet.replicas:
        assert await proxied(replica, "GET", "/v1/items/2") == 200
    assert bearer_of_hits(upstream, seen) == [(200, *successors)] * REPLICAS
    assert oauth.count(grant_type) == before + 1
    recorded = [await purges_recorded(r) for r in fleet.replicas]
    assert sum(recorded) == 1, recorded
    audited = [
        line
        for r in fleet.replicas
        for line in r.process.log_lines()
        if line.get("event") == "token.refused"
    ]
    assert len(audited) == 1 and audited[0]["audit"] is True
    assert revoked not in str(audited)


class TestFleetPurge:
    async def test_client_credentials_one_refresh_for_four_replicas(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        ca_file: Path,
        redis_server: RedisServer,
    ) -> None:
        """Four replicas behind an upstream that revoked their token: one token request for
        the fleet (not four), every caller gets the retry's 201, every next request a 200."""
        oauth_server.lifetime = LIFETIME
        app = {
            "token_url": oauth_server.token_url,
            "client_id": oauth_server.client_id,
            "client_secret_file": "client_secret",
            "refresh": REFRESH,
        }
        fleet = Fleet(
            tmp_path,
            oauth_server.token_url,
            redis_server.url,
            REPLICAS,
            apps={"app1": with_proxy(app, upstream, ca_file)},
        )
        try:
            await one_purge_for_the_fleet(fleet, oauth_server, upstream, "client_credentials")
        finally:
            await fleet.stop_async()

    async def test_a_rotating_grant_is_spent_once(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        ca_file: Path,
        redis_server: RedisServer,
    ) -> None:
        """The same with an authorization-code grant whose refresh token rotates (with reuse
        detection): one refresh-token request, the token presented once, the grant alive."""
        oauth_server.lifetime = LIFETIME
        app = with_proxy(ac_app(oauth_server, **REFRESH), upstream, ca_file)
        seed = BrokerFiles(
            directory=tmp_path / "seed",
            token_url=oauth_server.token_url,
            store_url=redis_server.url,
            apps={"app1": app},
        )
        await authorize_via_code(seed.write(), oauth_server)
        fleet = Fleet(
            tmp_path / "fleet",
            oauth_server.token_url,
            redis_server.url,
            REPLICAS,
            apps={"app1": app},
        )
        try:
            await one_purge_for_the_fleet(fleet, oauth_server, upstream, "refresh_token")
        finally:
            await fleet.stop_async()
        refreshes = [
            r for r in oauth_server.requests if r.form.get("grant_type") == "refresh_token"
        ]
        assert [r.status for r in refreshes] == [200]
        assert oauth_server.reuse_detected == 0
        assert not any(grant.revoked for grant in oauth_server.grants.values())

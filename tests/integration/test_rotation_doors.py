"""Issue 20's doors C1 and H1 tried as an operator would: real broker processes, a real Redis.

The test OAuth server rotates the refresh token on every use and revokes the whole grant when a
spent one comes back (RFC 9700). It rotates a slow request on receipt and answers it late, and
the rotation stands when the client gives up meanwhile, as a real server's does. Faults are
injected at the moment the server receives the refresh request (its request-received hook), not
after guessed sleeps. The simulation's schedules for the same doors are in
tests/simulation/doors.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.test_rotation_faults import (
    Figures,
    all_serving_again,
    check_grant_intact,
    events,
)
from tests.support.authorization import ac_app, authorize_via_code
from tests.support.broker_process import BrokerFiles, wall_time
from tests.support.fleet import Fleet, FleetStats, Poller, Replica
from tests.support.oauth_server import OAuthTestServer, RecordedRequest
from tests.support.redis_server import RedisServer
from tests.support.store_keys import bound_key

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# How long the server takes to answer the one slow refresh of H1: past the 10 s request budget
# the lease is sized for, as in the trial.
H1_SLOW_ANSWER = 14.0
H1_LIFETIME = 6.0
# C1: the spender's request is slow but inside the budget, and the token it spends is still
# servable meanwhile (so the short objection window applies to a replica that forgot nothing).
# The pod's restart (SIGTERM, start, ready) and Redis's must both fit inside the slow answer on
# a loaded machine (6 s did not, once, with two test workers at load 8-18), and the answer must
# land inside the set's servable time: a refresh starts at about 40% of the lifetime, 12 s + 9 s
# is well before 27 s.
C1_SLOW_ANSWER = 9.0
C1_LIFETIME = 30.0


async def doors_fleet(
    root: Path,
    oauth: OAuthTestServer,
    store_url: str,
    size: int,
    lifetime: float,
    **refresh: Any,
) -> Fleet:
    """`size` replicas sharing app1, an authorization-code grant onboarded with `authorize`."""
    oauth.lifetime = lifetime
    app = ac_app(oauth, at_fraction=0.4, **refresh)
    seed = BrokerFiles(
        directory=root / "seed", token_url=oauth.token_url, store_url=store_url, apps={"app1": app}
    )
    await authorize_via_code(seed.write(), oauth)
    return Fleet(root / "fleet", oauth.token_url, store_url, size, apps={"app1": app})


async def settled(client: redis.Redis, oauth: OAuthTestServer, timeout: float = 30.0) -> None:
    """Wait until the fleet stored a set it refreshed itself (every replica started on it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            oauth.count("refresh_token")
            and client.hget(bound_key(client, "token"), "gen") is not None
        ):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the fleet stored no refreshed set")


async def slow_refresh(oauth: OAuthTestServer, delay: float) -> RecordedRequest:
    """Make the next refresh slow (rotated on receipt, answered `delay` s later); the request,
    once received."""
    received = oauth.expect_request("refresh_token")
    oauth.post_delays = [delay]
    return await asyncio.wait_for(received, timeout=30.0)


def lease_holder(client: redis.Redis, fleet: Fleet) -> int:
    """The index of the replica holding app1's lease (its owner id carries the pid)."""
    owner = client.get(bound_key(client, "lease"))
    assert isinstance(owner, bytes), "no replica holds the lease"
    pid = int(owner.decode().rsplit("-", 2)[1])
    return next(i for i, r in enumerate(fleet.replicas) if r.process.pid == pid)


def audited(fleet: Fleet, name: str, since: float = 0.0) -> list[tuple[int, dict[str, object]]]:
    """Every replica's log lines of event `name` from `since` on, with the replica's index."""
    return [(i, line) for i, r in enumerate(fleet.replicas) for line in events(r, name, since)]


def refresh_tokens_presented(oauth: OAuthTestServer) -> list[str]:
    """The refresh tokens the server received, in order."""
    return [
        r.form["refresh_token"]
        for r in oauth.requests
        if r.form.get("grant_type") == "refresh_token"
    ]


def ended_serving(stats: FleetStats, size: int) -> None:
    """Every replica's last answer was a token."""
    for index in range(size):
        answers = stats.of(index)
        assert answers and answers[-1] == 200, (
            f"replica {index} did not end serving: {answers[-5:]}"
        )


class TestH1SlowAnswerPastTheBudget:
    async def test_one_answer_after_14_s_the_fleet_serves_again(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """The server answers one refresh after 14 s (6 s tokens): the spender waits for it and
        commits it; every replica serves a valid token again within two lifetimes, the grant
        intact, nothing asked of a person."""
        fleet = await doors_fleet(tmp_path, oauth_server, redis_server.url, 3, H1_LIFETIME)
        poller = Poller(fleet, oauth_server)
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            await fleet.start()
            poller.start()
            await settled(client, oauth_server)
            slow = await slow_refresh(oauth_server, H1_SLOW_ANSWER)
            spender = lease_holder(client, fleet)
            answered_at = slow.at + H1_SLOW_ANSWER
            await asyncio.sleep(answered_at - time.time())
            serving_again = await all_serving_again(
                poller, [0, 1, 2], answered_at, timeout=2 * H1_LIFETIME
            )
            await asyncio.sleep(H1_LIFETIME)  # and it keeps rotating
            stats = await poller.stop()
            refreshed = [
                line for i, line in audited(fleet, "token.refreshed", slow.at) if i == spender
            ]
            unknown = audited(fleet, "grant.outcome_unknown")
            needs_authorization = audited(fleet, "app.needs_authorization")
        finally:
            await poller.stop()
            client.close()
            await fleet.stop_async()
        requests = check_grant_intact(oauth_server)
        assert stats.expired == 0, "an expired token was served"
        assert refreshed, "the spender did not commit the slow answer"
        assert wall_time(refreshed[0]) >= answered_at - 0.5, "committed before the answer came"
        presented = refresh_tokens_presented(oauth_server)
        later = presented[presented.index(slow.form["refresh_token"]) + 1 :]
        assert later, "no refresh after the slow one: the fleet stopped rotating"
        # A bystander that takes the lease while the answer is late finds the spend `sent` and
        # says so (grant.outcome_unknown, 409 for a while): that is the protocol, not a loss.
        # The spender itself never gives up on its request, and nobody stays at 409.
        assert spender not in {i for i, _ in unknown}, "the spender gave up on its request"
        ended_serving(stats, 3)
        print(
            f"\nH1: bystanders' grant.outcome_unknown {[i for i, _ in unknown]}, "
            f"needs_authorization {[i for i, _ in needs_authorization]}, "
            f"409s {sum(1 for _, _, status in stats.answers if status == 409)}"
        )
        Figures(requests, stats, serving_again).show("one answer after 14 s")

    async def test_with_a_read_timeout_below_the_answer_the_grant_is_reported_unknown(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """The old behaviour, by config: `refresh.read_timeout` 5 s gives up on the 14 s answer
        the server acted on. The documented degraded outcome: grant.outcome_unknown audited,
        every replica 409 needs_authorization, and the token never presented again (the grant
        stays intact on the server, its rotated token lost with the answer)."""
        fleet = await doors_fleet(
            tmp_path, oauth_server, redis_server.url, 3, H1_LIFETIME, read_timeout="5s"
        )
        poller = Poller(fleet, oauth_server)
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            await fleet.start()
            poller.start()
            await settled(client, oauth_server)
            slow = await slow_refresh(oauth_server, H1_SLOW_ANSWER)
            spender = lease_holder(client, fleet)
            answered_at = slow.at + H1_SLOW_ANSWER
            # Past the answer nobody read, and a lifetime more: the fleet does not recover.
            await asyncio.sleep(answered_at + H1_LIFETIME - time.time())
            stats = await poller.stop()
            unknown = audited(fleet, "grant.outcome_unknown", slow.at)
        finally:
            await poller.stop()
            client.close()
            await fleet.stop_async()
        check_grant_intact(oauth_server)
        assert stats.expired == 0, "an expired token was served"
        presented = refresh_tokens_presented(oauth_server)
        assert presented[-1] == slow.form["refresh_token"], "a refresh followed the unknown one"
        (grant,) = oauth_server.grants.values()
        assert grant.current_refresh not in presented, "the rotated token reached the fleet"
        assert spender in {i for i, _ in unknown}, "the spender did not audit grant.outcome_unknown"
        gave_up_after = min(wall_time(line) for _, line in unknown) - slow.at
        assert 4.5 <= gave_up_after < H1_SLOW_ANSWER, f"gave up after {gave_up_after:.1f} s"
        for index in range(3):
            assert stats.of(index)[-1] == 409, f"replica {index}: {stats.of(index)[-5:]}"
        print(
            f"\nread_timeout 5 s: outcome unknown after {gave_up_after:.2f} s, "
            f"every replica 409 needs_authorization"
        )


class TestC1ReplacedPodAfterAnEmptyRestart:
    @pytest.mark.parametrize("size", [2, 3], ids=["no-bystander", "one-bystander"])
    async def test_the_new_pod_does_not_spend_the_token_in_flight(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        redis_server: RedisServer,
        size: int,
    ) -> None:
        """While the spender's refresh token is on the wire (6 s, inside the budget), another
        pod is replaced by a new process and Redis restarts empty: nobody presents that token
        again, the grant is never revoked, and the fleet serves on."""
        fleet = await doors_fleet(tmp_path, oauth_server, redis_server.url, size, C1_LIFETIME)
        poller = Poller(fleet, oauth_server)
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            await fleet.start()
            poller.start()
            await settled(client, oauth_server)
            slow = await slow_refresh(oauth_server, C1_SLOW_ANSWER)
            spender = lease_holder(client, fleet)
            replaced: Replica = fleet.replicas[(spender + 1) % size]
            # The new pod starts after the `sent` notice: it never heard it.
            await replaced.restart()
            replaced_at = time.time()
            client.close()
            redis_server.stop()
            redis_server.start()  # same port, no data: the spend record and the lease are gone
            restarted_at = time.time()
            client = redis.Redis(host="127.0.0.1", port=redis_server.port)
            answered_at = slow.at + C1_SLOW_ANSWER
            assert restarted_at < answered_at, "the restart came after the slow answer"
            await asyncio.sleep(max(0.0, answered_at - time.time()))
            serving_again = await all_serving_again(
                poller, list(range(size)), answered_at, timeout=2 * C1_LIFETIME
            )
            await asyncio.sleep(C1_LIFETIME)  # and it keeps rotating
            stats = await poller.stop()
            reuse = audited(fleet, "grant.reuse_detected")
            vetoed = audited(fleet, "grant.spend_vetoed", slow.at)
            written_back = audited(fleet, "store.written_back", restarted_at)
        finally:
            await poller.stop()
            client.close()
            await fleet.stop_async()
        presented = refresh_tokens_presented(oauth_server)
        print(
            f"\nC1 ({size} replicas): replaced at +{replaced_at - slow.at:.2f} s, "
            f"Redis restarted at +{restarted_at - slow.at:.2f} s, answer at +{C1_SLOW_ANSWER} s; "
            f"written back by {[i for i, _ in written_back]}, vetoes {len(vetoed)}"
        )
        assert presented.count(slow.form["refresh_token"]) == 1, (
            "the token in flight was sent twice"
        )
        requests = check_grant_intact(oauth_server)
        assert reuse == [], f"grant.reuse_detected: {reuse}"
        assert written_back, "no replica wrote its set back to the empty store"
        assert stats.expired == 0, "an expired token was served"
        assert stats.other == [], f"answers other than 200 and 503: {stats.other}"
        later = presented[presented.index(slow.form["refresh_token"]) + 1 :]
        assert later, "no refresh after the slow one: the fleet stopped rotating"
        ended_serving(stats, size)
        Figures(requests, stats, serving_again).show(f"C1 with {size} replicas")

"""Issue 20's door H4 tried with real processes: a Sentinel split brain made with a TCP proxy.

Two broker processes share an authorization-code app on the rotating test server (reuse
detection revokes the whole grant). b1 finds the primary through Sentinel; b0 talks to the
primary M directly, as a client left on M's side of a partition does (in production, a broker
whose Sentinel on that side, short of a quorum, still names M; b0's config sets
`require_replica_ack` as the Sentinel URL's default would). The proxy then cuts M off
from its replicas and the Sentinel: the Sentinel promotes a replica, b1 follows it, and b0 keeps
writing to M, which nothing replicates any more. Both now hold the same set, each side a lease
of its own and no record of the other side's spend.

With `store.require_replica_ack` (the default for Sentinel URLs) b0's `sent` record on M gets
no acknowledgement, so b0 never sends: each refresh token is presented once, the grant lives.
Without it (the control) both sides spend the same refresh token and the grant is revoked:
the rig makes a real split brain.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.fleet import Timing
from broker.refresher import drain_bound
from tests.integration.test_rotation_doors import audited, refresh_tokens_presented
from tests.integration.test_rotation_faults import check_grant_intact
from tests.support.authorization import ac_app, authorize_via_code
from tests.support.broker_process import BrokerFiles, wall_time
from tests.support.config import edit_config
from tests.support.fleet import Fleet, FleetStats, Poller
from tests.support.oauth_server import OAuthTestServer
from tests.support.split_brain import SplitBrainSentinel

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# Tokens live 15 s and are refreshed at 40 % of that (6 s): a refresh comes due on both sides
# soon after the failover (about 2 s), and the split lasts two lifetimes.
LIFETIME = 15.0
SPLIT_FOR = 2 * LIFETIME
# The token endpoint answers at once here; a short read timeout keeps the drain's bound short
# (the long objection window, one attempt, a commit and the margin, plus this).
READ_TIMEOUT = 4.0
DRAIN_BOUND = drain_bound(Timing(read_timeout=READ_TIMEOUT), spends=True)


@pytest.fixture
async def split_brain(tmp_path: Path) -> AsyncIterator[SplitBrainSentinel]:
    """M behind a proxy, two replicas and a Sentinel; everything stopped after the test."""
    topology = SplitBrainSentinel(tmp_path / "redis")
    await topology.start()
    try:
        yield topology
    finally:
        await topology.stop()


def set_store(files: BrokerFiles, url: str, **settings: Any) -> None:
    """Rewrite one replica's config with another store URL and extra store settings."""
    files.store_url = url
    edit_config(files.write(), lambda config: config["store"].update(settings))


async def split_brain_fleet(
    root: Path, oauth: OAuthTestServer, topology: SplitBrainSentinel, *, require_ack: bool
) -> Fleet:
    """b0 on M directly, b1 through Sentinel; both require a replica's ack, or neither."""
    oauth.lifetime = LIFETIME
    app = ac_app(oauth, at_fraction=0.4, read_timeout=READ_TIMEOUT)
    seed = BrokerFiles(
        directory=root / "seed",
        token_url=oauth.token_url,
        store_url=topology.url,
        apps={"app1": app},
    )
    await authorize_via_code(seed.write(), oauth)
    fleet = Fleet(root / "fleet", oauth.token_url, topology.url, 2, apps={"app1": app})
    set_store(fleet.replicas[0].files, topology.direct_url, require_replica_ack=require_ack)
    set_store(fleet.replicas[1].files, topology.url, require_replica_ack=require_ack)
    return fleet


async def stored_generation(client: aioredis.Redis) -> int:
    """The generation of app1's set on `client`'s Redis, under its client binding (0 if none)."""
    keys = await client.keys("tb-test:{app1@*}:token")
    if len(keys) != 1:
        return 0
    return int(await client.hget(keys[0], "gen") or 0)


async def between_spends(client: aioredis.Redis) -> int:
    """The stored generation while no spend is under way on `client`'s Redis (no lease held,
    no spend announced or sent); 0 while one is, or nothing is stored yet."""
    if await client.keys("tb-test:{app1@*}:lease"):
        return 0
    for key in await client.keys("tb-test:{app1@*}:spend"):
        if await client.hget(key, "state") in {b"announced", b"sent"}:
            return 0
    return await stored_generation(client)


def log_after(fleet: Fleet, index: int, since: float) -> str:
    """Replica `index`'s log lines from `since` on, but the tokens it served: for a failure."""
    return "\n".join(
        json.dumps(line)
        for line in fleet.replicas[index].process.log_lines()
        if wall_time(line) >= since and line["event"] not in {"token.issued", "token.served"}
    )


async def run_split(
    fleet: Fleet,
    oauth: OAuthTestServer,
    topology: SplitBrainSentinel,
    split_for: float = SPLIT_FOR,
) -> tuple[FleetStats, float, int]:
    """Start the fleet, let it refresh once, partition M for `split_for` seconds; (stats, split
    time, the generation M held at the split)."""
    poller = Poller(fleet, oauth)
    try:
        await fleet.start()
        poller.start()
        # Split between two spends: once the first refresh is committed on M and its lease
        # released (the next comes due 6 s later). A split during a spend would leave its
        # `sent` record on both sides, and the other side rightly declines to spend that
        # token; a split before the release leaves the spender's lease on M, and b0 waits out
        # its ttl before it may spend.
        deadline = time.monotonic() + 3 * LIFETIME
        primary = aioredis.Redis(host="127.0.0.1", port=topology.primary.port)
        try:
            while (held := await between_spends(primary)) < 2:
                assert time.monotonic() < deadline, "the fleet never refreshed before the split"
                await asyncio.sleep(0.05)
        finally:
            await primary.aclose()
        split_at = time.time()
        await topology.partition()
        await asyncio.sleep(split_at + split_for - time.time())
        return await poller.stop(), split_at, held
    finally:
        await poller.stop()
        # b0, cut off on the old primary, drains to its bound: no replica acknowledges the
        # abort of the spend SIGTERM abandoned, and it waits for one (swarm seed 25279).
        await fleet.stop_async(DRAIN_BOUND + 10.0)


class TestSentinelSplitBrain:
    async def test_the_old_primarys_side_never_sends(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        split_brain: SplitBrainSentinel,
    ) -> None:
        """With require_replica_ack: b0's spends on the isolated old primary are acknowledged
        by no replica and never sent (spend.not_durable); b1 refreshes on the promoted replica;
        every refresh token is presented once, the grant is not revoked, no expired token is
        served (b0 serves its token to the margin, then 503)."""
        fleet = await split_brain_fleet(tmp_path, oauth_server, split_brain, require_ack=True)
        # Three lifetimes: after the failover b1's first spend may wait for the promoted
        # replica's own replica (refused, then served to the margin) and then for the long
        # objection window (the store changed); two refreshes of its own must fit after that.
        stats, split_at, held = await run_split(
            fleet, oauth_server, split_brain, split_for=3 * LIFETIME
        )
        not_durable = audited(fleet, "spend.not_durable", split_at)
        # Refreshes of the split's time: newer than the set M held then (the refresher logs the
        # commit M already held a moment after the poller saw it, so its line may carry a later
        # timestamp than split_at: a CI run counted b0's pre-split refresh that way).
        refreshed = [
            (i, line)
            for i, line in audited(fleet, "token.refreshed", split_at)
            if int(str(line["generation"])) > held
        ]
        presented = refresh_tokens_presented(oauth_server)
        check_grant_intact(oauth_server)
        assert len(set(presented)) == len(presented), "a refresh token was presented twice"
        assert 0 in {i for i, _ in not_durable}, (
            f"b0's spends on the old primary were not refused; b0 after the split:\n"
            f"{log_after(fleet, 0, split_at)}"
        )
        assert {i for i, _ in refreshed} == {1}, "only the promoted side refreshes"
        assert len(refreshed) >= 2, "b1 did not keep refreshing on the promoted replica"
        # b1 too is refused while the promoted replica has no replica of its own yet (the other
        # replica re-attaches to it after the failover): rightly, and only until then.
        first_refresh = min(wall_time(line) for _, line in refreshed)
        b1_refused = [wall_time(line) for i, line in not_durable if i == 1]
        assert all(t < first_refresh for t in b1_refused), (
            f"b1 refused after it refreshed on the promoted replica: {b1_refused}"
        )
        assert stats.expired == 0, "an expired token was served"
        assert 503 in stats.of(0, split_at + LIFETIME), "b0 served past its token's margin"
        assert stats.of(1)[-1] == 200, "b1 did not end serving"
        # b0's drain waited its bound for a replica to acknowledge its abort, then said so.
        assert 0 in {i for i, _ in audited(fleet, "spend.abort_unwritten", split_at)}
        print(
            f"\nH4 split brain: b0 not durable x{len(not_durable)}, b1 refreshed "
            f"x{len(refreshed)}, {len(presented)} refresh tokens presented once each"
        )

    async def test_control_without_the_acknowledgement_both_sides_spend(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        split_brain: SplitBrainSentinel,
    ) -> None:
        """The same split brain with require_replica_ack off on both brokers (the code before
        H4): both sides present the same refresh token and the server revokes the grant. This
        shows the rig makes a real split brain, so the test above can fail."""
        fleet = await split_brain_fleet(tmp_path, oauth_server, split_brain, require_ack=False)
        await run_split(fleet, oauth_server, split_brain)
        presented = refresh_tokens_presented(oauth_server)
        assert len(set(presented)) < len(presented), (
            f"no refresh token was presented twice: {len(presented)} presented, refreshed by "
            f"{[i for i, _ in audited(fleet, 'token.refreshed')]}"
        )
        assert oauth_server.reuse_detected > 0
        assert any(g.revoked for g in oauth_server.grants.values()), "the grant survived"

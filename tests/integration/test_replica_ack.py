"""`store.require_replica_ack` on real Redis topologies: the `sent` record is WAITed for (H4).

A spend record only the primary holds may be lost in a failover, or stay behind on an old
primary the rest of the fleet no longer writes to (a split brain). With the setting, `mark_sent`
pipelines `WAIT 1 <timeout>` after its script on the same connection (on a Cluster, on the node
that owns the app's slot) and raises NotDurable when no replica acknowledged it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.clock import SystemClock
from broker.errors import NotDurable
from broker.metrics import Metrics
from broker.model import TokenSet
from broker.store import SpendEnd, SpendStart
from broker.store.crypto import Keyring
from broker.store.redis_store import RedisStore, redis_client
from tests.integration.test_rotation_doors import audited, refresh_tokens_presented
from tests.integration.test_rotation_faults import check_grant_intact
from tests.integration.test_split_brain import set_store
from tests.support.authorization import ac_app, authorize_via_code
from tests.support.broker_process import BrokerFiles
from tests.support.fleet import Fleet, Poller
from tests.support.oauth_server import OAuthTestServer
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import RedisCluster, RedisSentinel

pytestmark = pytest.mark.integration

ACK_TIMEOUT = 0.3
# What an online replica gets where a test needs its acknowledgement.
ONLINE_ACK_TIMEOUT = 5.0


def token_set(generation: int = 1) -> TokenSet:
    return TokenSet(
        f"access-{generation}-secret-value",
        "Bearer",
        1000.0,
        4600.0,
        None,
        f"refresh-{generation}-secret",
        lineage=1,
        generation=generation,
    )


StoreFactory = Callable[..., RedisStore]


@pytest.fixture
async def open_store() -> AsyncIterator[StoreFactory]:
    """RedisStores requiring a replica's acknowledgement, closed after the test."""
    opened: list[RedisStore] = []

    def make(url: str, ack_timeout: float = ACK_TIMEOUT) -> RedisStore:
        store = RedisStore(
            redis_client(url, socket_timeout=ack_timeout + 1.0),
            key_prefix="tb",
            keyring=Keyring([("k", b"K" * 32)]),
            metrics=Metrics(),
            clock=SystemClock(),
            require_replica_ack=True,
            replica_ack_timeout=ack_timeout,
        )
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
def replica_of(tmp_path: Path) -> Iterator[Callable[[RedisServer], RedisServer]]:
    """Start a replica of a given server; stopped after the test."""
    started: list[RedisServer] = []

    def start(primary: RedisServer) -> RedisServer:
        replica = RedisServer(
            directory=tmp_path / f"replica-{len(started)}",
            extra_args=("--replicaof", "127.0.0.1", str(primary.port)),
        )
        started.append(replica)
        replica.start()
        wait_for_replicas(primary.port, 1)
        return replica

    yield start
    for replica in started:
        replica.stop()


def wait_for_replicas(port: int, count: int, timeout: float = 20.0) -> None:
    """Until the server on `port` has `count` replicas online."""
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info: dict[str, Any] = client.info("replication")
            online = sum(
                1
                for key, value in info.items()
                if key.startswith("slave") and isinstance(value, dict)
                if value.get("state") == "online"
            )
            if online >= count:
                return
            time.sleep(0.05)
    finally:
        client.close()
    raise AssertionError(f"redis on {port}: fewer than {count} replica(s) online")


async def spend_announced(store: RedisStore, app: str = "app") -> int:
    """Commit a set, take the lease and announce its spend; the fence."""
    await store.commit(app, token_set())
    lease = await store.acquire_lease(app, "a", 10)
    start = await store.begin_spend(app, owner="a", fence=lease.fence, token=token_set())
    assert start is SpendStart.OK
    return lease.fence


class TestStandalone:
    async def test_no_replica_no_acknowledgement(
        self, redis_server: RedisServer, open_store: StoreFactory
    ) -> None:
        """A primary without replicas: the record is applied, WAIT answers 0 after its
        timeout, and mark_sent raises NotDurable (the caller does not send)."""
        store = open_store(redis_server.url)
        fence = await spend_announced(store)
        started = time.monotonic()
        with pytest.raises(NotDurable, match="no replica acknowledged"):
            await store.mark_sent("app", owner="a", fence=fence)
        waited = time.monotonic() - started
        assert ACK_TIMEOUT * 0.9 <= waited < ACK_TIMEOUT + 1.0, waited
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            assert client.hget(store.spend_key("app"), "state") == b"sent"
        finally:
            client.close()

    async def test_a_replica_acknowledges_and_holds_the_record(
        self,
        redis_server: RedisServer,
        open_store: StoreFactory,
        replica_of: Callable[[RedisServer], RedisServer],
    ) -> None:
        """With a replica online, mark_sent answers True, and the replica already holds the
        `sent` record when it returns (WAIT ran after the write, same connection). (The online
        replica gets 5 s to acknowledge: on a loaded machine it once took more than 300 ms.)"""
        replica = replica_of(redis_server)
        store = open_store(redis_server.url, ack_timeout=ONLINE_ACK_TIMEOUT)
        fence = await spend_announced(store)
        started = time.monotonic()
        assert await store.mark_sent("app", owner="a", fence=fence) is True
        assert time.monotonic() - started < ONLINE_ACK_TIMEOUT
        client = redis.Redis(host="127.0.0.1", port=replica.port)
        try:
            assert client.hget(store.spend_key("app"), "state") == b"sent"
        finally:
            client.close()

    async def test_a_lost_lease_is_answered_false(
        self, redis_server: RedisServer, open_store: StoreFactory
    ) -> None:
        """mark_sent under a fence that no longer holds the lease: False, as without the setting
        (not NotDurable: nothing was written, there is nothing to acknowledge)."""
        store = open_store(redis_server.url)
        fence = await spend_announced(store)
        assert await store.mark_sent("app", owner="a", fence=fence + 1) is False

    async def test_the_store_stays_up_when_only_the_ack_is_missing(
        self, redis_server: RedisServer, open_store: StoreFactory
    ) -> None:
        """A missing acknowledgement is not an outage: the store_up gauge stays 1."""
        store = open_store(redis_server.url)
        fence = await spend_announced(store)
        with pytest.raises(NotDurable):
            await store.mark_sent("app", owner="a", fence=fence)
        assert store._metrics.store_up._value.get() == 1


class TestCommitsAndAbortsAreWaitedFor:
    """Issue 20 (swarm seeds 21255, 23291): a commit and an abort are WAITed for as the `sent`
    record is; a failover after their writer exited loses what only the primary held."""

    async def test_a_commit_without_a_replica_is_stored_but_not_durable(
        self, redis_server: RedisServer, open_store: StoreFactory
    ) -> None:
        """No replica: the set is stored on the primary (served as usual), WAIT answers 0
        after its timeout, and the commit says so (`durable` False, not an error)."""
        store = open_store(redis_server.url)
        started = time.monotonic()
        commit = await store.commit("app", token_set(2))
        waited = time.monotonic() - started
        assert commit.stored and not commit.durable
        assert ACK_TIMEOUT * 0.9 <= waited < ACK_TIMEOUT + 1.0, waited
        loaded = await store.load("app")
        assert loaded is not None and loaded.rank == (1, 2)

    async def test_a_repeated_commit_asks_again_once_a_replica_is_back(
        self,
        redis_server: RedisServer,
        open_store: StoreFactory,
        replica_of: Callable[[RedisServer], RedisServer],
    ) -> None:
        """The drain's retry: the same set committed again after a replica came is answered
        as stored and durable, and the replica holds it (the repeat writes, so its WAIT
        counts the replica; without a write WAIT would answer for older writes)."""
        store = open_store(redis_server.url)
        assert not (await store.commit("app", token_set(2))).durable
        replica = replica_of(redis_server)
        online = open_store(redis_server.url, ack_timeout=ONLINE_ACK_TIMEOUT)
        commit = await online.commit("app", token_set(2))
        assert commit.stored and commit.durable and commit.rank == (1, 2)
        client = redis.Redis(host="127.0.0.1", port=replica.port)
        try:
            assert client.hget(store.token_key("app"), "gen") == b"2"
        finally:
            client.close()

    async def test_an_abort_without_a_replica_raises_not_durable_until_one_holds_it(
        self,
        redis_server: RedisServer,
        open_store: StoreFactory,
        replica_of: Callable[[RedisServer], RedisServer],
    ) -> None:
        """No replica: the abort is applied on the primary (the record is gone) and raises
        NotDurable; asked again (the record is gone, its mark names this spend) it raises
        again, as does another owner's abort that finds nothing of its own; once a replica is
        online the same call succeeds and the replica holds the abort. An unknown outcome is not waited for (losing it leaves `sent`: unknown too)."""
        store = open_store(redis_server.url)
        fence = await spend_announced(store)
        with pytest.raises(NotDurable):
            await store.mark_sent("app", owner="a", fence=fence)
        with pytest.raises(NotDurable, match="abort"):
            await store.end_spend("app", owner="a", fence=fence, outcome=SpendEnd.ABORTED)
        assert await store.load_spend("app") is None
        with pytest.raises(NotDurable, match="abort"):
            await store.end_spend("app", owner="a", fence=fence, outcome=SpendEnd.ABORTED)
        # Another owner's abort finds nothing of its own here, and that answer is waited for
        # too: an isolated primary says so of a record the other side still holds (25279).
        with pytest.raises(NotDurable, match="abort"):
            await store.end_spend("app", owner="b", fence=fence, outcome=SpendEnd.ABORTED)
        replica = replica_of(redis_server)
        online = open_store(redis_server.url, ack_timeout=ONLINE_ACK_TIMEOUT)
        await online.end_spend("app", owner="a", fence=fence, outcome=SpendEnd.ABORTED)
        client = redis.Redis(host="127.0.0.1", port=replica.port)
        try:
            assert client.exists(store.spend_key("app")) == 0
            mark = client.get(store.aborted_key("app"))
            assert isinstance(mark, bytes) and mark.startswith(f"a|{fence}|".encode())
        finally:
            client.close()
        fence = await spend_announced(online)
        assert await online.mark_sent("app", owner="a", fence=fence) is True
        started = time.monotonic()
        await store.end_spend("app", owner="a", fence=fence, outcome=SpendEnd.UNKNOWN)
        assert time.monotonic() - started < ACK_TIMEOUT


class TestCluster:
    async def test_wait_runs_on_the_node_of_the_apps_slot(
        self, cluster: RedisCluster, open_store: StoreFactory
    ) -> None:
        """On a Cluster of masters without replicas, the WAIT after mark_sent answers 0 on the
        node owning the app's slot: NotDurable, and that node holds the `sent` record."""
        store = open_store(cluster.url)
        for app in ("app", "other-app", "third"):
            fence = await spend_announced(store, app)
            with pytest.raises(NotDurable):
                await store.mark_sent(app, owner="a", fence=fence)
        client = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        try:
            for app in ("app", "other-app", "third"):
                assert client.hget(store.spend_key(app), "state") == b"sent"
        finally:
            client.close()

    async def test_commits_and_aborts_wait_on_the_node_of_the_apps_slot(
        self, cluster: RedisCluster, open_store: StoreFactory
    ) -> None:
        """On the same Cluster (no replicas), a commit is stored and answered not durable,
        and an abort is applied and raises NotDurable, for apps on different nodes."""
        store = open_store(cluster.url)
        for app in ("app", "other-app", "third"):
            commit = await store.commit(app, token_set(2))
            assert commit.stored and not commit.durable
            lease = await store.acquire_lease(app, "a", 10)
            start = await store.begin_spend(app, owner="a", fence=lease.fence, token=token_set(2))
            assert start is SpendStart.OK
            with pytest.raises(NotDurable):
                await store.mark_sent(app, owner="a", fence=lease.fence)
            with pytest.raises(NotDurable, match="abort"):
                await store.end_spend(app, owner="a", fence=lease.fence, outcome=SpendEnd.ABORTED)
            assert await store.load_spend(app) is None


class TestSentinel:
    async def test_through_sentinel_the_replica_acknowledges(
        self, tmp_path: Path, open_store: StoreFactory
    ) -> None:
        """Through redis+sentinel:// with a replica online, mark_sent answers True."""
        topology = RedisSentinel(tmp_path / "sentinel", with_replica=True)
        topology.start()
        try:
            wait_for_replicas(topology.master.port, 1)
            # A generous wait: an online replica on a loaded machine (CI) once took over
            # 300 ms to acknowledge; this test is about the acknowledgement, not its speed.
            store = open_store(topology.url, ack_timeout=ONLINE_ACK_TIMEOUT)
            fence = await spend_announced(store)
            assert await store.mark_sent("app", owner="a", fence=fence) is True
        finally:
            topology.stop()


class TestBrokerWhileTheReplicaIsDown:
    async def test_it_refuses_to_spend_then_resumes(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        redis_server: RedisServer,
        replica_of: Callable[[RedisServer], RedisServer],
    ) -> None:
        """A real broker on a primary whose only replica is killed: its spends get no
        acknowledgement and are never sent (spend.not_durable), it serves its token to the
        margin and then answers 503; when the replica is back it refreshes and serves again.
        No refresh token is presented twice and the grant lives."""
        lifetime = 10.0
        oauth_server.lifetime = lifetime
        app = ac_app(oauth_server, at_fraction=0.4)
        seed = BrokerFiles(
            directory=tmp_path / "seed",
            token_url=oauth_server.token_url,
            store_url=redis_server.url,
            apps={"app1": app},
        )
        await authorize_via_code(seed.write(), oauth_server)
        replica = replica_of(redis_server)
        fleet = Fleet(
            tmp_path / "fleet", oauth_server.token_url, redis_server.url, 1, apps={"app1": app}
        )
        set_store(fleet.replicas[0].files, redis_server.url, require_replica_ack=True)
        poller = Poller(fleet, oauth_server)
        try:
            await fleet.start()
            poller.start()
            deadline = time.monotonic() + 3 * lifetime
            while not oauth_server.count("refresh_token"):
                assert time.monotonic() < deadline, "no refresh before the replica went down"
                await asyncio.sleep(0.05)
            down_at = time.time()
            refreshes_before = oauth_server.count("refresh_token")
            await asyncio.to_thread(replica.stop)
            deadline = time.monotonic() + 3 * lifetime
            while 503 not in poller.stats.of(0, down_at):
                assert time.monotonic() < deadline, "the broker never stopped serving"
                await asyncio.sleep(0.1)
            blocked_refreshes = oauth_server.count("refresh_token") - refreshes_before
            back_at = time.time()
            await asyncio.to_thread(replica.start)
            await asyncio.to_thread(wait_for_replicas, redis_server.port, 1)
            deadline = time.monotonic() + 3 * lifetime
            while poller.stats.serving_again(0, time.time() - 0.5) is None or (
                oauth_server.count("refresh_token") == refreshes_before
            ):
                assert time.monotonic() < deadline, "the broker did not resume"
                await asyncio.sleep(0.1)
            stats = await poller.stop()
        finally:
            await poller.stop()
            await fleet.stop_async()
        not_durable = audited(fleet, "spend.not_durable", down_at)
        check_grant_intact(oauth_server)
        presented = refresh_tokens_presented(oauth_server)
        assert len(set(presented)) == len(presented)
        assert blocked_refreshes == 0, "a refresh token was sent while no replica acknowledged"
        assert not_durable, "no spend.not_durable while the replica was down"
        assert stats.expired == 0, "an expired token was served"
        assert stats.serving_again(0, back_at) is not None

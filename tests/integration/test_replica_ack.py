"""`store.require_replica_ack` on real Redis topologies: the `sent` record is WAITed for (H4).

A spend record only the primary holds may be lost in a failover, or stay behind on an old
primary the rest of the fleet no longer writes to (a split brain). With the setting, `mark_sent`
pipelines `WAIT 1 <timeout>` after its script on the same connection (on a Cluster, on the node
that owns the app's slot) and raises NotDurable when no replica acknowledged it.
"""

from __future__ import annotations

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
from broker.store import SpendStart
from broker.store.crypto import Keyring
from broker.store.redis_store import RedisStore, redis_client
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import RedisCluster, RedisSentinel

pytestmark = pytest.mark.integration

ACK_TIMEOUT = 0.3


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


StoreFactory = Callable[[str], RedisStore]


@pytest.fixture
async def open_store() -> AsyncIterator[StoreFactory]:
    """RedisStores requiring a replica's acknowledgement, closed after the test."""
    opened: list[RedisStore] = []

    def make(url: str) -> RedisStore:
        store = RedisStore(
            redis_client(url, socket_timeout=ACK_TIMEOUT + 1.0),
            key_prefix="tb",
            keyring=Keyring([("k", b"K" * 32)]),
            metrics=Metrics(),
            clock=SystemClock(),
            require_replica_ack=True,
            replica_ack_timeout=ACK_TIMEOUT,
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
        """With a replica online, mark_sent answers True at once, and the replica already
        holds the `sent` record when it returns (WAIT ran after the write, same connection)."""
        replica = replica_of(redis_server)
        store = open_store(redis_server.url)
        fence = await spend_announced(store)
        started = time.monotonic()
        assert await store.mark_sent("app", owner="a", fence=fence) is True
        assert time.monotonic() - started < ACK_TIMEOUT
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


class TestSentinel:
    async def test_through_sentinel_the_replica_acknowledges(
        self, tmp_path: Path, open_store: StoreFactory
    ) -> None:
        """Through redis+sentinel:// with a replica online, mark_sent answers True."""
        topology = RedisSentinel(tmp_path / "sentinel", with_replica=True)
        topology.start()
        try:
            wait_for_replicas(topology.master.port, 1)
            store = open_store(topology.url)
            fence = await spend_announced(store)
            assert await store.mark_sent("app", owner="a", fence=fence) is True
        finally:
            topology.stop()

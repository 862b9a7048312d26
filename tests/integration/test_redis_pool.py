"""Bounded Redis pools: hundreds of apps at once share a few connections, waiting, never failing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.clock import SystemClock
from broker.metrics import Metrics
from broker.store.crypto import Keyring
from broker.store.redis_pool import (
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_PROBES,
    MAX_COMMAND_CONNECTIONS,
    USER_TIMEOUT_MS,
    PoolWaitTimeout,
    WaitingPool,
)
from broker.store.redis_store import RedisStore, redis_client
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import RedisCluster, RedisSentinel

pytestmark = pytest.mark.integration

NAME = "tb-pool-test"
APPS = [f"app{i}" for i in range(300)]


def store_on(url: str) -> RedisStore:
    """A RedisStore on `url` whose connections are named NAME.

    A generous socket timeout: these tests count connections, and a loaded CI machine can stall
    redis-server past the broker's 1 s.
    """
    return RedisStore(
        redis_client(url, client_name=NAME, socket_timeout=5.0),
        key_prefix="tb",
        keyring=Keyring([("a", b"A" * 32)]),
        metrics=Metrics(),
        clock=SystemClock(),
    )


async def named_connections(port: int) -> int:
    """Connections to the Redis on `port` that carry the client name NAME."""
    async with aioredis.Redis(port=port) as admin:
        clients: list[dict[str, Any]] = await admin.client_list()
    return sum(1 for c in clients if c.get("name") == NAME)


@contextlib.asynccontextmanager
async def subscribed(store: RedisStore) -> AsyncIterator[None]:
    """The store's pub/sub feed running in the background, as the broker runs it."""

    async def follow() -> None:
        async for _ in store.updates():
            pass

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.2)  # subscribed: it holds its connection now
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def keepalive_of_connections_to(ports: set[int]) -> list[tuple[int, int, int, int, int]]:
    """(SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT) of each of this
    process's TCP sockets connected to one of `ports` (read from the sockets themselves)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket (or closed meanwhile)
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM or sock.getpeername()[1] not in ports:
                    continue
            except (OSError, IndexError, TypeError):
                continue  # not connected, or not an inet socket
            found.append(
                (
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                )
            )
    return found


KEEPALIVE = (1, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES, USER_TIMEOUT_MS)


async def load_everything(store: RedisStore) -> None:
    """Every app's load, all at once (a warm start without a pipeline)."""
    results = await asyncio.gather(*(store.load(app) for app in APPS), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []


class TestStandalone:
    """redis://: redis-py's blocking pool, MAX_COMMAND_CONNECTIONS plus pub/sub."""

    async def test_300_loads_at_once_use_at_most_five_connections(
        self, redis_server: RedisServer
    ) -> None:
        """300 concurrent loads all succeed with the feed subscribed, over at most 5 connections."""
        store = store_on(redis_server.url)
        try:
            async with subscribed(store):
                await load_everything(store)
                assert (
                    1 <= await named_connections(redis_server.port) <= MAX_COMMAND_CONNECTIONS + 1
                )
        finally:
            await store.close()

    async def test_a_wait_that_times_out_is_a_pool_wait_timeout(
        self, redis_server: RedisServer
    ) -> None:
        """When no connection comes free in time, the error is PoolWaitTimeout; then it recovers."""
        pool = WaitingPool.from_url(redis_server.url, max_connections=1, timeout=0.2)
        client = aioredis.Redis.from_pool(pool)
        try:
            held = await pool.get_connection()
            with pytest.raises(PoolWaitTimeout):
                await client.ping()
            await pool.release(held)
            assert await client.ping()
        finally:
            await client.aclose()

    async def test_a_refused_connection_is_not_a_pool_wait_timeout(self) -> None:
        """A Redis that is not there fails as a plain ConnectionError, not as a pool wait."""
        client = redis_client(f"redis://127.0.0.1:{free_port()}/0")
        try:
            with pytest.raises(RedisConnectionError) as caught:
                await client.ping()
            assert not isinstance(caught.value, PoolWaitTimeout)
        finally:
            await client.aclose()


class TestSentinel:
    """redis+sentinel://: the same waiting pool on the master the Sentinel names."""

    async def test_300_loads_at_once_use_at_most_five_master_connections(
        self, sentinel: RedisSentinel
    ) -> None:
        """300 concurrent loads through Sentinel succeed over at most 5 master connections."""
        store = store_on(sentinel.url)
        try:
            async with subscribed(store):
                await load_everything(store)
                connections = await named_connections(sentinel.master.port)
                assert 1 <= connections <= MAX_COMMAND_CONNECTIONS + 1
        finally:
            await store.close()


class TestCluster:
    """redis+cluster://: at most MAX_COMMAND_CONNECTIONS commands in flight, so no node's pool
    (redis-py raises MaxConnectionsError past its size) ever runs out."""

    async def test_300_loads_and_saves_at_once_never_exhaust_a_node(
        self, cluster: RedisCluster
    ) -> None:
        """300 concurrent loads, then 300 concurrent lease writes, succeed; each node sees <= 5."""
        store = store_on(cluster.url)
        try:
            async with subscribed(store):
                await load_everything(store)
                leases = await asyncio.gather(
                    *(store.acquire_lease(app, "owner", 5.0) for app in APPS)
                )
                assert all(leases)
                per_node = [await named_connections(node.port) for node in cluster.nodes]
                assert all(n <= MAX_COMMAND_CONNECTIONS + 1 for n in per_node), per_node
                assert sum(per_node) >= 3  # every node was used (the apps span the slots)
        finally:
            await store.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads sockets via /proc")
class TestKeepalive:
    """Every connection to Redis, commands and the subscription alike, has TCP keepalive on
    (a peer that vanished is found within about 30 s instead of never) and, on Linux,
    TCP_USER_TIMEOUT (bytes never acknowledged fail the connection after as long)."""

    async def test_standalone(self, redis_server: RedisServer) -> None:
        """redis://: the command connections and the pub/sub connection."""
        store = store_on(redis_server.url)
        try:
            async with subscribed(store):
                await load_everything(store)
                found = keepalive_of_connections_to({redis_server.port})
        finally:
            await store.close()
        assert len(found) >= 2, found  # at least one command connection and the subscription
        assert set(found) == {KEEPALIVE}

    async def test_sentinel(self, sentinel: RedisSentinel) -> None:
        """redis+sentinel://: the master's connections and the sentinels' own."""
        store = store_on(sentinel.url)
        try:
            async with subscribed(store):
                await load_everything(store)
                to_master = keepalive_of_connections_to({sentinel.master.port})
                to_sentinels = keepalive_of_connections_to({sentinel.sentinel_port})
        finally:
            await store.close()
        assert len(to_master) >= 2, to_master
        assert to_sentinels, "no connection to a sentinel was seen"
        assert set(to_master) | set(to_sentinels) == {KEEPALIVE}

    async def test_cluster(self, cluster: RedisCluster) -> None:
        """redis+cluster://: every node's connections."""
        store = store_on(cluster.url)
        try:
            async with subscribed(store):
                await load_everything(store)
                found = keepalive_of_connections_to({node.port for node in cluster.nodes})
        finally:
            await store.close()
        assert len(found) >= len(cluster.nodes), found
        assert set(found) == {KEEPALIVE}

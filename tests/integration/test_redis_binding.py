"""The Redis store's protocol versions and client bindings, against a real redis-server.

Issue 20, M5 and M6: every stored set, lease and notice carries the fleet protocol version
(a mark without one reads as 1); a set lives under its app's client binding (`app@binding`),
bound into its AAD; a set the release before the binding stored under the bare app name moves
to the first binding that reads it, once, and never while that release may be spending it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from broker.clock import SystemClock
from broker.errors import UnreadableTokenSet
from broker.metrics import Metrics
from broker.model import PROTOCOL_VERSION, TokenSet
from broker.store import Notice
from broker.store.crypto import Keyring
from broker.store.redis_store import RedisStore, redis_client
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

BOUND = "app1@0123456789abcdef"
OTHER = "app1@fedcba9876543210"


def grant(generation: int) -> TokenSet:
    return TokenSet(
        f"access-token-{generation:04d}-secret-value",
        "Bearer",
        1000.0,
        4600.0,
        None,
        f"refresh-token-{generation:04d}-secret-value",
        lineage=7,
        generation=generation,
    )


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    s = RedisStore(
        redis_client(redis_server.url),
        key_prefix="tb",
        keyring=Keyring([("a", b"A" * 32)]),
        metrics=Metrics(),
        clock=SystemClock(),
    )
    yield s
    await s.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    yield client
    await client.aclose()


class TestProtocolVersion:
    async def test_a_stored_set_carries_the_version(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """A commit writes `pv`; the set loads back with that protocol version."""
        await store.commit(BOUND, grant(1))
        assert await raw.hget(store.token_key(BOUND), "pv") == str(PROTOCOL_VERSION).encode()
        loaded = await store.load(BOUND)
        assert loaded is not None and loaded.protocol == PROTOCOL_VERSION

    async def test_a_hash_without_a_version_reads_as_version_1(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """A set stored by a release before the version field (no `pv`) is read as version 1."""
        await store.commit(BOUND, grant(1))
        await raw.hdel(store.token_key(BOUND), "pv")
        loaded = await store.load(BOUND)
        assert loaded is not None and loaded.protocol == 1

    async def test_a_newer_version_is_read_as_such(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """A set a newer release stored says so (the fleet protocol then does not spend it)."""
        await store.commit(BOUND, grant(1))
        await raw.hset(store.token_key(BOUND), "pv", PROTOCOL_VERSION + 1)
        loaded = await store.load(BOUND)
        assert loaded is not None and loaded.protocol == PROTOCOL_VERSION + 1

    async def test_a_busy_lease_names_its_holders_version(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """The lease value carries the holder's version; an old value without one reads as 1."""
        held = await store.acquire_lease(BOUND, "r1", 30.0)
        assert held.held
        assert await raw.get(store.lease_key(BOUND)) == f"r1|{held.fence}|1".encode()
        assert (await store.acquire_lease(BOUND, "r2", 30.0)).protocol == PROTOCOL_VERSION
        await raw.set(store.lease_key(BOUND), "r9|99|2", px=30_000)
        assert (await store.acquire_lease(BOUND, "r2", 30.0)).protocol == 2
        await raw.set(store.lease_key(BOUND), "r9|99", px=30_000)
        busy = await store.acquire_lease(BOUND, "r2", 30.0)
        assert not busy.held and busy.protocol == 1

    async def test_our_own_lease_still_works_end_to_end(self, store: RedisStore) -> None:
        """Lease, spend, mark sent, commit and release all match the versioned lease value."""
        await store.commit(BOUND, grant(1))
        lease = await store.acquire_lease(BOUND, "r1", 30.0)
        started = await store.begin_spend(BOUND, owner="r1", fence=lease.fence, token=grant(1))
        assert started == "ok"
        assert await store.mark_sent(BOUND, owner="r1", fence=lease.fence)
        assert (await store.commit(BOUND, grant(2), fence=lease.fence)).stored
        await store.release_lease(BOUND, "r1", lease.fence)
        assert (await store.acquire_lease(BOUND, "r2", 30.0)).held

    async def test_notices_carry_the_version(self, store: RedisStore) -> None:
        """Every notice says which protocol version its writer speaks."""
        received: list[Notice] = []

        async def listen() -> None:
            async for notice in store.updates():
                received.append(notice)

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0.3)
        await store.commit(BOUND, grant(1))
        for _ in range(50):
            if received:
                break
            await asyncio.sleep(0.05)
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        assert received and received[0].protocol == PROTOCOL_VERSION

    def test_a_notice_without_a_version_decodes_as_version_1(self) -> None:
        """A notice published by a release before the field reads as version 1."""
        old = json.dumps({"app": "app1", "kind": "token", "version": 3, "lineage": 1, "gen": 2})
        notice = Notice.decode(old)
        assert notice is not None and notice.protocol == 1
        assert Notice.decode(Notice("a", "spend", protocol=2).encode()) == Notice(
            "a", "spend", protocol=2
        )


class TestBinding:
    async def test_each_binding_has_its_own_set(self, store: RedisStore) -> None:
        """Two bindings of one app keep separate sets: a commit under one is not seen by the
        other, whatever its rank."""
        await store.commit(BOUND, grant(1))
        assert await store.load(OTHER) is None
        await store.commit(OTHER, grant(9))
        loaded = await store.load(BOUND)
        assert loaded is not None and loaded.generation == 1

    async def test_a_set_copied_to_another_binding_does_not_open(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """The AAD binds a blob to its binding: copied under another one, it is unreadable."""
        await store.commit(BOUND, grant(1))
        fields = await raw.hgetall(store.token_key(BOUND))
        for field_name, value in fields.items():
            await raw.hset(store.token_key(OTHER), field_name, value)
        with pytest.raises(UnreadableTokenSet):
            await store.load(OTHER)


class TestUpgradeFromAnUnboundSet:
    async def test_the_first_binding_to_read_it_moves_it_once(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """A set under the bare name (the previous release) moves to the binding that reads
        it: same set and rank; the bare name keeps a tombstone one generation up that no key
        opens, and another binding finds nothing to take."""
        await store.commit("app1", grant(4))
        await raw.hdel(store.token_key("app1"), "pv")  # as the previous release stored it
        moved = await store.load(BOUND)
        assert moved is not None
        assert moved.rank == (7, 4) and moved.access_token == grant(4).access_token
        assert moved.refresh_token == grant(4).refresh_token
        again = await store.load(BOUND)
        assert again is not None and again.rank == (7, 4)
        # The previous release reads the bare name: a newer set it cannot open, so it never
        # spends the moved refresh token again.
        with pytest.raises(UnreadableTokenSet) as unreadable:
            await store.load("app1")
        assert unreadable.value.rank == (7, 5)
        assert await store.load(OTHER) is None

    async def test_not_while_the_previous_release_holds_its_lease(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """While a replica of the previous release holds the bare name's lease, the set is not
        moved: the app waits (unreadable, not unauthorized), and moves once the lease is gone."""
        await store.commit("app1", grant(4))
        await raw.set(store.lease_key("app1"), "old-replica|3", px=30_000)
        with pytest.raises(UnreadableTokenSet) as waiting:
            await store.load(BOUND)
        assert waiting.value.rank == (7, 4)
        assert await raw.exists(store.token_key(BOUND)) == 0
        await raw.delete(store.lease_key("app1"))
        moved = await store.load(BOUND)
        assert moved is not None and moved.rank == (7, 4)

    async def test_not_while_its_spend_is_on_the_wire(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """A spend of the bare name's set that was sent (its answer not stored yet) keeps the
        set where it is: its commit must land where the previous release looks."""
        await store.commit("app1", grant(4))
        await raw.hset(store.spend_key("app1"), mapping={"fence": 3, "state": "sent"})
        with pytest.raises(UnreadableTokenSet):
            await store.load(BOUND)
        assert await raw.exists(store.token_key(BOUND)) == 0

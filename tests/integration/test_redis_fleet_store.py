"""The Redis store's fleet primitives against a real redis-server: clock, failure record, budget."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from broker.clock import SystemClock
from broker.errors import StoreUnavailable
from broker.fleetclock import FleetClock
from broker.metrics import Metrics
from broker.model import FailureRecord, TokenSet
from broker.store import BUDGET_WINDOW, FAILURE_RETENTION, Refusal
from broker.store.crypto import Keyring
from broker.store.redis_store import RedisStore, redis_client
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

KEY_A = ("a", b"A" * 32)
KEY_B = ("b", b"B" * 32)
ERROR = "transient: http 503 (upstream says: account AC-secretish-detail)"


def make_store(server: RedisServer, keys: list[tuple[str, bytes]] | None = None) -> RedisStore:
    return RedisStore(
        redis_client(server.url),
        key_prefix="tb",
        keyring=Keyring(keys or [KEY_A]),
        metrics=Metrics(),
        clock=SystemClock(),
    )


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    s = make_store(redis_server)
    yield s
    await s.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    yield client
    await client.aclose()


class TestServerTime:
    async def test_time_is_the_servers_clock(self, store: RedisStore) -> None:
        """server_time is Redis TIME: on this host, within a second of the local clock."""
        first = await store.server_time()
        assert abs(first - time.time()) < 1.0
        await asyncio.sleep(0.05)
        assert await store.server_time() > first

    async def test_fleet_clock_measures_a_small_offset(self, store: RedisStore) -> None:
        """A FleetClock measured against a Redis on the same host finds an offset near 0."""
        clock = FleetClock(SystemClock())
        assert await clock.measure(store) == "first"
        assert abs(clock.offset()) < 0.05
        assert abs(clock.time() - time.time()) < 0.05


class TestFailureRecord:
    async def test_round_trip(self, store: RedisStore) -> None:
        """A recorded failure loads back as written; clear_failure removes it."""
        not_before = await store.server_time() + 8.0
        await store.record_failure(
            "app1", failures=3, not_before=not_before, error=ERROR, permanent=False
        )
        assert await store.load_failure("app1") == FailureRecord(3, not_before, ERROR, False)
        assert await store.load_failure("app2") is None
        await store.clear_failure("app1")
        assert await store.load_failure("app1") is None

    async def test_seen_by_every_replica(self, redis_server: RedisServer) -> None:
        """What one replica records, another reads (the fleet backs off as one)."""
        holder, other = make_store(redis_server), make_store(redis_server)
        try:
            not_before = await holder.server_time() + 30.0
            await holder.record_failure(
                "app1", failures=5, not_before=not_before, error="permanent: x", permanent=True
            )
            assert await other.load_failure("app1") == FailureRecord(
                5, not_before, "permanent: x", True
            )
        finally:
            await holder.close()
            await other.close()

    async def test_lapses_retention_after_not_before_on_the_servers_clock(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """The key's TTL is (not_before - server time) + FAILURE_RETENTION."""
        not_before = await store.server_time() + 40.0
        await store.record_failure(
            "app1", failures=1, not_before=not_before, error="e", permanent=False
        )
        ttl = await raw.pttl("tb:{app1}:failure") / 1000
        assert 40.0 + FAILURE_RETENTION - 2.0 <= ttl <= 40.0 + FAILURE_RETENTION

    async def test_a_past_not_before_keeps_the_retention(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """A not_before already passed still keeps the record FAILURE_RETENTION (the count)."""
        not_before = await store.server_time() - 100.0
        await store.record_failure(
            "app1", failures=1, not_before=not_before, error="e", permanent=False
        )
        ttl = await raw.pttl("tb:{app1}:failure") / 1000
        assert FAILURE_RETENTION - 2.0 <= ttl <= FAILURE_RETENTION

    async def test_encrypted_at_rest(self, store: RedisStore, raw: aioredis.Redis) -> None:
        """The error text is not in Redis in plain text; the key carries the app's hash tag."""
        await store.record_failure("app1", failures=1, not_before=0.0, error=ERROR, permanent=False)
        keys = [k.decode() if isinstance(k, bytes) else k for k in await raw.keys("*")]
        assert keys == ["tb:{app1}:failure"]
        blob = await raw.get("tb:{app1}:failure")
        assert blob is not None
        assert b"AC-secretish-detail" not in blob
        assert b"transient" not in blob

    async def test_unknown_key_reads_as_none(self, redis_server: RedisServer) -> None:
        """A record written under a key this replica lacks is treated as absent, not a crash."""
        writer, reader = make_store(redis_server, [KEY_A]), make_store(redis_server, [KEY_B])
        try:
            await writer.record_failure(
                "app1", failures=1, not_before=0.0, error="e", permanent=False
            )
            assert await reader.load_failure("app1") is None
        finally:
            await writer.close()
            await reader.close()


class TestBudget:
    async def test_allows_the_limit_then_refuses(self, store: RedisStore) -> None:
        """`limit` requests in the window pass; the next is refused until the oldest leaves."""
        now = await store.server_time()
        for i in range(3):
            assert await store.take_budget("app1", 3, now + i) == (True, 0.0)
        allowed, retry_after = await store.take_budget("app1", 3, now + 10.0)
        assert not allowed
        assert retry_after == pytest.approx(BUDGET_WINDOW - 10.0, abs=0.002)
        assert (await store.take_budget("app1", 3, now + BUDGET_WINDOW))[0] is True

    async def test_shared_by_the_fleet(self, redis_server: RedisServer) -> None:
        """Two replicas draw on one budget: together they get `limit` requests, not twice that."""
        a, b = make_store(redis_server), make_store(redis_server)
        try:
            now = await a.server_time()
            results = [
                await (a if i % 2 else b).take_budget("app1", 4, now + i / 10) for i in range(8)
            ]
        finally:
            await a.close()
            await b.close()
        assert [allowed for allowed, _ in results] == [True] * 4 + [False] * 4

    async def test_refused_requests_are_not_counted(self, store: RedisStore) -> None:
        """Refusals do not extend the window."""
        now = await store.server_time()
        await store.take_budget("app1", 1, now)
        for i in range(5):
            assert (await store.take_budget("app1", 1, now + 1 + i))[0] is False
        assert (await store.take_budget("app1", 1, now + BUDGET_WINDOW))[0] is True

    async def test_the_window_key_expires(self, store: RedisStore, raw: aioredis.Redis) -> None:
        """The budget key lapses a window after the last counted request (no garbage left)."""
        await store.take_budget("app1", 5, await store.server_time())
        ttl = await raw.pttl("tb:{app1}:budget") / 1000
        assert 0 < ttl <= BUDGET_WINDOW

    async def test_a_limit_below_one_is_refused(self, store: RedisStore) -> None:
        """A budget of 0 is a programming error, not a silent refusal of everything."""
        with pytest.raises(ValueError, match="at least 1"):
            await store.take_budget("app1", 0, 0.0)


class TestRefusedToken:
    async def test_the_refused_key_holds_a_fingerprint_and_lapses(
        self, store: RedisStore, raw: aioredis.Redis
    ) -> None:
        """Issue 22: the refusal is kept as the access token's fingerprint (no token in Redis's
        plaintext), lapsing after the interval on Redis's clock (no garbage left)."""
        token = TokenSet("access-refused-secret-value", "Bearer", 1000.0, 4600.0, None, None, 1, 1)
        await store.commit("app1", token)
        assert (
            await store.refuse_token("app1", token.fingerprint, interval=10.0) is Refusal.RECORDED
        )
        assert await raw.get("tb:{app1}:refused") == token.fingerprint.encode()
        assert 0 < await raw.pttl("tb:{app1}:refused") / 1000 <= 10.0
        for key in await raw.keys("tb:*"):
            dumped = await raw.dump(key)
            assert dumped is not None and b"access-refused-secret-value" not in dumped


class TestOutage:
    async def test_every_primitive_raises_store_unavailable(
        self, redis_server: RedisServer
    ) -> None:
        """With Redis down each primitive raises StoreUnavailable; a FleetClock keeps its offset."""
        store = make_store(redis_server)
        clock = FleetClock(SystemClock())
        await clock.measure(store)
        redis_server.stop()
        try:
            with pytest.raises(StoreUnavailable):
                await store.server_time()
            with pytest.raises(StoreUnavailable):
                await store.record_failure(
                    "a", failures=1, not_before=0.0, error="e", permanent=False
                )
            with pytest.raises(StoreUnavailable):
                await store.load_failure("a")
            with pytest.raises(StoreUnavailable):
                await store.clear_failure("a")
            with pytest.raises(StoreUnavailable):
                await store.take_budget("a", 1, 0.0)
            assert await clock.measure(store) == "unavailable"
            assert clock.measured
        finally:
            await store.close()

"""The Redis store against a real redis-server: CAS, leases, notifications, encryption, outages."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import random
from collections.abc import AsyncGenerator, AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
import structlog.testing

from broker.clock import SystemClock
from broker.core import BrokerCore
from broker.errors import StoreUnavailable, UnreadableTokenSet
from broker.metrics import Metrics
from broker.model import StoreSpec, TokenSet
from broker.observe import Observer
from broker.store import Notice
from broker.store.crypto import Keyring
from broker.store.factory import open_store
from broker.store.redis_store import RedisStore, redis_client
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

KEY_A = ("a", b"A" * 32)
KEY_B = ("b", b"B" * 32)


def token(n: int, refresh: str | None = None) -> TokenSet:
    return TokenSet(
        f"access-token-{n:04d}-secret-value",
        "Bearer",
        1000.0 + n,
        4600.0 + n,
        "s",
        refresh,
        lineage=1,
        generation=n,
    )


def make_store(
    server: RedisServer, keys: list[tuple[str, bytes]], metrics: Metrics | None = None
) -> RedisStore:
    return RedisStore(
        redis_client(server.url),
        key_prefix="tb",
        keyring=Keyring(keys),
        metrics=metrics or Metrics(),
        clock=SystemClock(),
    )


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    s = make_store(redis_server, [KEY_A])
    yield s
    await s.close()


class TestCommit:
    async def test_round_trip_with_versions_and_rank(self, store: RedisStore) -> None:
        """A committed set loads back equal, with its rank, at version 1, then 2."""
        assert await store.load("app1") is None
        assert (await store.commit("app1", token(1, "refresh-1-secret"))).version == 1
        loaded = await store.load("app1")
        assert loaded is not None
        assert (loaded.access_token, loaded.refresh_token, loaded.version, loaded.rank) == (
            token(1).access_token,
            "refresh-1-secret",
            1,
            (1, 1),
        )
        assert (await store.commit("app1", token(2))).version == 2

    async def test_a_dpop_bound_set_keeps_its_key_thumbprint(self, store: RedisStore) -> None:
        """The jkt of a DPoP-bound set is in the blob and loads back; a bearer set has none."""
        bound = dataclasses.replace(token(1, "refresh-1"), token_type="DPoP", dpop_jkt="jkt-1")
        await store.commit("app1", bound)
        loaded = await store.load("app1")
        assert loaded is not None and (loaded.token_type, loaded.dpop_jkt) == ("DPoP", "jkt-1")
        await store.commit("app1", token(2, "refresh-2"))
        loaded = await store.load("app1")
        assert loaded is not None and loaded.dpop_jkt is None

    async def test_keys_carry_the_app_hash_tag(
        self, store: RedisStore, redis_server: RedisServer
    ) -> None:
        """An app's keys share the {app} hash tag, so Redis Cluster keeps them on one slot."""
        await store.commit("app1", token(1, "refresh-1-secret"))
        lease = await store.acquire_lease("app1", "me", 5)
        await store.begin_spend(
            "app1", owner="me", fence=lease.fence, token=token(1, "refresh-1-secret")
        )
        raw = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
        keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await raw.keys("*"))
        await raw.aclose()
        assert keys == ["tb:{app1}:fence", "tb:{app1}:lease", "tb:{app1}:spend", "tb:{app1}:token"]


class TestEncryption:
    async def test_no_plain_token_in_redis(
        self, store: RedisStore, redis_server: RedisServer
    ) -> None:
        """The access and refresh tokens are not in Redis in plain text (nor in base64)."""
        await store.commit("app1", token(1, "refresh-token-secret-value"))
        raw = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
        fields = await raw.hgetall("tb:{app1}:token")
        await raw.aclose()
        blob = b"".join(bytes(k) + bytes(v) for k, v in fields.items())  # type: ignore[arg-type]
        for secret in (token(1).access_token, "refresh-token-secret-value"):
            assert secret.encode() not in blob
            assert base64.b64encode(secret.encode())[:16] not in blob

    async def test_rotated_key_reads_old_blobs(self, redis_server: RedisServer) -> None:
        """After adding a new key on top, blobs written under the old key still load."""
        old = make_store(redis_server, [KEY_A])
        await old.commit("app1", token(1))
        new = make_store(redis_server, [KEY_B, KEY_A])
        loaded = await new.load("app1")
        assert loaded is not None
        assert loaded.access_token == token(1).access_token
        await old.close()
        await new.close()

    async def test_unknown_key_is_unreadable_not_missing(self, redis_server: RedisServer) -> None:
        """A blob under a key this replica lacks raises UnreadableTokenSet with the stored rank."""
        writer = make_store(redis_server, [KEY_A])
        await writer.commit("app1", token(3))
        reader = make_store(redis_server, [KEY_B])
        with pytest.raises(UnreadableTokenSet) as caught:
            await reader.load("app1")
        assert caught.value.rank == (1, 3)
        await writer.close()
        await reader.close()


class TestLease:
    async def test_lease_expires(self, store: RedisStore) -> None:
        """A lease whose owner died expires at its deadline (Redis' own clock)."""
        await store.acquire_lease("app1", "a", 0.2)
        await asyncio.sleep(0.3)
        assert (await store.acquire_lease("app1", "b", 5)).held


class TestUpdates:
    async def test_other_replicas_hear_of_a_save(self, redis_server: RedisServer) -> None:
        """A save on one store is announced to another store's updates() iterator."""
        writer = make_store(redis_server, [KEY_A])
        listener = make_store(redis_server, [KEY_A])
        updates = cast(AsyncGenerator[Notice, None], listener.updates())
        first = asyncio.ensure_future(updates.__anext__())
        await asyncio.sleep(0.3)  # subscribed
        await writer.commit("app1", token(1))
        notice = await asyncio.wait_for(first, 5)
        assert (notice.app, notice.kind, notice.version, notice.rank) == (
            "app1",
            "token",
            1,
            (1, 1),
        )
        await updates.aclose()
        await writer.close()
        await listener.close()


class TestOutage:
    async def test_stopped_redis_raises_store_unavailable_quickly(
        self, redis_server: RedisServer
    ) -> None:
        """With Redis down, calls fail fast with StoreUnavailable and store_up is 0; then recover."""
        metrics = Metrics()
        store = make_store(redis_server, [KEY_A], metrics)
        await store.commit("app1", token(1))
        redis_server.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StoreUnavailable):
            await store.load("app1")
        assert loop.time() - started < 3
        assert metrics.store_up._value.get() == 0
        redis_server.start()
        await store.ping()
        assert metrics.store_up._value.get() == 1
        await store.close()


class TestAuthentication:
    async def test_password_and_acl_user(self, redis_server: RedisServer, tmp_path: Path) -> None:
        """AUTH with a password file, as the default user and as an ACL user named in the URL."""
        admin = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
        await admin.acl_setuser(
            "broker",
            enabled=True,
            passwords=["+broker-pw-0123456789"],
            keys=["*"],
            channels=["*"],
            commands=["+@all"],
        )
        await admin.config_set("requirepass", "default-pw-0123456789")
        await admin.aclose()
        (tmp_path / "store.key").write_text("k1 " + base64.b64encode(b"K" * 32).decode())
        cases = [
            (f"redis://127.0.0.1:{redis_server.port}/0", "default-pw-0123456789", True),
            (f"redis://broker@127.0.0.1:{redis_server.port}/0", "broker-pw-0123456789", True),
            (f"redis://broker@127.0.0.1:{redis_server.port}/0", "wrong-password-000000", False),
        ]
        for url, password, works in cases:
            (tmp_path / "password").write_text(password)
            spec = StoreSpec(
                url=url,
                key_prefix="tb",
                encryption_key_file=tmp_path / "store.key",
                password_file=tmp_path / "password",
            )
            store = open_store(spec, Metrics(), SystemClock())
            try:
                if works:
                    await store.ping()
                    assert (await store.commit("app1", token(5))).rank == (1, 5)
                else:
                    with pytest.raises(StoreUnavailable):
                        await store.ping()
            finally:
                await store.close()


class TestCancellation:
    async def test_a_cancelled_watcher_stops(self, redis_server: RedisServer) -> None:
        """Cancelling the core while it waits for pub/sub stops it (redis-py must not swallow it)."""
        store = make_store(redis_server, [KEY_A])
        core = BrokerCore({}, store, SystemClock(), Observer(Metrics()))
        for _ in range(20):
            task = asyncio.ensure_future(core.run())
            await asyncio.sleep(0.05 + random.random() * 0.3)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=3)
            assert done, "the store watcher ignored its cancellation"
        await store.close()


class TestEvictionPolicy:
    """Low (issue 20): Redis may only keep the fleet's keys under `maxmemory-policy noeviction`."""

    async def run_check(
        self, tmp_path: Path, *args: str
    ) -> tuple[str | None, list[MutableMapping[str, Any]]]:
        server = RedisServer(directory=tmp_path / "redis", extra_args=args)
        server.start()
        store = make_store(server, [KEY_A])
        try:
            with structlog.testing.capture_logs() as logs:
                policy = await store.check_eviction_policy()
        finally:
            await store.close()
            server.stop()
        return policy, [e for e in logs if str(e["event"]).startswith("store.eviction_policy")]

    async def test_an_evicting_policy_is_warned_about(self, tmp_path: Path) -> None:
        """With allkeys-lru, `store.eviction_policy` is logged at warning, naming both policies."""
        policy, logs = await self.run_check(tmp_path, "--maxmemory-policy", "allkeys-lru")
        assert policy == "allkeys-lru"
        assert [(e["event"], e["log_level"], e["policy"], e["expected"]) for e in logs] == [
            ("store.eviction_policy", "warning", "allkeys-lru", "noeviction")
        ]

    async def test_noeviction_says_nothing(self, tmp_path: Path) -> None:
        """Under noeviction (Redis's default) nothing is logged."""
        policy, logs = await self.run_check(tmp_path, "--maxmemory-policy", "noeviction")
        assert (policy, logs) == ("noeviction", [])

    async def test_a_disabled_config_command_is_logged_as_unchecked(self, tmp_path: Path) -> None:
        """A Redis with CONFIG renamed away (as managed services do) cannot be checked: said
        once at info level, and the broker carries on."""
        policy, logs = await self.run_check(tmp_path, "--rename-command", "CONFIG", '""')
        assert policy is None
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("store.eviction_policy_unchecked", "info")
        ]

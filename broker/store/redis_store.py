"""The Redis store: encrypted, versioned token sets, a refresh lease per app, change notifications.

Keys carry the app as a hash tag, so Redis Cluster keeps one app's keys on one slot:
`{prefix}:{<app>}:token` (a hash: `version`, `blob`) and `{prefix}:{<app>}:lease`. Writes are
compare-and-set in a Lua script that also publishes the app's name on `{prefix}:updates`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from broker.clock import Clock
from broker.errors import StoreUnavailable
from broker.logs import get_logger
from broker.metrics import Metrics
from broker.model import TokenSet
from broker.store.crypto import Keyring, UndecryptableToken
from broker.store.redis_pool import (
    MAX_COMMAND_CONNECTIONS,
    POOL_WAIT_TIMEOUT,
    WaitingPool,
    WaitingSentinelPool,
    bounded_cluster,
    default_client_name,
)

log = get_logger(__name__)

T = TypeVar("T")

# KEYS[1] token hash; ARGV: expected version, blob, channel, app
_CAS = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[1]) then return -1 end
local version = current + 1
redis.call('HSET', KEYS[1], 'version', version, 'blob', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return version
"""
# KEYS[1] lease; ARGV[1] owner, ARGV[2] ttl in ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS[1] lease; ARGV[1] owner
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """Implements TokenStore on Redis (standalone, TLS, Sentinel or Cluster clients alike)."""

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str,
        keyring: Keyring,
        metrics: Metrics,
        clock: Clock,
        pubsub_client: Any | None = None,
    ) -> None:
        self._client = client
        self._pubsub_client = pubsub_client if pubsub_client is not None else client
        self._prefix = key_prefix
        self._keyring = keyring
        self._metrics = metrics
        self._clock = clock
        self._cas = client.register_script(_CAS)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self.channel = f"{key_prefix}:updates"

    def token_key(self, app: str) -> str:
        """The Redis key of an app's token set."""
        return f"{self._prefix}:{{{app}}}:token"

    def lease_key(self, app: str) -> str:
        """The Redis key of an app's refresh lease."""
        return f"{self._prefix}:{{{app}}}:lease"

    def _aad(self, app: str) -> bytes:
        return f"{self._prefix}:{app}".encode()

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await call()
        except (RedisError, OSError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # redis-py can turn a cancellation into a timeout error; the cancellation wins,
                # or a cancelled loop would carry on as if the store were merely down.
                raise asyncio.CancelledError from exc
            self._metrics.store_errors.labels(operation=operation).inc()
            self._metrics.store_up.set(0)
            raise StoreUnavailable(f"redis {operation} failed: {type(exc).__name__}") from None
        self._metrics.store_up.set(1)
        return result

    async def load(self, app: str) -> TokenSet | None:
        """The stored token set, or None (nothing stored, or written under an unknown key)."""
        fields = await self._call("load", lambda: self._client.hgetall(self.token_key(app)))
        if not fields:
            return None
        try:
            version = int(fields[b"version"])
            plain = self._keyring.decrypt(fields[b"blob"], self._aad(app))
            data = json.loads(plain)
            return TokenSet(
                access_token=data["access_token"],
                token_type=data["token_type"],
                issued_at=float(data["issued_at"]),
                expires_at=float(data["expires_at"]),
                scope=data.get("scope"),
                refresh_token=data.get("refresh_token"),
                version=version,
            )
        except UndecryptableToken as exc:
            log.warning("store.undecryptable", app=app, reason=str(exc))
            return None
        except (KeyError, ValueError, TypeError):
            log.warning("store.unreadable", app=app)
            return None

    async def save(self, app: str, token: TokenSet, expected_version: int) -> int | None:
        """Compare-and-set on the version, then publish the app's name."""
        plain = json.dumps(
            {
                "access_token": token.access_token,
                "token_type": token.token_type,
                "issued_at": token.issued_at,
                "expires_at": token.expires_at,
                "scope": token.scope,
                "refresh_token": token.refresh_token,
            }
        ).encode()
        blob = self._keyring.encrypt(plain, self._aad(app))
        result = await self._call(
            "save",
            lambda: self._cas(
                keys=[self.token_key(app)], args=[expected_version, blob, self.channel, app]
            ),
        )
        version = int(result)
        return None if version < 0 else version

    async def acquire_lease(self, app: str, owner: str, ttl: float) -> bool:
        """SET NX PX: the lease is ours for `ttl` seconds unless another owner holds it."""
        ms = max(1, int(ttl * 1000))
        result = await self._call(
            "lease", lambda: self._client.set(self.lease_key(app), owner, nx=True, px=ms)
        )
        return bool(result)

    async def renew_lease(self, app: str, owner: str, ttl: float) -> bool:
        """PEXPIRE the lease, only if `owner` still holds it."""
        ms = max(1, int(ttl * 1000))
        result = await self._call(
            "lease", lambda: self._renew(keys=[self.lease_key(app)], args=[owner, ms])
        )
        return bool(result)

    async def release_lease(self, app: str, owner: str) -> None:
        """Delete the lease only if `owner` still holds it."""
        await self._call("lease", lambda: self._release(keys=[self.lease_key(app)], args=[owner]))

    async def updates(self) -> AsyncIterator[str]:
        """App names published by any replica's save; raises StoreUnavailable on disconnect."""
        pubsub = self._pubsub_client.pubsub()
        try:
            await self._call("subscribe", lambda: pubsub.subscribe(self.channel))
            while True:
                message = await self._call(
                    "subscribe",
                    lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0),
                )
                if message is None or message.get("type") != "message":
                    continue
                data = message.get("data")
                yield data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def ping(self) -> None:
        """PING, or StoreUnavailable."""
        await self._call("ping", self._client.ping)

    async def close(self) -> None:
        """Close the connection pools."""
        for client in {
            id(self._client): self._client,
            id(self._pubsub_client): self._pubsub_client,
        }.values():
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()


def redis_client(
    url: str,
    *,
    socket_timeout: float = 1.0,
    password: str | None = None,
    client_name: str | None = None,
) -> Any:
    """A redis-py asyncio client for redis://, rediss://, redis+sentinel:// or redis+cluster://.

    However many apps the broker serves, it opens at most MAX_COMMAND_CONNECTIONS connections
    for commands plus one for pub/sub (per node on a Cluster); a command that finds them all busy
    waits for one (up to POOL_WAIT_TIMEOUT) instead of failing as if the store were down.
    """
    scheme = url.partition("://")[0]
    name = client_name if client_name is not None else default_client_name()
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "health_check_interval": 15,
        "client_name": name,
    }
    if password is not None:
        common["password"] = password
    if scheme in ("redis", "rediss"):
        pool = WaitingPool.from_url(
            url,
            max_connections=MAX_COMMAND_CONNECTIONS + 1,  # + the pub/sub subscription
            timeout=POOL_WAIT_TIMEOUT,
            retry_on_timeout=False,
            **common,
        )
        return aioredis.Redis.from_pool(pool)
    if scheme == "redis+cluster":
        parsed = _multi_host_url(url)
        return bounded_cluster(
            parsed.hosts,
            username=parsed.username,
            password=password or parsed.password,
            ssl=parsed.tls,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            client_name=name,
        )
    if scheme == "redis+sentinel":
        parsed = _multi_host_url(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            parsed.hosts,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            username=parsed.username,
            password=password or parsed.password,
            ssl=parsed.tls,
            db=parsed.db,
        )
        if not parsed.service:
            raise ValueError("redis+sentinel:// needs the master's service name as the path")
        return sentinel.master_for(
            parsed.service,
            connection_pool_class=WaitingSentinelPool,
            max_connections=MAX_COMMAND_CONNECTIONS + 1,
            timeout=POOL_WAIT_TIMEOUT,
            client_name=name,
        )
    raise ValueError(f"unsupported store scheme {scheme}")


class _MultiHostURL:
    def __init__(self) -> None:
        self.hosts: list[tuple[str, int]] = []
        self.username: str | None = None
        self.password: str | None = None
        self.service = ""
        self.db = 0
        self.tls = False


def _multi_host_url(url: str) -> _MultiHostURL:
    """Parse `scheme://[user:pass@]h1:p1,h2:p2[/service[/db]][?tls=true]`."""
    from urllib.parse import parse_qs, unquote

    parsed = _MultiHostURL()
    rest = url.partition("://")[2]
    rest, _, query = rest.partition("?")
    parsed.tls = parse_qs(query).get("tls", ["false"])[0].lower() in ("1", "true", "yes")
    netloc, _, path = rest.partition("/")
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        parsed.username = unquote(user) or None
        parsed.password = unquote(password) or None
    for hostport in netloc.split(","):
        host, _, port = hostport.rpartition(":")
        parsed.hosts.append((host.strip("[]") or "127.0.0.1", int(port or 6379)))
    segments = [s for s in path.split("/") if s]
    if segments:
        parsed.service = segments[0]
    if len(segments) > 1:
        parsed.db = int(segments[1])
    return parsed

"""Bounded Redis connection pools that wait for a free connection instead of failing.

redis-py's default asyncio pool allows 100 connections and raises `MaxConnectionsError` when
they are all taken; a broker with a hundred apps loading at once then reads that as "the store
is down". Here every replica uses at most MAX_COMMAND_CONNECTIONS connections for commands plus
one for pub/sub, however many apps it serves, and a command that finds them busy waits:

- redis://, rediss://: redis-py's `BlockingConnectionPool`;
- redis+sentinel://: the same waiting behaviour on redis-py's Sentinel pool;
- redis+cluster://: redis-py's cluster client keeps a pool per node (`max_connections` per
  node) that raises `MaxConnectionsError` when exhausted and has no blocking variant, so the
  client itself admits at most MAX_COMMAND_CONNECTIONS commands or pipelines at a time (each
  holds at most one connection per node), and each node's pool is sized one above that for the
  pub/sub subscription: the per-node limit is then never reached.

A wait that outlasts POOL_WAIT_TIMEOUT raises PoolWaitTimeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import socket
from collections.abc import AsyncIterator
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

# Connections a replica uses for commands, whatever its number of apps; pub/sub holds one more.
MAX_COMMAND_CONNECTIONS = 4
# How long a command waits for a free connection. A healthy Redis frees one every few hundred
# microseconds (at 1000 apps a warm start queues about 0.3 s of work); only a Redis that stopped
# answering keeps a command waiting this long, since each command ahead of it then fails after
# socket_timeout (1 s), four at a time.
POOL_WAIT_TIMEOUT = 10.0
# TCP keepalive on every Redis connection (commands, pub/sub, sentinels, cluster nodes): an idle
# connection whose peer vanished (a host that died, a NAT or firewall that dropped the flow)
# fails after KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES = 30 s instead of never. On
# Linux TCP_USER_TIMEOUT bounds the same way a connection whose bytes are never acknowledged (a
# PING written into a dead path would otherwise be retransmitted for about 15 minutes). Neither
# sees a path where something still acknowledges and drops (a proxy that lost its upstream):
# the notice channel's heartbeat (broker/core.py) covers the subscription there.
KEEPALIVE_IDLE = 15
KEEPALIVE_INTERVAL = 5
KEEPALIVE_PROBES = 3
USER_TIMEOUT_MS = (KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES) * 1000


def keepalive_options() -> dict[int, int]:
    """redis-py's `socket_keepalive_options`: the settings above that this platform has."""
    wanted = [
        # macOS names the idle time TCP_KEEPALIVE
        (getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)),
        getattr(socket, "TCP_KEEPINTVL", None),
        getattr(socket, "TCP_KEEPCNT", None),
        getattr(socket, "TCP_USER_TIMEOUT", None),
    ]
    values = [KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES, USER_TIMEOUT_MS]
    return {option: value for option, value in zip(wanted, values, strict=True) if option}


class PoolWaitTimeout(RedisConnectionError):
    """No pooled connection came free within POOL_WAIT_TIMEOUT.

    A subclass of redis-py's ConnectionError, so code that treats any RedisError as "the store
    did not answer" still does; its type tells a long wait apart from a failed socket.
    """


def default_client_name() -> str:
    """The CLIENT SETNAME of this process's connections: `token-broker:<host>:<pid>`."""
    return f"token-broker:{socket.gethostname()}:{os.getpid()}"


class WaitingPool(aioredis.BlockingConnectionPool):
    """redis-py's blocking pool; the end of its wait raises PoolWaitTimeout."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        """A free connection, waiting up to `timeout` for one."""
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            # The pool's wait ends in ConnectionError("No connection available.") raised from
            # asyncio's TimeoutError; a failed connect is a ConnectionError without that cause.
            if type(exc) is RedisConnectionError and isinstance(exc.__cause__, TimeoutError):
                raise PoolWaitTimeout(f"no free Redis connection within {self.timeout} s") from exc
            raise


class WaitingSentinelPool(SentinelConnectionPool, WaitingPool):
    """The Sentinel pool (it asks the sentinels for the master) with the waiting behaviour."""


# True in a task (and the tasks it starts) that already holds one of the cluster's slots, so a
# command that redis-py issues from inside a pipeline does not wait for a second slot.
_HOLDING_SLOT: contextvars.ContextVar[bool] = contextvars.ContextVar("holding_slot", default=False)


class BoundedCluster(RedisCluster):
    """A RedisCluster that runs at most `max_in_flight` commands or pipelines at once."""

    def __init__(self, *, max_in_flight: int, wait_timeout: float, **kwargs: Any) -> None:
        # Per node: every in-flight command or pipeline holds at most one connection to it, and
        # the pub/sub subscription one more; so the node's limit is never what stops a command.
        kwargs["max_connections"] = max_in_flight + 1
        super().__init__(**kwargs)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._wait_timeout = wait_timeout

    async def initialize(self, *args: Any, **kwargs: Any) -> BoundedCluster:
        """RedisCluster.initialize, then close the seed nodes' idle connections.

        redis-py asks a startup node for the topology through that node's own pool, which is
        not the pool of the node it discovers at the same address; its connection would stay
        open beside the per-node limit (one more connection per seed, for good).
        """
        await super().initialize(*args, **kwargs)
        discovered = {id(node) for node in self.nodes_manager.nodes_cache.values()}
        seeds = [
            node for node in self.nodes_manager.startup_nodes.values() if id(node) not in discovered
        ]
        await asyncio.gather(*(_close_idle(node) for node in seeds), return_exceptions=True)
        return self

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the in-flight slots (waiting up to `wait_timeout` for it)."""
        if _HOLDING_SLOT.get():
            yield
            return
        try:
            async with asyncio.timeout(self._wait_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolWaitTimeout(
                f"no free Redis connection within {self._wait_timeout} s"
            ) from None
        token = _HOLDING_SLOT.set(True)
        try:
            yield
        finally:
            _HOLDING_SLOT.reset(token)
            self._slots.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """RedisCluster.execute_command inside a slot."""
        async with self.slot():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        """A cluster pipeline whose execute() runs inside a slot."""
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # redis-py raises its own error
        return _BoundedPipeline(self, transaction)  # type: ignore[abstract]


async def _close_idle(node: ClusterNode) -> None:
    """Close `node`'s idle connections (all of them on a redis-py without that method)."""
    close_free = getattr(node, "disconnect_free_connections", None)
    if close_free is not None:
        await close_free()
    else:
        await node.disconnect()


class _BoundedPipeline(ClusterPipeline):
    """ClusterPipeline.execute inside one of its client's slots."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        """Send the queued commands (one connection per node involved)."""
        async with cast(BoundedCluster, self.cluster_client).slot():
            return await super().execute(raise_on_error, allow_redirections)


def bounded_cluster(
    hosts: list[tuple[str, int]],
    *,
    max_in_flight: int = MAX_COMMAND_CONNECTIONS,
    wait_timeout: float = POOL_WAIT_TIMEOUT,
    **kwargs: Any,
) -> BoundedCluster:
    """A BoundedCluster over the startup nodes `hosts`; `kwargs` go to RedisCluster."""
    return BoundedCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in hosts],
        max_in_flight=max_in_flight,
        wait_timeout=wait_timeout,
        **kwargs,
    )

"""A Sentinel setup whose primary can be cut off from its replicas and Sentinel: a split brain.

The primary M is reached by its two replicas and by the Sentinel only through a TcpProxy, so
`partition()` (the proxy refuses) isolates M from them while a client that talks to M directly
keeps writing to it. The Sentinel (quorum 1) sees M down and promotes a replica; the other
replica follows the new primary, so the new primary has a replica to acknowledge its writes and
the old one has none. `heal()` lets the Sentinel reach M again, which it turns into a replica of
the new primary: what was written to M alone is gone.

Every wait here is async: the proxy runs on the test's event loop and must keep forwarding.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import redis.asyncio as aioredis

from tests.support.ports import free_port
from tests.support.redis_server import RedisServer, redis_server_binary
from tests.support.tcp_proxy import TcpProxy

SERVICE = "mymaster"


class SplitBrainSentinel:
    """M behind a proxy, replicas R1 and R2 of it, one Sentinel watching it as `mymaster`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.primary = RedisServer(directory=directory / "primary")
        self.replicas: list[RedisServer] = []
        self.proxy: TcpProxy | None = None
        self.sentinel_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker's redis+sentinel:// URL."""
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}"

    @property
    def direct_url(self) -> str:
        """A redis:// URL to M itself, past the proxy: a client on M's side of the partition."""
        return self.primary.url

    async def start(self) -> None:
        """Start M, the proxy, R1 and R2 (replicas of M through the proxy) and the Sentinel;
        wait until both replicas are online and the Sentinel names M (its proxy) as master.
        What started is stopped again when the whole does not come up."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        await asyncio.to_thread(self.primary.start)
        self.proxy = TcpProxy(self.primary.port)
        await self.proxy.start()
        for index in range(2):
            replica = RedisServer(
                directory=self.directory / f"replica-{index}",
                extra_args=("--replicaof", "127.0.0.1", str(self.proxy.port)),
            )
            self.replicas.append(replica)
            await asyncio.to_thread(replica.start)
        await self.wait_for_replicas(self.primary.port, 2)
        conf = self.directory / "sentinel.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {self.sentinel_port}",
                    "bind 127.0.0.1",
                    f"dir {self.directory}",
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.proxy.port} 1",
                    # Not 1 s: the proxy shares the test's event loop, and a stall of it under
                    # CI's load failed M over before the split (CI of 2026-12-07, 21:00: b0 met
                    # a read-only M, and no split brain was made).
                    f"sentinel down-after-milliseconds {SERVICE} 3000",
                    f"sentinel failover-timeout {SERVICE} 5000",
                    "",
                ]
            )
        )
        self._spawn_sentinel(conf)
        await self.wait_for_master(self.proxy.port)
        await self._wait_until_sentinel_knows_the_replicas(2)

    def _spawn_sentinel(self, conf: Path) -> None:
        with (self.directory / "sentinel.log").open("ab") as log:
            self.process = subprocess.Popen(
                [redis_server_binary(), str(conf), "--sentinel"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def _wait_until_sentinel_knows_the_replicas(
        self, count: int, timeout: float = 30.0
    ) -> None:
        """Until the Sentinel lists `count` replicas of M (it can promote only those it knows)."""
        client = aioredis.Redis(host="127.0.0.1", port=self.sentinel_port, socket_timeout=2)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                replicas = await client.sentinel_slaves(SERVICE)
                if len(replicas) >= count:
                    return
                await asyncio.sleep(0.1)
        finally:
            await client.aclose()
        raise AssertionError(f"the Sentinel knows fewer than {count} replicas of {SERVICE}")

    async def master_port(self) -> int | None:
        """The port the Sentinel names as master now (None: it does not answer)."""
        client = aioredis.Redis(host="127.0.0.1", port=self.sentinel_port, socket_timeout=2)
        try:
            host_port = await client.sentinel_get_master_addr_by_name(SERVICE)
        except (OSError, aioredis.RedisError):
            return None
        finally:
            await client.aclose()
        return int(host_port[1]) if isinstance(host_port, tuple) else None

    async def wait_for_master(self, port: int | None = None, timeout: float = 30.0) -> int:
        """Until the Sentinel names `port` (or, with None, anything but the proxy) as master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = await self.master_port()
            assert self.proxy is not None
            if current is not None and (
                current == port if port is not None else current != self.proxy.port
            ):
                return current
            await asyncio.sleep(0.1)
        raise AssertionError(f"the Sentinel did not name the expected master within {timeout}s")

    @staticmethod
    async def wait_for_replicas(port: int, count: int, timeout: float = 30.0) -> None:
        """Until the server on `port` has `count` replicas online."""
        client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                info = await client.info("replication")
                online = sum(
                    1
                    for key, value in info.items()
                    if key.startswith("slave") and isinstance(value, dict)
                    if value.get("state") == "online"
                )
                if online >= count:
                    return
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        raise AssertionError(f"redis on {port}: fewer than {count} replica(s) online")

    async def partition(self) -> int:
        """Cut M off from its replicas and the Sentinel; the port of the replica promoted."""
        assert self.proxy is not None
        # A failover before the cut makes no split brain: say so, rather than blame the broker.
        assert await self.master_port() == self.proxy.port, (
            "the Sentinel failed M over before the split (the rig, not the broker)"
        )
        self.proxy.refuse()
        promoted = await self.wait_for_master()
        # The other replica follows the new primary: it has a replica to acknowledge writes.
        await self.wait_for_replicas(promoted, 1)
        return promoted

    def heal(self) -> None:
        """M is reachable again (the Sentinel turns it into a replica of the new primary)."""
        assert self.proxy is not None
        self.proxy.heal()

    async def stop(self) -> None:
        """Kill the Sentinel and every server; stop the proxy."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 10)
        if self.proxy is not None:
            await self.proxy.stop()
        for server in [self.primary, *self.replicas]:
            await asyncio.to_thread(server.stop)

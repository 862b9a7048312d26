"""A loopback TCP proxy the test controls: forward, black-hole or refuse connections on demand.

Put between one broker and Redis, it makes a network partition of that broker alone:
`blackhole()` lets connections open but carries no byte either way (the client times out, as
behind a dropped route), `refuse()` resets every connection at once, `heal()` forwards again.
`half_open()` silences only the connections open at that moment, for good and without a reset,
while new ones forward: a NAT, firewall or load balancer that forgot its flows. A client learns
of it only when it waits for an answer (a command times out), never while it only listens (a
pub/sub subscription).
A connection that lost bytes is never resumed (its stream is broken): `heal()` resets it, and
the client reconnects, as after a real partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from dataclasses import dataclass, field


class Mode(enum.Enum):
    """What the proxy does with traffic."""

    FORWARD = "forward"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side, the server's side, and their pumps."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    stalled: bool = False
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        """Reset both sides and stop the pumps (but not the one calling)."""
        for writer in (self.client, self.server):
            if writer is not None:
                writer.transport.abort()
        current = asyncio.current_task()
        for pump in self.pumps:
            if pump is not current:
                pump.cancel()


class TcpProxy:
    """Listens on a free loopback port and forwards to `target_port` (see the module docstring)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.mode = Mode.FORWARD
        self.port = 0
        self.connections_seen = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    @property
    def url(self) -> str:
        """redis:// URL of the proxy (for a Redis target)."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Reset every connection and stop listening."""
        self._reset(self._links)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def blackhole(self) -> None:
        """From now on, no byte gets through on any connection, old or new."""
        self.mode = Mode.BLACKHOLE
        for link in self._links:
            link.stalled = True

    def half_open(self) -> None:
        """From now on, no byte gets through on any connection open now; new ones forward."""
        for link in self._links:
            link.stalled = True

    def refuse(self) -> None:
        """Reset every connection now, and every new one as it comes."""
        self.mode = Mode.REFUSE
        self._reset(self._links)

    def drop(self) -> None:
        """Reset every current connection (the mode stays)."""
        self._reset(self._links)

    def heal(self) -> None:
        """Forward again; connections that lost bytes are reset."""
        self.mode = Mode.FORWARD
        self._reset({link for link in self._links if link.stalled})

    def _reset(self, links: set[_Link]) -> None:
        for link in list(links):
            link.abort()
            self._links.discard(link)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_seen += 1
        link = _Link(client=writer, stalled=self.mode is Mode.BLACKHOLE)
        if self.mode is Mode.REFUSE:
            link.abort()
            return
        self._links.add(link)
        try:
            upstream_reader, link.server = await asyncio.open_connection(*self.target)
        except OSError:
            self._reset({link})
            return
        link.pumps = [
            asyncio.create_task(self._pump(reader, link.server, link)),
            asyncio.create_task(self._pump(upstream_reader, writer, link)),
        ]
        await asyncio.gather(*link.pumps, return_exceptions=True)
        self._reset({link})

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Copy bytes one way until either side closes; a stalled link swallows them."""
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if link.stalled:
                    continue
                writer.write(data)
                await writer.drain()
        link.abort()

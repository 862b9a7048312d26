"""The proxy listener's own HTTP/1.1 (broker/api/proxy_listener.py), byte for byte.

The decisions it shares with the API's proxy route (auth, paths, retries, errors) are proven
by tests/integration/test_proxy*.py on both data paths; here are the parts that are its own:
framing in both directions, pipelining, the parser's limits, the pool's stale connections and
a caller that goes away. The caller and the upstream are raw sockets on loopback, so every
byte is the test's; the token service is tests/support/fakes.py's fake.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.api import ApiDependencies, build_proxy_listener, serve_proxy
from broker.api.auth import ClientAuthenticator
from broker.api.proxy import Upstreams
from broker.api.proxy_listener import ProxyListener
from broker.metrics import Metrics
from broker.model import AppSpec, ClientSpec, ProxySpec
from tests.support.fake_clock import FakeClock
from tests.support.fakes import FakeTokenService
from tests.unit.test_proxy import KEY, TOKEN_A, TOKEN_B

AUTH = f"Authorization: Bearer {KEY}\r\n"
Handler = Callable[["Exchange"], Awaitable[None]]


@dataclass
class Exchange:
    """One upstream connection: its index, and the requests read from it."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[bytes] = field(default_factory=list)

    async def request(self) -> bytes | None:
        """The next request (head and Content-Length body), or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await self.reader.readexactly(length) if length else b""
        self.requests.append(head + body)
        return head + body

    async def answer(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()


def ok(body: bytes = b'{"ok": true}', extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class ScriptedUpstream:
    """A loopback upstream whose every connection runs the test's `handler`."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.handler: Handler = self.keep_answering
        self.server: asyncio.Server | None = None
        self.closed = asyncio.Event()

    async def keep_answering(self, exchange: Exchange) -> None:
        while await exchange.request() is not None:
            await exchange.answer(ok())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        exchange = Exchange(len(self.exchanges), reader, writer)
        self.exchanges.append(exchange)
        try:
            await self.handler(exchange)
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.closed.set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def requests(self) -> list[bytes]:
        return [r for e in self.exchanges for r in e.requests]


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    server = ScriptedUpstream()
    server.port = await server.start()  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        assert server.server is not None
        server.server.close()


@dataclass
class Proxy:
    """The listener under test and where it listens."""

    listener: ProxyListener
    port: int
    service: FakeTokenService
    metrics: Metrics
    clock: FakeClock


@pytest.fixture
async def proxy(
    upstream: ScriptedUpstream, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Proxy]:
    """The listener for app1 (ProxySpec fields overridden by an indirect parameter)."""
    (tmp_path / "key").write_text(KEY)
    authenticator = ClientAuthenticator(
        {"svc": ClientSpec("svc", ("app1",), key_files=(tmp_path / "key",))}
    )
    upstreams = Upstreams()
    spec = ProxySpec(
        upstream=f"http://127.0.0.1:{upstream.port}",  # type: ignore[attr-defined]
        allowed_networks=("127.0.0.0/8",),
        read_timeout=5.0,
        max_buffered_body=1024,
        **getattr(request, "param", {}),
    )
    upstreams.update({"app1": AppSpec("app1", "https://auth.example/token", proxy=spec)})
    service = FakeTokenService({"app1": TOKEN_A})
    metrics = Metrics()
    clock = FakeClock()
    listener = build_proxy_listener(
        ApiDependencies(service, authenticator, metrics, clock, upstreams)
    )
    server = await serve_proxy(listener, host="127.0.0.1", port=0)
    try:
        yield Proxy(listener, server.sockets[0].getsockname()[1], service, metrics, clock)
    finally:
        await listener.close(0.0)
        await upstreams.close(grace=0.0)


async def exchange(port: int, raw: bytes, *, until_close: bool = True) -> bytes:
    """Send `raw` to the listener; everything it answers until it closes (10 s at most)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10) if until_close else b""
    finally:
        writer.close()


def get(path: str = "/v1/items/1", extra: str = "", close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return (
        f"GET /v1/proxy/app1{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{AUTH}{extra}{connection}\r\n"
    ).encode()


def statuses(raw: bytes) -> list[int]:
    """The status of every answer in `raw` (bodies here never hold a status line)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def error_of(raw: bytes) -> str:
    error: str = json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]
    return error


class TestFraming:
    async def test_a_chunked_request_goes_upstream_whole_with_its_length(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """A small chunked body is read whole and sent with Content-Length (replayable)."""
        raw = (
            "POST /v1/proxy/app1/v1/items HTTP/1.1\r\nHost: 127.0.0.1\r\n" + AUTH + "Transfer-"
            "Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        ).encode()
        answer = await exchange(proxy.port, raw)
        assert statuses(answer) == [200]
        [sent] = upstream.requests()
        assert b"Content-Length: 11\r\n" in sent
        assert b"transfer-encoding" not in sent.lower()
        assert sent.endswith(b"\r\n\r\nhello world")
        assert f"Authorization: Bearer {TOKEN_A.access_token}".encode() in sent
        assert KEY.encode() not in sent

    async def test_a_chunked_answer_is_rechunked_and_a_close_delimited_one_too(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """An answer still coming when its head arrives streams back chunked."""

        async def handler(exchange: Exchange) -> None:
            await exchange.request()
            if exchange.index == 0:
                await exchange.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for part in (b"abc", b"defgh"):
                    await asyncio.sleep(0.05)
                    await exchange.answer(b"%x\r\n%s\r\n" % (len(part), part))
                await exchange.answer(b"0\r\n\r\n")
                await exchange.request()  # kept alive: the proxy may send another
            else:
                await exchange.answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-")
                await asyncio.sleep(0.05)
                await exchange.answer(b"the-end")

        upstream.handler = handler
        for expected in (b"abcdefgh", b"until-the-end"):
            answer = await exchange(proxy.port, get(close=True))
            head, body = answer.split(b"\r\n\r\n", 1)
            assert statuses(head) == [200]
            assert b"Transfer-Encoding: chunked" in head
            assert dechunk(body) == expected

    async def test_head_and_204_have_no_body_and_the_connection_is_reused(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """A HEAD answer's Content-Length passes, no body is read; the pooled connection then
        serves a GET correctly (a fresh parser: the HEAD's length is not read as a body)."""

        async def handler(exchange: Exchange) -> None:
            while (request := await exchange.request()) is not None:
                if request.startswith(b"HEAD"):
                    await exchange.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                elif b"/v1/empty" in request:
                    await exchange.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
                else:
                    await exchange.answer(ok(b"after"))

        upstream.handler = handler
        head = get().replace(b"GET ", b"HEAD ", 1)
        raw = head + get("/v1/empty") + get(close=True)
        answer = await exchange(proxy.port, raw)
        assert statuses(answer) == [200, 204, 200]
        assert b"Content-Length: 1000\r\n" in answer
        assert answer.endswith(b"\r\n\r\nafter")
        assert len(upstream.exchanges) == 1

    async def test_an_upgrade_is_not_forwarded_and_the_connection_closes(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """Upgrade is hop-by-hop: the request goes without it, then the caller's connection
        closes (what would follow is not HTTP)."""
        extra = "Connection: Upgrade\r\nUpgrade: websocket\r\n"
        answer = await exchange(proxy.port, get(extra=extra))
        assert statuses(answer) == [200]
        [sent] = upstream.requests()
        assert b"upgrade" not in sent.lower()


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += body[:size]
        body = body[size + 2 :]


class TestPipeliningAndLimits:
    async def test_pipelined_requests_are_answered_in_order(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """Three requests in one write: three answers, in the order asked."""

        async def handler(exchange: Exchange) -> None:
            while (request := await exchange.request()) is not None:
                path = request.split(b" ")[1]
                await asyncio.sleep(0.02 if path.endswith(b"/1") else 0)
                await exchange.answer(ok(path))

        upstream.handler = handler
        raw = get("/v1/items/1") + get("/v1/items/2") + get("/v1/items/3", close=True)
        answer = await exchange(proxy.port, raw)
        assert statuses(answer) == [200, 200, 200]
        order = [answer.index(b"/v1/items/%d" % i) for i in (1, 2, 3)]
        assert order == sorted(order)

    @pytest.mark.parametrize(
        ("extra", "status", "error"),
        [
            ("X-Big: " + "x" * 9000 + "\r\n", 431, "headers_too_large"),
            ("".join(f"X-H{i}: v\r\n" for i in range(130)), 431, "headers_too_large"),
        ],
    )
    async def test_oversized_headers_get_a_json_431_and_the_connection_closes(
        self, proxy: Proxy, upstream: ScriptedUpstream, extra: str, status: int, error: str
    ) -> None:
        """Past the limits the parser stops: JSON error, closed, nothing sent upstream."""
        answer = await exchange(proxy.port, get(extra=extra))
        assert statuses(answer) == [status]
        assert b"Content-Type: application/json" in answer
        assert b"Connection: close" in answer
        assert error_of(answer) == error
        assert upstream.requests() == []

    async def test_a_long_target_gets_414_and_garbage_400(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """A request target over 8190 bytes: 414; bytes that are not HTTP: 400; both JSON."""
        answer = await exchange(proxy.port, get("/v1/" + "a" * 9000))
        assert statuses(answer) == [414]
        assert error_of(answer) == "uri_too_long"
        answer = await exchange(proxy.port, b"NOT HTTP AT ALL\r\n\r\n")
        assert statuses(answer) == [400]
        assert error_of(answer) == "bad_request"
        assert upstream.requests() == []

    async def test_an_answer_after_a_broken_pipelined_request_keeps_its_order(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """A good request, then garbage: the good one is answered first, then the 400."""
        answer = await exchange(proxy.port, get() + b"\x00\x01garbage\r\n\r\n")
        assert statuses(answer) == [200, 400]

    async def test_a_caller_without_a_key_gets_the_teaching_401(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """The API's caller checks apply: 401 in JSON, nothing sent upstream."""
        raw = b"GET /v1/proxy/app1/v1/items/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        answer = await exchange(
            proxy.port, raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        )
        assert statuses(answer) == [401]
        assert b"WWW-Authenticate: Bearer" in answer
        assert "client key" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["message"]
        assert upstream.requests() == []

    @pytest.mark.parametrize("keep_alive", ["Connection", "Proxy-Connection"])
    async def test_an_http10_caller_kept_alive_is_told_so(
        self, proxy: Proxy, upstream: ScriptedUpstream, keep_alive: str
    ) -> None:
        """HTTP/1.0 is kept alive by `keep-alive` in Connection or in Proxy-Connection (as
        llhttp reads them): the answer says `Connection: keep-alive`, and the connection serves
        the next request; an HTTP/1.1 answer carries no Connection header."""
        first = (
            get()
            .replace(b"HTTP/1.1", b"HTTP/1.0")
            .replace(b"\r\n\r\n", f"\r\n{keep_alive}: keep-alive\r\n\r\n".encode())
        )
        second = get().replace(b"HTTP/1.1", b"HTTP/1.0")
        answer = await exchange(proxy.port, first + second)
        assert statuses(answer) == [200, 200]
        one, two = answer.split(b"HTTP/1.1 ")[1:]
        assert b"\r\nConnection: keep-alive\r\n" in one
        assert b"\r\nConnection: close\r\n" in two
        answer = await exchange(proxy.port, get() + get(close=True))
        one, two = answer.split(b"HTTP/1.1 ")[1:]
        assert b"connection:" not in one.lower()
        assert b"\r\nConnection: close\r\n" in two


class TestFastPath:
    async def test_a_new_token_is_sent_at_once_and_a_held_one_checked_every_second(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """The fast path sends the token it holds without the service's full check, until
        the core holds another token (sent from the next request on), or a second has passed
        on the injected clock (checked in full again)."""
        for _ in range(2):  # the target's first request goes the general path
            assert statuses(await exchange(proxy.port, get(close=True))) == [200]
        checks = proxy.service.full_checks
        for _ in range(3):
            assert statuses(await exchange(proxy.port, get(close=True))) == [200]
        assert proxy.service.full_checks == checks
        proxy.service.tokens["app1"] = TOKEN_B
        assert statuses(await exchange(proxy.port, get(close=True))) == [200]
        assert proxy.service.full_checks == checks + 1
        await proxy.clock.advance(1.1)
        for _ in range(2):
            assert statuses(await exchange(proxy.port, get(close=True))) == [200]
        assert proxy.service.full_checks == checks + 2
        sent = [r.split(b"Authorization: ")[1].split(b"\r\n")[0] for r in upstream.requests()]
        assert sent[:5] == [f"Bearer {TOKEN_A.access_token}".encode()] * 5
        assert sent[5:] == [f"Bearer {TOKEN_B.access_token}".encode()] * 3

    async def test_a_held_token_is_not_sent_past_its_serving_deadline(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """A token stops being sent at its serving deadline, held or not: fail closed."""
        proxy.service.clock = proxy.clock
        proxy.service.deadline = proxy.clock.monotonic() + 0.5
        for _ in range(3):
            assert statuses(await exchange(proxy.port, get(close=True))) == [200]
        await proxy.clock.advance(0.6)
        answer = await exchange(proxy.port, get(close=True))
        assert statuses(answer) == [503]
        assert len(upstream.requests()) == 3

    @pytest.mark.parametrize(
        "proxy", [{"max_concurrent": 1, "connect_timeout": 0.2}], indirect=True
    )
    async def test_a_full_upstream_answers_503_proxy_busy(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """Past max_concurrent requests in flight, a caller waits connect_timeout, then 503
        (the API route's answer, proven in tests/unit/test_proxy.py)."""
        release = asyncio.Event()

        async def handler(exchange: Exchange) -> None:
            while await exchange.request() is not None:
                await release.wait()
                await exchange.answer(ok())

        upstream.handler = handler
        first = asyncio.ensure_future(exchange(proxy.port, get(close=True)))
        while not upstream.requests():
            await asyncio.sleep(0.01)
        answer = await exchange(proxy.port, get(close=True))
        assert statuses(answer) == [503]
        assert error_of(answer) == "proxy_busy"
        assert b"\r\nRetry-After: 1\r\n" in answer
        release.set()
        assert statuses(await first) == [200]


class TestPool:
    async def test_a_pooled_connection_the_upstream_closed_is_retried_for_an_idempotent_request(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """The first connection answers once, then closes on the next request without an
        answer: a GET is sent again on a new connection and succeeds."""

        async def handler(exchange: Exchange) -> None:
            await exchange.request()
            await exchange.answer(ok(b"first"))
            if exchange.index == 0:
                await exchange.request()  # read, never answered: closed below
                return
            while await exchange.request() is not None:
                await exchange.answer(ok(b"again"))

        upstream.handler = handler
        assert statuses(await exchange(proxy.port, get(close=True))) == [200]
        answer = await exchange(proxy.port, get(close=True))
        assert statuses(answer) == [200]
        assert len(upstream.exchanges) == 2
        assert len(upstream.requests()) == 3  # first, the lost one, the retry

    async def test_a_post_on_a_closed_pooled_connection_is_not_sent_twice(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """A POST is not idempotent: the closed connection gives 502, nothing is re-sent."""

        async def handler(exchange: Exchange) -> None:
            await exchange.request()
            await exchange.answer(ok())
            await exchange.request()  # the POST, read and dropped

        upstream.handler = handler
        assert statuses(await exchange(proxy.port, get(close=True))) == [200]
        post = (
            "POST /v1/proxy/app1/v1/items HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + AUTH
            + "Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        ).encode()
        answer = await exchange(proxy.port, post)
        assert statuses(answer) == [502]
        assert error_of(answer) == "upstream_error"
        assert len(upstream.exchanges) == 1
        assert sum(r.startswith(b"POST") for r in upstream.requests()) == 1

    async def test_a_caller_that_leaves_mid_answer_closes_the_upstream_connection(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """Nobody reads the rest of a streamed answer: its upstream connection is closed,
        never pooled, and the next request gets a connection of its own."""
        ended = asyncio.Event()

        async def handler(exchange: Exchange) -> None:
            request = await exchange.request()
            if exchange.index == 0:
                await exchange.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                try:
                    for _ in range(500):
                        await exchange.answer(b"400\r\n" + b"x" * 1024 + b"\r\n")
                        await asyncio.sleep(0.02)
                    await exchange.reader.read()
                except ConnectionError:
                    ended.set()  # the proxy closed it (the writes above fail)
                return
            assert request is not None
            await exchange.answer(ok(b"fresh"))
            await exchange.request()

        upstream.handler = handler
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(get())
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(2048)
        writer.close()
        await asyncio.wait_for(ended.wait(), 10)
        answer = await exchange(proxy.port, get(close=True))
        assert answer.endswith(b"fresh")
        assert len(upstream.exchanges) == 2

    async def test_an_answer_cut_short_upstream_cuts_the_caller_connection(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """The status is already sent: a short body and a closed connection, never a
        well-formed end of a truncated body."""

        async def handler(exchange: Exchange) -> None:
            await exchange.request()
            await exchange.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            await asyncio.sleep(0.05)
            await exchange.answer(b"only-part")

        upstream.handler = handler
        answer = await exchange(proxy.port, get())
        head, body = answer.split(b"\r\n\r\n", 1)
        assert b"Content-Length: 100" in head
        assert body == b"only-part"


class TestIdleCallers:
    async def test_a_caller_connection_idle_for_75_s_is_closed(
        self, proxy: Proxy, upstream: ScriptedUpstream
    ) -> None:
        """A kept-alive caller connection that sends nothing is closed after 60-75 s on the
        injected clock; one that keeps sending stays open."""
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        for writer, reader in ((idle_writer, idle_reader), (busy_writer, busy_reader)):
            writer.write(get())
            assert statuses(await reader.readuntil(b"}")) == [200]
        for _ in range(5):
            busy_writer.write(get())
            await busy_reader.readuntil(b"}")
            await proxy.clock.advance(15)
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        busy_writer.write(get(close=True))
        assert statuses(await asyncio.wait_for(busy_reader.read(), 5)) == [200]
        idle_writer.close()
        busy_writer.close()

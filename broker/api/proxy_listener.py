"""The proxy listener (`server.proxy_listen`): the proxy's lean data path.

The API's proxy route (broker/api/proxy.py) runs on aiohttp's server and client, which cost
about six times what nginx spends on a proxied request (bench/proxy_bench.py). This listener
serves the same route, `/v1/proxy/{app}/...`, on raw asyncio protocols (uvloop's when the
broker runs on it) with llhttp's C HTTP/1.1 parser (httptools) on both sides: a request is
parsed once, its headers go upstream as one write, and an answer whose body has come whole goes
back as one write with its headers.

Every decision is the API proxy's own: caller authentication (`Callers.authorize`, the unix
socket's peer identity too), the origin checks, the method and path checks
(`Upstream.url_for`), which headers are dropped, the token (`Proxy.token`, failing closed),
DPoP headers, the upstream-401 purge and retry (`Proxy.successor`), the JSON errors, the egress
refusal and the metrics. What is this module's own is HTTP/1.1 itself:

- Callers: keep-alive, pipelining (requests answered one after another, in order), chunked
  request bodies, `Expect: 100-continue`, and JSON errors for what the parser refuses (400),
  a request target over 8190 bytes (414) and a header over 8190 bytes or more than 128 (431),
  after which the connection is closed. A body the handler did not read is skipped.
- Upstreams: one pool per upstream (`Upstream.lean_pool`), kept-alive connections reused
  newest first; every address passes the egress guard before `connect()`, and the connection
  goes to exactly that address (no DNS rebinding). A pooled connection that the upstream
  closed before answering is retried once on a new connection, for an idempotent method with
  a replayable body only. The connect timeout runs on the injected clock; the read timeout
  (`read_timeout`, between two reads) on the loop's timer, as aiohttp's does.
- Answers: status, reason and headers as sent (hop-by-hop ones dropped), HEAD, 1xx, 204 and
  304 without a body, a length-delimited body streamed as it comes, a chunked or
  close-delimited one re-framed as chunked (or close-delimited to an HTTP/1.0 caller). An
  answer cut short upstream closes the caller's connection (a short body is the only honest
  signal once the status is sent); a caller that goes away mid-answer closes the upstream
  connection instead of returning it to the pool.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from broker import egress, tracing
from broker.api.callers import APP_LABEL, CLIENT_LABEL, Callers
from broker.api.errors import ApiError, error_body
from broker.api.proxy import (
    MAX_HEADER_LINE,
    MAX_HEADERS,
    MAX_REMEMBERED_NAMES,
    MAX_REMEMBERED_TARGETS,
    PROXY_PREFIX,
    PROXY_ROUTE,
    REFUSED_METHODS,
    Proxy,
    Upstream,
    Upstreams,
    check_method,
    dropped_request_header,
    dropped_response_header,
    egress_refused,
    listed_in,
    too_large,
    wait_for_slot,
)
from broker.api.server import check_origin, is_loopback_host
from broker.clock import Clock, wait_within
from broker.logs import RateLimitedLog, audit, get_logger
from broker.metrics import Metrics, ProxyTally
from broker.model import TokenSet

log = get_logger(__name__)

# The metrics label of the route, as the API's proxy route counts it.
ROUTE_LABEL = "/v1/proxy/{app}/{path}"
ROUTE_OTHER = "other"
DENIED_LOG_INTERVAL = 60.0
# Longest request target accepted (aiohttp's limit on the API, too).
MAX_TARGET = MAX_HEADER_LINE
# Bytes of a request body buffered before reading from the caller pauses, and resumes.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# Methods whose request may be sent again after a pooled connection failed before answering
# (RFC 9110 §9.2.2): the upstream cannot have acted on it twice.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Idle connections kept per upstream (more are closed when they come back).
MAX_IDLE = 64
# A caller connection that sends nothing for more than KEEPALIVE_SWEEPS sweeps is closed.
SWEEP_INTERVAL = 15.0
KEEPALIVE_SWEEPS = 4
# The fast path checks an app's token in full at least this often (seconds, monotonic).
TOKEN_RECHECK = 1.0
# How often shutdown looks whether the answers in flight are done.
DRAIN_POLL = 0.05
_NO_BODY_STATUS = frozenset({204, 304})
# What a request header is to the listener: forwarded, dropped, or dropped and read (by
# lowercased name; every name read is one `dropped_request_header` drops).
_FORWARD, _DROPPED, _AUTHORIZATION, _HOST, _CONTENT_LENGTH = range(5)
_TRANSFER_ENCODING, _CONNECTION_FIELD, _RELAYED, _EXPECT, _KEEP_ALIVE_FIELD = range(5, 10)
_REQUEST_FIELDS = {
    "authorization": _AUTHORIZATION,
    "host": _HOST,
    "content-length": _CONTENT_LENGTH,
    "transfer-encoding": _TRANSFER_ENCODING,
    "connection": _CONNECTION_FIELD,
    "forwarded": _RELAYED,
    "x-forwarded-for": _RELAYED,
    "expect": _EXPECT,
    "proxy-connection": _KEEP_ALIVE_FIELD,
}
# A request body of up to this many bytes (with a length) is read whole before the request is
# answered, so that it may take the fast path; a larger one streams.
FAST_BODY = 64 * 1024
# A header's name and value together (its line less ": ").
_MAX_FIELD = MAX_HEADER_LINE - 2
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class _Refused(Exception):
    """The caller's request cannot be parsed or is over a limit: answered, then closed."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class UpstreamBroken(Exception):
    """The upstream connection failed; `answered` says whether any answer byte came."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


# ---- the caller's side -----------------------------------------------------------------------


class _Body:
    """A request body as it arrives from the caller, with flow control on the connection."""

    __slots__ = ("broken", "chunks", "connection", "discard", "done", "length", "size", "waiter")

    def __init__(self, connection: CallerConnection, length: int | None) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.done = False
        self.broken = False
        self.discard = False
        self.waiter: asyncio.Future[None] | None = None
        self.connection = connection
        self.length = length

    def feed(self, data: bytes) -> None:
        if self.discard:
            return
        self.chunks.append(data)
        self.size += len(data)
        if self.size > HIGH_WATER:
            self.connection.pause_reading()
        self._wake()

    def end(self) -> None:
        self.done = True
        self._wake()

    def fail(self) -> None:
        """The body cannot be read to its end (the caller's stream broke): reading raises."""
        self.broken = True
        self.end()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """The next chunk; b"" at the end. Raises ConnectionResetError if the caller left."""
        while not self.chunks:
            if self.broken or (self.connection.lost and not self.done):
                raise ConnectionResetError("the caller's body ended early")
            if self.done:
                return b""
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        chunk = self.chunks.popleft()
        self.size -= len(chunk)
        if self.size < LOW_WATER:
            self.connection.resume_reading()
        return chunk

    def whole(self) -> bytes:
        """What has arrived of the body, taken out (a done body: all of it)."""
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.size = 0
        return data

    def skip(self) -> None:
        """Drop what is buffered and what is still to come (the handler did not read it)."""
        self.discard = True
        self.chunks.clear()
        self.size = 0
        self.connection.resume_reading()


class _Request:
    """One parsed request head and its body.

    `headers` are as received (bytes); `forward` is what goes upstream of them, each forwarded
    header as its four parts (name, ": ", value, CRLF), ready to join.
    """

    __slots__ = (
        "authorization",
        "body",
        "chunked",
        "expect_continue",
        "forward",
        "headers",
        "host",
        "http11",
        "keep_alive",
        "labels",
        "listed",
        "method",
        "relayed",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        body: _Body,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.keep_alive = keep_alive
        self.http11 = True
        self.body = body
        self.expect_continue = False
        self.authorization: str | None = None
        self.host: str | None = None
        self.relayed = False
        # The lowercased names the Connection header lists (not forwarded either).
        self.listed: frozenset[bytes] = _NOTHING_LISTED
        self.chunked = False
        self.labels: dict[Any, Any] = {}
        self.forward: list[bytes] = []


_NOTHING_LISTED: frozenset[bytes] = frozenset()
# Per header name as sent (bytes): its kind (_FORWARD, _DROPPED, _AUTHORIZATION...). Callers
# send the same few names on every request; the names are their choice, so the table is
# bounded (emptied when full).
_request_kinds: dict[bytes, int] = {}


def _request_kind(name: bytes) -> int:
    kind = _request_kinds.get(name)
    if kind is not None:
        return kind
    lower = name.decode("latin-1").lower()
    kind = _REQUEST_FIELDS.get(lower)
    if kind is None:
        kind = _DROPPED if dropped_request_header(lower) else _FORWARD
    if len(_request_kinds) >= MAX_REMEMBERED_NAMES:
        _request_kinds.clear()
    _request_kinds[name] = kind
    return kind


@functools.lru_cache(maxsize=256)
def _listed_names(value: bytes) -> frozenset[bytes]:
    """The lowercased header names a request's Connection value lists (`listed_in`'s)."""
    return frozenset(name.encode("latin-1") for name in listed_in(value.decode("latin-1")))


class CallerConnection(asyncio.Protocol):
    """One caller's connection: parses requests and answers them one at a time, in order."""

    def __init__(self, listener: ProxyListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Request | ApiError] = deque()
        self.task: asyncio.Task[None] | None = None
        # A request is on the fast path (ProxyListener.try_fast): no task serves it.
        self.busy = False
        # Idle-connection sweeps since the caller last sent anything.
        self.quiet = 0
        self.lost = False
        self.closing = False  # no more requests are read (an error, an upgrade)
        self._paused = False
        self._writable: asyncio.Future[None] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._current: _Request | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.listener.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.listener.connections.discard(self)
        current = self._current
        if current is not None:
            current.body._wake()
        for item in self.queue:
            if isinstance(item, _Request):
                item.body._wake()
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.quiet = 0
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade (dropped: it is hop-by-hop) or a CONNECT (refused): the request is
            # answered, then the connection closes, since what follows is not HTTP to parse.
            self.closing = True
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.error)
            else:
                self._refuse(ApiError(400, "bad_request", "the request could not be parsed"))
        except httptools.HttpParserError:
            self._refuse(ApiError(400, "bad_request", "the request is not valid HTTP/1.1"))
        self.next()

    def eof_received(self) -> bool | None:
        # A caller that shut its side down has sent all its requests; answer them, then close.
        self.closing = True
        return not (self.task is None and not self.busy and not self.queue)

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self.lost:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()

    # -- httptools callbacks (no on_message_begin: on_headers_complete resets for the next)

    def on_url(self, url: bytes) -> None:
        url = self._url = self._url + url  # one piece, usually: b"" + url is url
        if len(url) > MAX_TARGET:
            raise _Refused(
                ApiError(414, "uri_too_long", f"request targets are limited to {MAX_TARGET} bytes")
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(name) + len(value) > _MAX_FIELD or len(headers) >= MAX_HEADERS:
            raise _Refused(
                ApiError(
                    431,
                    "headers_too_large",
                    f"a request may carry up to {MAX_HEADERS} headers of up to "
                    f"{MAX_HEADER_LINE} bytes each",
                )
            )
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        headers = self._headers
        method = parser.get_method()
        request = _Request(
            _METHODS.get(method) or method.decode("ascii"),
            self._url.decode("latin-1"),
            headers,
            parser.should_keep_alive(),
            _Body(self, None),
        )
        self._url = b""
        self._headers = []
        length: int | None = None
        listed = _NOTHING_LISTED
        forward = request.forward
        kinds = _request_kinds
        connection_field = False
        for name, value in headers:
            kind = kinds.get(name)
            if kind is None:
                kind = _request_kind(name)
            if kind == _FORWARD:
                forward += (name, b": ", value, _CRLF)
            elif kind == _DROPPED:
                continue
            elif kind == _KEEP_ALIVE_FIELD:
                connection_field = True
            elif kind == _AUTHORIZATION:
                request.authorization = value.decode("latin-1")
            elif kind == _HOST:
                request.host = value.decode("latin-1")
            elif kind == _CONTENT_LENGTH:
                length = int(value)  # the parser has checked it is one number
            elif kind == _TRANSFER_ENCODING:
                request.chunked = True
            elif kind == _CONNECTION_FIELD:
                connection_field = True
                listed = listed | _listed_names(value)
            elif kind == _RELAYED:
                request.relayed = True
            else:
                request.expect_continue = value.decode("latin-1").strip().lower() == "100-continue"
        if listed:
            request.listed = listed
            request.forward = [
                part
                for name, value in headers
                if _request_kind(name) == _FORWARD and name.lower() not in listed
                for part in (name, b": ", value, _CRLF)
            ]
        if connection_field or not request.keep_alive:
            # Kept alive without a Connection (or Proxy-Connection, which llhttp reads alike)
            # header, a request is HTTP/1.1: 1.0 is kept alive only by `keep-alive` there. The
            # version string is built only otherwise.
            request.http11 = parser.get_http_version() == "1.1"
        request.body.length = length
        if length == 0 or (length is None and not request.chunked):
            request.body.done = True
        self._current = request
        self.queue.append(request)

    def on_body(self, body: bytes) -> None:
        if self._current is not None:
            self._current.body.feed(body)

    def on_message_complete(self) -> None:
        current = self._current
        if current is not None:
            body = current.body
            body.done = True  # `body.end()`, inline: once per request
            if body.waiter is not None:
                body._wake()
            self._current = None

    # -- answering

    def _refuse(self, error: ApiError) -> None:
        """Answer `error` after the requests before it, then close: the stream is lost."""
        self.closing = True
        current = self._current
        if current is not None and not current.body.done:
            current.body.fail()  # its handler must not forward a body cut short
        self._current = None
        self.queue.append(error)

    def next(self) -> None:
        """Start answering the next request, if none is being answered."""
        if self.task is not None or self.busy or self.lost:
            return
        if not self.queue:
            if self.closing:
                self.close()
            return
        item = self.queue[0]
        if isinstance(item, _Request):
            body = item.body
            if body.done:
                if self.listener.try_fast(self, item):
                    return
            elif (
                body.length is not None
                and body.length <= FAST_BODY
                and not self.closing
                and not item.expect_continue  # it waits for our 100 Continue
            ):
                return  # a small body: wait for all of it (the fast path may take it)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        """Answer the request at the head of the queue on the general (async) path."""
        item = self.queue.popleft()
        keep_alive = False
        try:
            if isinstance(item, ApiError):
                self.listener.observe(ROUTE_OTHER, {}, item.status, 0.0)
                self.write_error(item, keep_alive=False)
            else:
                keep_alive = await self.listener.handle(self, item)
                if not item.body.done:
                    item.body.skip()
        finally:
            self.task = None
            self.answered(keep_alive)

    def answered(self, keep_alive: bool) -> None:
        """One request was answered: close, or go on with the next."""
        if not keep_alive:
            self.close()
        else:
            self.next()

    def close(self) -> None:
        """Close the caller's connection."""
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def write(self, data: bytes) -> None:
        """Send to the caller (nothing once it went away)."""
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the caller reads slower than the answer comes."""
        writable = self._writable
        if writable is not None and not writable.done():
            await writable

    def write_error(self, error: ApiError, *, keep_alive: bool) -> None:
        """The contract's JSON error answer."""
        body = error_body(error)
        lines = [
            f"HTTP/1.1 {error.status} {_REASONS.get(error.status, 'Error')}",
            "Content-Type: application/json; charset=utf-8",
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{name}: {value}" for name, value in error.headers.items())
        if not keep_alive:
            lines.append("Connection: close")
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


# ---- the upstream's side ---------------------------------------------------------------------


class UpstreamConnection(asyncio.Protocol):
    """One kept-alive connection to an upstream; parses one answer at a time."""

    def __init__(self, pool: LeanPool) -> None:
        self.pool = pool
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        # The answer's headers as relayed, each as its four parts (name, ": ", value, CRLF):
        # those passed back, and its Content-Length lines (kept for a streamed or HEAD answer).
        self.forward: list[bytes] = []
        self.lengths: list[bytes] = []
        # It has a Content-Length or a Transfer-Encoding (otherwise it ends with the connection).
        self.framed = False
        # Header names its Connection header lists beyond the hop-by-hop ones: not relayed.
        self.listed: frozenset[bytes] = _NOTHING_LISTED
        self.keep_alive = False
        self.until_close = False
        self.head_request = False
        self.answered = False
        self.headers_done = False
        self.complete = False
        self.error: UpstreamBroken | None = None
        self.timed_out = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._writable: asyncio.Future[None] | None = None
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # The fast path's request awaiting this answer (no task waits on the connection).
        self.fast: _Fast | None = None

    def begin(self, head_request: bool) -> None:
        """Ready for the answer to a request about to be sent."""
        if self.reused:
            self.parser = httptools.HttpResponseParser(self) if self.head_request else self.parser
        self.status = 0
        self._fresh_head()
        self.until_close = False
        self.head_request = head_request
        self.answered = False
        self.headers_done = False
        self.complete = False
        self.chunks.clear()
        self.buffered = 0
        loop = self.loop
        self._last_data = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self.pool.read_timeout, self._check_idle)

    def _check_idle(self) -> None:
        self._timer = None
        if self.complete or self.closed:
            return
        loop = self.loop
        left = self._last_data + self.pool.read_timeout - loop.time()
        if left > 0:
            self._timer = loop.call_later(left, self._check_idle)
            return
        self._fail(UpstreamBroken("read timeout", answered=True), timeout=True)
        self._notify()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.headers_done and not self.complete and self.until_close and exc is None:
            self.complete = True  # a close-delimited body ends with the connection
            self._wake()
        elif not self.complete:
            self._fail(UpstreamBroken("the upstream closed the connection", answered=self.answered))
        self._notify()
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def drain(self) -> None:
        """Wait while the upstream reads slower than the body comes."""
        writable = self._writable
        if writable is not None and not writable.done():
            await writable

    def data_received(self, data: bytes) -> None:
        self.answered = True
        self._last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            message = str(cause) if isinstance(cause, UpstreamBroken) else "bad answer"
            self._fail(UpstreamBroken(message, answered=True))
        except httptools.HttpParserError:
            self._fail(UpstreamBroken("the upstream's answer is not HTTP/1.1", answered=True))
        self._notify()

    def _notify(self) -> None:
        """Hand a fast-path request its answer (or failure) once it has come."""
        fast = self.fast
        if fast is not None and (self.headers_done or self.error is not None):
            self.fast = None
            fast.listener.fast_answered(fast, self)

    def eof_received(self) -> bool | None:
        return False

    # -- httptools callbacks

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        if len(name) + len(value) > _MAX_FIELD or len(headers) >= MAX_HEADERS:
            raise UpstreamBroken("the upstream's headers are over the limits", answered=True)
        headers.append((name, value))
        kind = _answer_kinds.get(name)
        if kind is None:
            kind = _answer_kind(name)
        if kind == _FORWARD:
            self.forward += (name, b": ", value, _CRLF)
        elif kind == _LENGTH:
            self.framed = True
            self.lengths += (name, b": ", value, _CRLF)
        elif kind == _FRAMING:
            self.framed = True
        elif kind == _CONNECTION_LIST:
            self.listed = self.listed | _listed_beyond_hop(value)

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (100 Continue, 103): the final one follows
        self.status = status
        self.keep_alive = parser.should_keep_alive()
        listed = self.listed
        if listed:
            # Names the Connection header lists are hop-by-hop too (rare: a second pass).
            kept = [(n, v) for n, v in self.headers if n.lower() not in listed]
            self.forward = [
                part
                for n, v in kept
                if _answer_kind(n) == _FORWARD
                for part in (n, b": ", v, _CRLF)
            ]
            self.lengths = [
                part for n, v in kept if _answer_kind(n) == _LENGTH for part in (n, b": ", v, _CRLF)
            ]
        no_body = self.head_request or status in _NO_BODY_STATUS
        self.until_close = not self.framed and not no_body
        self.headers_done = True
        if no_body:
            # llhttp would read a HEAD answer's Content-Length bytes as its body: the answer
            # ends here, and the next one gets a new parser (see `begin`).
            self.complete = True
        if self.waiter is not None:
            self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self.waiter is not None:
            self._wake()

    def on_message_complete(self) -> None:
        if not self.headers_done:
            self._fresh_head()  # the end of an interim answer
            return
        self.complete = True  # the read timer sees it and lapses (no cancel per answer)
        if self.waiter is not None:
            self._wake()

    def _fresh_head(self) -> None:
        self.reason = b""
        self.headers = []
        self.forward = []
        self.lengths = []
        self.framed = False
        self.listed = _NOTHING_LISTED

    # -- the answer, for the handler

    def _fail(self, error: UpstreamBroken, *, timeout: bool = False) -> None:
        if self.error is None:
            self.error = error
            self.timed_out = timeout
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def answer(self) -> None:
        """Wait for the answer's status and headers (UpstreamBroken / TimeoutError)."""
        while not self.headers_done:
            self._raise()
            await self._wait()

    def _raise(self) -> None:
        if self.error is not None:
            if self.timed_out:
                raise TimeoutError
            raise self.error

    async def read(self) -> bytes:
        """The next piece of the answer's body; b"" at its end."""
        while not self.chunks:
            if self.complete:
                return b""
            self._raise()
            await self._wait()
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self._paused and self.buffered < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def release(self) -> None:
        """Done with this answer: back to the pool when reusable, otherwise closed."""
        if self.complete and self.keep_alive and not self.closed and not self.until_close:
            self.reused = True
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        """Close the connection (it never goes back to the pool)."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()


class LeanPool:
    """The kept-alive connections to one upstream, with the egress guard on every connect."""

    def __init__(self, upstream: Upstream, clock: Clock) -> None:
        origin = upstream.origin
        self.upstream = upstream
        self.clock = clock
        self.host = origin.host or ""
        self.tls = origin.scheme == "https"
        self.port = origin.port or (443 if self.tls else 80)
        self.networks = egress.parse_networks(upstream.spec.allowed_networks)
        self.read_timeout = upstream.spec.read_timeout
        self.connect_timeout = upstream.spec.connect_timeout
        explicit = origin.explicit_port
        host = f"[{origin.raw_host}]" if ":" in (origin.raw_host or "") else origin.raw_host
        self.host_header = f"Host: {host}{'' if explicit is None else f':{explicit}'}\r\n"
        self.idle: list[UpstreamConnection] = []
        self.closed = False
        # Request target → the line and Host header sent upstream (url_for's cache, encoded).
        self.heads: dict[tuple[str, str], bytes] = {}
        # Requests in flight on this data path, at most `max_concurrent`, and those waiting.
        self.active = 0
        self.limit = upstream.spec.max_concurrent
        self.waiting: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        """Take a slot for a request if one is free."""
        if self.active < self.limit:
            self.active += 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a slot (cancel to give up)."""
        while not self.try_acquire():
            waiter = asyncio.get_running_loop().create_future()
            self.waiting.append(waiter)
            await waiter

    def release_slot(self) -> None:
        """A request is done with its slot: the longest waiter may go."""
        self.active -= 1
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def put(self, connection: UpstreamConnection) -> None:
        """An answered connection, ready for the next request."""
        if self.closed or len(self.idle) >= MAX_IDLE:
            connection.close()
        else:
            self.idle.append(connection)

    def take(self) -> UpstreamConnection | None:
        """The newest idle connection still open, or None."""
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection (raises EgressRefused, OSError, ssl.SSLError or TimeoutError)."""
        work = asyncio.ensure_future(self._connect())
        await wait_within(self.clock, work, self.connect_timeout, cancel_late=True)
        if work.cancelled():
            raise TimeoutError
        return work.result()

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        refused: egress.EgressRefused | None = None
        failed: OSError | None = None
        for family, kind, proto, _, address in infos:
            reason = egress.refusal(str(address[0]), self.networks)
            if reason is not None:
                refused = egress.EgressRefused(str(address[0]), reason)
                continue
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                # Connected to exactly the address that was checked: nothing resolves again.
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                failed = exc
                continue
            try:
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    sock=sock,
                    ssl=self.upstream.ssl_context if self.tls else None,
                    server_hostname=self.host if self.tls else None,
                )
            except BaseException:
                sock.close()
                raise
            return connection
        if failed is not None:
            raise failed
        if refused is not None:
            raise refused
        raise OSError(f"{self.host} has no address")

    def close(self) -> None:
        """Close every idle connection, and each one in use when it comes back (a reload
        retired the pool, or the broker stops)."""
        self.closed = True
        for connection in self.idle:
            connection.close()
        self.idle.clear()


# ---- the listener ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Sent:
    """A request body as sent upstream: whole (replayable) or a stream of the caller's."""

    data: bytes | None
    length: int | None
    replayable: bool
    stream: _Body | None = None


class ProxyListener:
    """Serves `/v1/proxy/...` on its own listener, with the API proxy's decisions."""

    def __init__(
        self,
        proxy: Proxy,
        upstreams: Upstreams,
        callers: Callers,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.proxy = proxy
        self.upstreams = upstreams
        self.callers = callers
        self.clock = clock
        self._requests = metrics.requests
        self._metrics = metrics
        self._denied = RateLimitedLog(DENIED_LOG_INTERVAL)
        self.connections: set[CallerConnection] = set()
        self.server: asyncio.Server | None = None
        self.sweeper: asyncio.Task[None] | None = None
        # Traces are set up before the listener is built; with them on, every request takes
        # the general path (its spans).
        self._tracing = tracing.enabled()
        # Per request target: the app it names (`_app_of`; bounded, forgotten all at once).
        self._apps: dict[str, str] = {}
        # Per app: its token as the fast path sends it (see `_held_token`).
        self._held: dict[str, tuple[TokenSet, bytes, float]] = {}
        # Per (app, client, status): the fast path's metrics (apps and clients are configured
        # names, statuses three digits: bounded).
        self._tallies: dict[tuple[str, str, int], ProxyTally] = {}

    def protocol(self) -> CallerConnection:
        """A protocol for one accepted connection (`loop.create_server`'s factory)."""
        return CallerConnection(self)

    async def close(self, grace: float) -> None:
        """Stop accepting, let in-flight answers finish for up to `grace` s (on the injected
        clock), then close every connection."""
        if self.server is not None:
            self.server.close()
        if self.sweeper is not None:
            self.sweeper.cancel()
        waited = 0.0
        while waited < grace and any(c.task is not None or c.busy for c in self.connections):
            await self.clock.sleep(DRAIN_POLL)
            waited += DRAIN_POLL
        for connection in list(self.connections):
            connection.close()

    async def sweep(self) -> None:
        """Close the caller connections that sent nothing for KEEPALIVE_SWEEPS sweeps (60 to
        75 s, as aiohttp's keep-alive timeout): a caller cannot hold connections forever."""
        while True:
            await self.clock.sleep(SWEEP_INTERVAL)
            for connection in list(self.connections):
                if connection.task is not None or connection.busy or connection.queue:
                    continue
                connection.quiet += 1
                if connection.quiet > KEEPALIVE_SWEEPS:
                    connection.close()

    def observe(self, route: str, labels: dict[Any, Any], status: int, seconds: float) -> None:
        """Count a request as the API counts its own."""
        self._requests.observe(
            route, labels.get(APP_LABEL, ""), labels.get(CLIENT_LABEL, ""), status, seconds
        )

    async def handle(self, connection: CallerConnection, request: _Request) -> bool:
        """Answer one request; True when the connection may serve another."""
        started = time.perf_counter()
        keep_alive = request.keep_alive and not (connection.closing and not connection.queue)
        route = ROUTE_OTHER
        try:
            check_origin(relayed=request.relayed, host=request.host)
            app = _app_of(request.target)
            route = ROUTE_LABEL
            check_method(request.method)
            _, app = self.callers.authorize(
                request.authorization, connection.transport, app, request.labels
            )
            status, keep_alive = await self._forward(connection, request, app, keep_alive)
        except ApiError as exc:
            status = exc.status
            if status in (401, 403):
                self._log_denied(connection, request, exc.code)
            if not request.body.done and not request.body.discard:
                keep_alive = keep_alive and request.body.size < HIGH_WATER
            connection.write_error(exc, keep_alive=keep_alive)
        except Exception:
            log.exception("api.internal_error", route=route)
            status = 500
            keep_alive = False
            connection.write_error(ApiError(500, "internal", "internal error"), keep_alive=False)
        self.observe(route, request.labels, status, time.perf_counter() - started)
        return keep_alive

    def _log_denied(self, connection: CallerConnection, request: _Request, reason: str) -> None:
        peer = self.callers.peer(connection.transport)
        remote = None
        if peer is None and connection.transport is not None:
            address = connection.transport.get_extra_info("peername")
            remote = address[0] if isinstance(address, tuple) else None
        client = request.labels.get(CLIENT_LABEL)
        who = client or (f"uid:{peer[0]}" if peer is not None else remote) or "unknown"
        if self._denied.allow((who, reason), self.clock.monotonic()):
            peer_fields: dict[str, Any] = (
                {"peer_uid": peer[0], "peer_gid": peer[1]} if peer is not None else {}
            )
            audit(
                log,
                "client.denied",
                client=client or None,
                remote=remote,
                reason=reason,
                app=request.labels.get(APP_LABEL) or None,
                **peer_fields,
            )

    async def _forward(
        self, connection: CallerConnection, request: _Request, app: str, keep_alive: bool
    ) -> tuple[int, bool]:
        """`Proxy.forward` on this data path: (status sent, keep the connection alive)."""
        upstream = self.upstreams.select(app, request.target)
        proxy = self.proxy
        started = time.perf_counter()
        status = 500
        upstream.enter()
        remote_parent = (
            CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers)
            if tracing.enabled()
            else None
        )
        with tracing.span(
            "token_broker.proxy",
            kind="server",
            remote_parent=remote_parent,
            app=app,
            semantic={"http.request.method": request.method, "http.route": PROXY_ROUTE},
        ) as span:
            try:
                status, keep_alive = await self._forward_to(
                    connection, request, app, upstream, keep_alive
                )
            except ApiError as exc:
                status = exc.status
                span.fail(exc.code)
                raise
            finally:
                span.set("http.response.status_code", status)
                upstream.leave()
                proxy.count(app, status, time.perf_counter() - started)
        return status, keep_alive

    async def _forward_to(
        self,
        connection: CallerConnection,
        request: _Request,
        app: str,
        upstream: Upstream,
        keep_alive: bool,
    ) -> tuple[int, bool]:
        spec = upstream.spec
        pool = upstream.lean_pool
        if pool is None:
            pool = upstream.lean_pool = LeanPool(upstream, self.clock)
        head = pool.heads.get((request.method, request.target))
        if head is None:
            url = upstream.url_for(request.target, app)  # the path checks: 400 / 403
            if len(pool.heads) >= 4096:
                pool.heads.clear()
            head = pool.heads[(request.method, request.target)] = (
                f"{request.method} {url.raw_path_qs} HTTP/1.1\r\n{pool.host_header}"
            ).encode("latin-1")
        token = await self.proxy.token(app)
        body = await self._read_body(connection, request, spec)
        if not pool.try_acquire():  # only a full upstream pays for a timer
            await wait_for_slot(spec, pool.acquire)
        try:
            answer = await self._send(pool, request, head=head, token=token, body=body, app=app)
            dpop = self.proxy.dpop
            if app in dpop and body.replayable:
                url = upstream.url_for(request.target, app)
                if self.proxy.dpop_challenge(app, url, answer.status, _multidict(answer)):
                    self._metrics.dpop_nonce_retries.labels(app=app, server="resource_server").inc()
                    answer.close()
                    answer = await self._send(
                        pool, request, head=head, token=token, body=body, app=app
                    )
            if spec.retry_on_401 and answer.status in spec.refresh_on_status:
                try:
                    fresh = await self.proxy.successor(app, token, replayable=body.replayable)
                except ApiError:
                    answer.close()
                    raise
                if fresh is not None:
                    answer.close()
                    answer = await self._send(
                        pool, request, head=head, token=fresh, body=body, app=app
                    )
            return await self._relay(connection, request, answer, keep_alive)
        finally:
            pool.release_slot()

    async def _read_body(self, connection: CallerConnection, request: _Request, spec: Any) -> _Sent:
        """Buffer a body up to `max_buffered_body` (replayable); stream a larger one."""
        body = request.body
        if body.done and not body.broken and body.size <= spec.max_buffered_body:
            return _whole_body(request)
        length = body.length
        if length is not None and length > spec.max_request_body:
            raise too_large(spec)
        if request.expect_continue and request.http11:
            connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        limit = spec.max_buffered_body
        if length is not None and length > limit:
            return _Sent(None, length, replayable=False, stream=body)
        chunks: list[bytes] = []
        size = 0
        try:
            while size <= limit:
                chunk = await body.read()
                if not chunk:
                    data = b"".join(chunks)
                    return _Sent(data, len(data), replayable=True)
                chunks.append(chunk)
                size += len(chunk)
        except ConnectionResetError:
            raise ApiError(400, "bad_request", "the request body ended early") from None
        # Over the buffered limit without a length: what was read goes first, then the rest.
        body.chunks.extendleft(reversed(chunks))
        body.size += size
        return _Sent(None, None, replayable=False, stream=body)

    async def _send(
        self,
        pool: LeanPool,
        request: _Request,
        *,
        head: bytes,
        token: TokenSet,
        body: _Sent,
        app: str,
    ) -> UpstreamConnection:
        """One request upstream; errors before an answer become 502 / 504 / 413 / 403."""
        extra = _extra_headers(self.proxy, pool, request, app, token)
        message = _request_message(head, request, _bearer(token), body, extra)
        with tracing.span(
            "token_broker.upstream",
            kind="client",
            semantic={"http.request.method": request.method, "server.address": pool.host},
        ) as span:
            for attempt in (1, 2):
                connection = pool.take()
                try:
                    if connection is None:
                        connection = await pool.connect()
                    connection.begin(request.method == "HEAD")
                    assert connection.transport is not None
                    connection.transport.write(message)
                    if body.stream is not None:
                        await self._stream_body(connection, body, pool)
                    await connection.answer()
                except egress.EgressRefused as refused:
                    raise egress_refused(self._metrics, pool.upstream, refused) from None
                except UpstreamBroken as exc:
                    if connection is not None:
                        connection.close()
                    stale = connection is not None and connection.reused and not exc.answered
                    if stale and attempt == 1 and body.replayable and request.method in IDEMPOTENT:
                        continue  # the upstream closed a pooled connection: a fresh one
                    raise ApiError(
                        502, "upstream_error", "the upstream could not be reached"
                    ) from None
                except TimeoutError:
                    if connection is not None:
                        connection.close()
                    raise ApiError(
                        504, "upstream_timeout", "the upstream did not answer in time"
                    ) from None
                except _TooLarge:
                    if connection is not None:
                        connection.close()
                    raise too_large(pool.upstream.spec) from None
                except ConnectionResetError:
                    if connection is not None:
                        connection.close()
                    raise ApiError(400, "bad_request", "the request body ended early") from None
                except OSError as exc:
                    if connection is not None:
                        connection.close()
                    if _is_tls_error(exc):
                        raise ApiError(
                            502,
                            "upstream_error",
                            "TLS with the upstream failed (is its certificate trusted?)",
                        ) from None
                    raise ApiError(
                        502, "upstream_error", "the upstream could not be reached"
                    ) from None
                span.set("http.response.status_code", connection.status)
                return connection
        raise AssertionError("unreachable")  # pragma: no cover

    async def _stream_body(
        self, connection: UpstreamConnection, body: _Sent, pool: LeanPool
    ) -> None:
        """Send a streamed body as it comes: as is with a length, chunked without."""
        stream = body.stream
        assert stream is not None
        assert connection.transport is not None
        limit = pool.upstream.spec.max_request_body
        size = 0
        chunked = body.length is None
        while True:
            chunk = await stream.read()
            if connection.error is not None:
                return  # the answer came early, or the connection failed: `answer` tells
            if not chunk:
                if chunked:
                    connection.transport.write(_LAST_CHUNK)
                return
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            if chunked:
                connection.transport.write(b"%x\r\n" % len(chunk) + chunk + _CRLF)
            else:
                connection.transport.write(chunk)
            await connection.drain()

    async def _relay(
        self,
        caller: CallerConnection,
        request: _Request,
        answer: UpstreamConnection,
        keep_alive: bool,
    ) -> tuple[int, bool]:
        """The upstream's answer back to the caller: (status, keep the connection alive)."""
        status = answer.status
        if answer.complete or request.method == "HEAD" or status in _NO_BODY_STATUS:
            return status, _relay_whole(caller, request, answer, keep_alive)
        lines, length_given = _answer_head(answer)
        try:
            chunked = not length_given and request.http11
            if not length_given and not request.http11:
                keep_alive = False  # close-delimited to an HTTP/1.0 caller
            if chunked:
                lines.append(b"Transfer-Encoding: chunked\r\n")
            _finish_head(lines, keep_alive, request)
            caller.write(b"".join(lines))
            while True:
                if caller.lost:
                    answer.close()  # nobody reads it: the connection must not be reused
                    return status, False
                try:
                    chunk = await answer.read()
                except (UpstreamBroken, TimeoutError):
                    answer.close()
                    caller.close()  # a short body: the only honest signal left
                    return status, False
                if not chunk:
                    break
                caller.write(b"%x\r\n" % len(chunk) + chunk + _CRLF if chunked else chunk)
                await caller.drain()
            if chunked:
                caller.write(_LAST_CHUNK)
        except BaseException:
            answer.close()
            raise
        answer.release()
        return status, keep_alive

    # ---- the fast path: no task, no future, for the common request -------------------------

    def try_fast(self, caller: CallerConnection, request: _Request) -> bool:
        """Send `request` upstream at once, from the protocol's callback, when nothing needs
        waiting for: an authorized caller, a checked target seen before, a cached token, a
        whole body, a free slot and an idle pooled connection. The answer is then relayed
        from the upstream protocol's callback (`fast_answered`). False: the general path
        answers it (and raises every error there)."""
        if self._tracing or request.relayed or not is_loopback_host(request.host):
            return False
        target = request.target
        app = self._apps.get(target)
        try:
            if app is None:
                app = self._app_of(target)
            if request.method in REFUSED_METHODS:
                return False
            self.callers.authorize(request.authorization, caller.transport, app, request.labels)
            upstream = self.upstreams.select(app, target)
        except ApiError:
            return False
        pool = upstream.lean_pool
        if pool is None or not pool.idle or pool.active >= pool.limit or app in self.proxy.dpop:
            return False
        head = pool.heads.get((request.method, target))
        if head is None:
            return False
        held = self._held.get(app)
        if (
            held is None
            or self.clock.monotonic() >= held[2]
            or self.proxy.service.current_token(app) is not held[0]
        ):
            held = self._held_token(app)
            if held is None:
                return False
        body = request.body
        if body.size > upstream.spec.max_buffered_body or body.broken:
            return False
        connection = pool.take()
        if connection is None:
            return False
        pool.active += 1  # the slot checked free above
        caller.queue.popleft()
        caller.busy = True
        sent = _NO_BODY if body.length is None and not request.chunked else _whole_body(request)
        token, authorization, _ = held
        started = time.perf_counter()
        assert connection.transport is not None
        connection.transport.write(_request_message(head, request, authorization, sent, ()))
        # The rest waits for no answer: done after the write, off the caller's latency (the
        # answer is read on a later turn of the loop).
        upstream.enter()
        connection.begin(request.method == "HEAD")
        connection.fast = _Fast(
            self, caller, request, app, upstream, pool, head, token, sent, started
        )
        return True

    def _app_of(self, target: str) -> str:
        """`_app_of(target)`, remembered per target (bounded: forgotten all at once)."""
        app = _app_of(target)
        if len(self._apps) >= MAX_REMEMBERED_TARGETS:
            self._apps.clear()
        self._apps[target] = app
        return app

    def _held_token(self, app: str) -> tuple[TokenSet, bytes, float] | None:
        """The app's servable token (`cached_token`, the full check), its Authorization line,
        and the monotonic time until which the fast path uses both without the full check
        (see `try_fast`): the token route's rule (broker/api/answers.py). The core must still
        hold that very token (a refused one is replaced at once), and the full check runs
        again at the token's serving deadline, and at least once a second (a step of a wall
        clock is seen there, within the second)."""
        service = self.proxy.service
        token = service.cached_token(app)
        if token is None:
            return None
        until = float("-inf")
        if service.current_token(app) is token:
            until = min(service.servable_until(app), self.clock.monotonic() + TOKEN_RECHECK)
        held = self._held[app] = (token, _bearer(token), until)
        return held

    def fast_answered(self, fast: _Fast, answer: UpstreamConnection) -> None:
        """The fast path's answer has begun (or failed): relay it, or hand over to a task."""
        caller, request = fast.caller, fast.request
        if answer.complete and answer.error is None:
            spec = fast.upstream.spec
            if not (spec.retry_on_401 and answer.status in spec.refresh_on_status):
                keep_alive = request.keep_alive and not (caller.closing and not caller.queue)
                keep_alive = _relay_whole(caller, request, answer, keep_alive)
                self._fast_done(fast, answer.status)
                caller.busy = False
                caller.answered(keep_alive)
                return
        if answer.error is not None:
            answer.close()
            if answer.reused and not answer.answered and request.method in IDEMPOTENT:
                # A pooled connection the upstream had closed: the general path starts over
                # with another connection (the request never reached the upstream).
                self._fast_done(fast, None)
                if request.body.length is not None or request.chunked:
                    request.body.chunks.append(fast.body.data or b"")
                caller.queue.appendleft(request)
                caller.busy = False
                caller.task = asyncio.get_running_loop().create_task(caller._serve())
                return
            error = (
                ApiError(504, "upstream_timeout", "the upstream did not answer in time")
                if answer.timed_out
                else ApiError(502, "upstream_error", "the upstream could not be reached")
            )
            caller.write_error(error, keep_alive=fast.keep_alive)
            self._fast_done(fast, error.status)
            caller.busy = False
            caller.answered(fast.keep_alive)
            return
        # An answer still to come whole, or a refused token's purge and retry.
        caller.task = asyncio.get_running_loop().create_task(self._fast_continue(fast, answer))

    async def _fast_continue(self, fast: _Fast, answer: UpstreamConnection) -> None:
        """A fast-path request whose answer needs waiting for: a refused token's purge and
        retry, or a body still to come."""
        caller, request, app = fast.caller, fast.request, fast.app
        spec = fast.upstream.spec
        status, keep_alive = 500, False
        try:
            try:
                if spec.retry_on_401 and answer.status in spec.refresh_on_status:
                    try:
                        fresh = await self.proxy.successor(app, fast.token, replayable=True)
                    except ApiError:
                        answer.close()
                        raise
                    if fresh is not None:
                        answer.close()
                        answer = await self._send(
                            fast.pool, request, head=fast.head, token=fresh, body=fast.body, app=app
                        )
                status, keep_alive = await self._relay(caller, request, answer, fast.keep_alive)
            except ApiError as exc:
                status, keep_alive = exc.status, fast.keep_alive
                caller.write_error(exc, keep_alive=keep_alive)
        except Exception:
            log.exception("api.internal_error", route=ROUTE_LABEL)
            caller.write_error(ApiError(500, "internal", "internal error"), keep_alive=False)
        finally:
            self._fast_done(fast, status)
            caller.task = None
            caller.busy = False
        caller.answered(keep_alive)

    def _fast_done(self, fast: _Fast, status: int | None) -> None:
        """A fast-path request's slot and counts (none when it goes to the general path)."""
        fast.pool.release_slot()
        fast.upstream.leave()
        if status is not None:
            seconds = time.perf_counter() - fast.started
            app, client = fast.app, fast.request.labels.get(CLIENT_LABEL, "")
            tally = self._tallies.get((app, client, status))
            if tally is None:
                tally = self._tallies[(app, client, status)] = ProxyTally(
                    self._metrics, ROUTE_LABEL, app, client, status
                )
            tally.add(seconds)  # what Proxy.count and `observe` count, in one call


@dataclass(slots=True)
class _Fast:
    """A request on the fast path, while its answer is awaited."""

    listener: ProxyListener
    caller: CallerConnection
    request: _Request
    app: str
    upstream: Upstream
    pool: LeanPool
    head: bytes
    token: TokenSet
    body: _Sent
    started: float

    @property
    def keep_alive(self) -> bool:
        """The caller's connection may serve another request after this one."""
        caller = self.caller
        return self.request.keep_alive and not (caller.closing and not caller.queue)


# A request without a body (neither a length nor chunks), as sent upstream (never changed).
_NO_BODY = _Sent(None, None, replayable=True)


def _whole_body(request: _Request) -> _Sent:
    """A body that has come whole, as sent upstream (with its length: replayable)."""
    body = request.body
    if body.length is None and not request.chunked:
        return _NO_BODY
    data = body.whole()
    return _Sent(data, len(data), replayable=True)


def _request_message(
    head: bytes,
    request: _Request,
    authorization: bytes,
    body: _Sent,
    extra: Iterable[tuple[str, str]],
) -> bytes:
    """The request head (and a whole body) as sent upstream: the caller's headers without
    the dropped ones, the token's `authorization` line (or `extra`'s Authorization), the
    body's framing."""
    lines = [head]
    lines += request.forward
    authorized = False
    for name, value in extra:
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        authorized = authorized or name.lower() == "authorization"
    if not authorized:
        lines.append(authorization)
    if body.length is not None:
        lines.append(_length_line(body.length))
    elif body.stream is not None:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    lines.append(_CRLF)
    if body.data:
        lines.append(body.data)
    return b"".join(lines)


def _bearer(token: TokenSet) -> bytes:
    """The Authorization line carrying `token`."""
    return b"Authorization: Bearer " + token.access_token.encode("latin-1") + _CRLF


# What an answer header is to the relay (per name as sent, bytes): passed back, dropped
# (hop-by-hop), its Content-Length, its Transfer-Encoding (dropped), its Connection (dropped,
# and what it lists is dropped too). Upstreams send the same few names: remembered, bounded.
_LENGTH, _FRAMING, _CONNECTION_LIST = 2, 3, 4
_answer_kinds: dict[bytes, int] = {}


def _answer_kind(name: bytes) -> int:
    kind = _answer_kinds.get(name)
    if kind is not None:
        return kind
    lower = name.decode("latin-1").lower()
    if lower == "content-length":
        kind = _LENGTH
    elif lower == "transfer-encoding":
        kind = _FRAMING
    elif lower == "connection":
        kind = _CONNECTION_LIST
    else:
        kind = _DROPPED if dropped_response_header(lower) else _FORWARD
    if len(_answer_kinds) >= MAX_REMEMBERED_NAMES:
        _answer_kinds.clear()
    _answer_kinds[name] = kind
    return kind


@functools.lru_cache(maxsize=256)
def _listed_beyond_hop(value: bytes) -> frozenset[bytes]:
    """The lowercased names a Connection value lists that are not hop-by-hop already
    (`keep-alive`, `close` and the like are dropped whatever it lists)."""
    return frozenset(
        n.encode("latin-1")
        for n in listed_in(value.decode("latin-1"))
        if not dropped_response_header(n)
    )


# Status lines and Content-Length lines as sent back, remembered (bounded: emptied when full).
_status_lines: dict[tuple[int, bytes], bytes] = {}
_length_lines: dict[int, bytes] = {}


def _status_line(status: int, reason: bytes) -> bytes:
    line = _status_lines.get((status, reason))
    if line is None:
        if len(_status_lines) >= MAX_REMEMBERED_NAMES:
            _status_lines.clear()
        line = _status_lines[(status, reason)] = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    return line


def _length_line(length: int) -> bytes:
    line = _length_lines.get(length)
    if line is None:
        if len(_length_lines) >= MAX_REMEMBERED_NAMES:
            _length_lines.clear()
        line = _length_lines[length] = b"Content-Length: %d\r\n" % length
    return line


def _answer_head(answer: UpstreamConnection) -> tuple[list[bytes], bool]:
    """The status line and passed-back headers of an answer being streamed (without the final
    CRLF), and whether they carry the upstream's Content-Length."""
    lines = [_status_line(answer.status, answer.reason)]
    lines += answer.forward
    lines += answer.lengths
    return lines, bool(answer.lengths)


def _relay_whole(
    caller: CallerConnection, request: _Request, answer: UpstreamConnection, keep_alive: bool
) -> bool:
    """An answer that has come whole (or has no body) back in one write; the connection goes
    back to the pool. Returns whether the caller's connection stays open."""
    lines = [_status_line(answer.status, answer.reason)]
    lines += answer.forward
    if request.method == "HEAD":
        lines += answer.lengths  # the length the body would have
        body = b""
    elif answer.status in _NO_BODY_STATUS:
        body = b""
    else:
        chunks = answer.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        lines.append(_length_line(len(body)))
    answer.chunks.clear()
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    elif not request.http11:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(_CRLF)
    lines.append(body)
    caller.write(b"".join(lines))
    answer.release()
    return keep_alive


def _finish_head(lines: list[bytes], keep_alive: bool, request: _Request) -> None:
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    elif not request.http11:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(_CRLF)


class _TooLarge(Exception):
    """A streamed request body went over `max_request_body`."""


def _app_of(target: str) -> str:
    """The app a proxy request target names (404 `not_found` for any other target)."""
    rest = target[len(PROXY_PREFIX) :].partition("?")[0]
    app, slash, _ = rest.partition("/")
    if not target.startswith(PROXY_PREFIX) or not slash or not app:
        raise ApiError(404, "not_found", f"this listener serves {PROXY_PREFIX}<app>/<path> only")
    return unquote(app) if "%" in app else app


def _extra_headers(
    proxy: Proxy, pool: LeanPool, request: _Request, app: str, token: TokenSet
) -> list[tuple[str, str]]:
    """The DPoP headers of a DPoP-bound token, and the trace context: [] when neither."""
    extra: list[tuple[str, str]] = []
    if token.dpop_jkt is not None and app in proxy.dpop:
        url = pool.upstream.url_for(request.target, app)
        extra.extend(proxy.auth_headers(app, request.method, url, token).items())
    if tracing.enabled():
        context: dict[str, str] = {}
        tracing.inject(context)
        if context:
            extra = [(n, v) for n, v in extra if n.lower() != "traceparent"]
            extra.extend(context.items())
    return extra


def _multidict(answer: UpstreamConnection) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(
        CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in answer.headers)
    )


def _is_tls_error(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLError | ssl.CertificateError)


async def serve(
    listener: ProxyListener, *, host: str | None = None, port: int = 0, sock: Any = None
) -> asyncio.Server:
    """Start accepting on `host:port` or a bound socket `sock`; the server is kept for close."""
    loop = asyncio.get_running_loop()
    if sock is not None:
        server = await loop.create_server(listener.protocol, sock=sock)
    else:
        server = await loop.create_server(listener.protocol, host, port)
    listener.server = server
    listener.sweeper = loop.create_task(listener.sweep())
    return server

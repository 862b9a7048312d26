"""The injecting proxy: `/v1/proxy/{app}/{path}` forwarded to the app's fixed upstream.

An app with several upstreams (`proxy.upstreams`) names one in the path's first segment:
`/v1/proxy/{app}/{upstream}/{path}`, so an SDK that talks to several hosts needs only one base
URL per host. All of an app's upstreams use its one token; each has its own connection pool.

The caller writes no token code. The broker checks the path against the app's allowed prefixes,
takes a servable token (or fails closed: 503 / 409, nothing forwarded), removes the caller's
credentials and hop-by-hop headers, adds `Authorization: Bearer <access token>` (for a DPoP-bound
token `Authorization: DPoP <access token>` and a fresh proof of this request, broker/dpop.py) and
streams the request and the answer. A resource server's DPoP nonce challenge is answered once,
with its nonce. On an upstream 401 (or another status of `refresh_on_status`) for a body it can
replay it reports the token refused (a fleet-wide purge: recorded in the store, one refresh for
the fleet, rate-limited per app) and retries once with its successor; any other answer, a
second 401 included, goes back unchanged. Redirects are passed back, never followed.

The upstream origin comes only from the config: the caller supplies a path, which is validated
on its raw form, so no `..`, encoded slash, backslash, absolute URL or `@` can change the host or
leave the allowed prefixes. Every connection's address passes the egress guard
(broker/egress.py) right before it is connected: no loopback, link-local or private address
unless the app's `allowed_networks` holds it. Nothing is logged per request; the token is never
logged.

The per-request path remembers what repeats (docs/architecture.md, "What a proxied request
costs"): each request target's checked upstream URL (per pool), the forwarding decision per
header name, the parse of each `Connection` value; an answer of up to 64 KiB with a
`Content-Length` is read whole and goes back in one write with its headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from broker import egress, tracing
from broker.api.errors import ApiError, token_error
from broker.errors import NeedsAuthorization, RateLimited, TokenUnavailable
from broker.metrics import Metrics
from broker.model import AppSpec, ProxySpec, TokenSet
from broker.service import TokenService

if TYPE_CHECKING:
    from broker.dpop import AppDpop

PROXY_PREFIX = "/v1/proxy/"
# The route as spans name it: never the caller's path, which may carry identifiers.
PROXY_ROUTE = "/v1/proxy/{app}/{path}"
# Bytes read from one side and written to the other at a time.
CHUNK = 64 * 1024
# Longest header line accepted from the upstream (aiohttp's default, also the API's own limit).
MAX_HEADER_LINE = 8190
MAX_HEADERS = 128
# Request targets per upstream whose checked upstream URL is remembered (then forgotten all at
# once): the check and the URL are a pure function of the target, and targets repeat.
MAX_REMEMBERED_TARGETS = 4096
# Header names whose forwarding decision is remembered (names are the caller's choice: bounded).
MAX_REMEMBERED_NAMES = 1024
# Methods never forwarded: TRACE would echo the injected token; CONNECT opens a tunnel.
REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

# RFC 9110 §7.6.1 hop-by-hop headers; also every header the Connection header names.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers never forwarded: the caller's broker key, what the broker sets itself (Host,
# the body's framing), and anything that would tell the upstream of another origin or client.
_DROP_REQUEST = _HOP_BY_HOP | {
    "authorization",
    "host",
    "content-length",
    "expect",
    "forwarded",
    "x-real-ip",
}
_DROP_RESPONSE = _HOP_BY_HOP
# A path as RFC 3986 allows it (pchar and "/"); percent-escapes must be complete.
_PATH = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*$")
_QUERY = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*$")
# Escapes that would smuggle a separator or a NUL past the checks: %2F, %5C, %00.
_ENCODED_SEPARATOR = re.compile(r"%(?:2[fF]|5[cC]|00)")


def check_method(method: str) -> None:
    """Refuse the methods that are never forwarded (405 with Allow)."""
    if method in REFUSED_METHODS:
        raise ApiError(
            405, "method_not_allowed", f"{method} is not forwarded", {"Allow": ALLOWED_METHODS}
        )


# ---- the path a caller may reach -------------------------------------------------------------


def upstream_target(
    raw_path: str, app: str, prefixes: tuple[str, ...], upstream: str | None = None
) -> tuple[str, str]:
    """The (still percent-encoded) path and query to request upstream, from the raw target.

    Raises ApiError 400 for a target that is not a plain origin-form path under
    `/v1/proxy/{app}/` (`/v1/proxy/{app}/{upstream}/` for a named upstream), and 403
    `path_not_allowed` for a path outside `prefixes`.
    """
    path, _, query = raw_path.partition("?")
    base = f"{PROXY_PREFIX}{app}/" if upstream is None else f"{PROXY_PREFIX}{app}/{upstream}/"
    if not path.startswith(base):
        raise ApiError(400, "bad_request", f"the request target must be {base}<path>")
    tail = "/" + path[len(base) :]
    if not _PATH.match(tail) or not _QUERY.match(query):
        raise ApiError(400, "bad_request", "the path or query holds characters a URL may not")
    if _ENCODED_SEPARATOR.search(tail):
        raise ApiError(400, "bad_request", "encoded slashes, backslashes and NUL are refused")
    segments = [unquote(segment) for segment in tail.split("/")]
    if any(segment in (".", "..") for segment in segments):
        raise ApiError(400, "bad_request", "dot segments (. and ..) are refused in the path")
    if "" in segments[1:-1]:
        raise ApiError(400, "bad_request", "empty segments (//) are refused in the path")
    decoded = "/".join(segments)
    if any(ord(c) < 32 or ord(c) == 127 for c in decoded):
        raise ApiError(400, "bad_request", "control characters are refused in the path")
    if not any(path_allowed(decoded, prefix) for prefix in prefixes):
        through = f"app {app}" if upstream is None else f"app {app}'s upstream {upstream}"
        raise ApiError(403, "path_not_allowed", f"this path is not open through {through}")
    return tail, query


def path_allowed(path: str, prefix: str) -> bool:
    """True when the decoded `path` is `prefix` or below it (a prefix ends at a segment)."""
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


# ---- headers ---------------------------------------------------------------------------------


_NOTHING_LISTED: frozenset[str] = frozenset()


def _connection_listed(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Headers the Connection header names: hop-by-hop too (RFC 9110 §7.6.1)."""
    values = headers.getall("Connection", ())
    if not values:
        return _NOTHING_LISTED
    if len(values) == 1:
        return listed_in(values[0])
    return frozenset().union(*(listed_in(value) for value in values))


# Upstreams send the same `Connection: keep-alive` on every answer: parsed once per value.
@functools.lru_cache(maxsize=MAX_REMEMBERED_NAMES)
def listed_in(value: str) -> frozenset[str]:
    """The lowercased header names a `Connection` value lists."""
    return frozenset(token.strip().lower() for token in value.split(","))


# Per header name (as sent, any case): never forwarded whatever its value? Callers send the
# same few names on every request, so the lowercasing and the tests run once per name.
@functools.lru_cache(maxsize=MAX_REMEMBERED_NAMES)
def dropped_request_header(name: str) -> bool:
    """True for a request header never forwarded, whatever its value."""
    lower = name.lower()
    return lower in _DROP_REQUEST or lower.startswith(("x-forwarded-", "proxy-"))


@functools.lru_cache(maxsize=MAX_REMEMBERED_NAMES)
def dropped_response_header(name: str) -> bool:
    """True for an answer header never passed back (hop-by-hop)."""
    return name.lower() in _DROP_RESPONSE


def request_headers(incoming: CIMultiDictProxy[str], token: TokenSet) -> CIMultiDict[str]:
    """The headers to send upstream: the caller's, cleaned, plus the access token."""
    listed = _connection_listed(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if dropped_request_header(name) or (listed and name.lower() in listed):
            continue
        out.add(name, value)
    out["Authorization"] = f"Bearer {token.access_token}"
    return out


def response_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's answer headers without the hop-by-hop ones (multi-valued kept)."""
    listed = _connection_listed(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if not dropped_response_header(name) and not (listed and name.lower() in listed):
            out.add(name, value)
    return out


# ---- upstream connection pools ---------------------------------------------------------------


@dataclass
class Upstream:
    """One upstream of an app: its config, its own connection pool and its concurrency limit.

    `name` is its key under `proxy.upstreams` (None for the single `proxy.upstream`).
    """

    spec: ProxySpec
    session: aiohttp.ClientSession
    origin: URL
    slots: asyncio.Semaphore
    app: str = ""
    name: str | None = None
    path_prefixes: tuple[str, ...] = ("/",)
    in_flight: int = 0
    # The TLS context of its connections (both data paths).
    ssl_context: ssl.SSLContext | None = None
    # The proxy listener's own pool (broker/api/proxy_listener.py), made on its first use.
    lean_pool: Any = None
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    # Raw request target → the checked upstream URL (see MAX_REMEMBERED_TARGETS).
    _urls: dict[str, URL] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._idle.set()

    def url_for(self, raw_path: str, app: str) -> URL:
        """The upstream URL of a request target (`upstream_target`'s checks and errors)."""
        url = self._urls.get(raw_path)
        if url is not None:
            return url
        path, query = upstream_target(raw_path, app, self.path_prefixes, self.name)
        # The origin is the configured one; the caller's part is only the checked path.
        url = URL.build(
            scheme=self.origin.scheme,
            host=self.origin.raw_host or "",
            port=self.origin.explicit_port,
            path=path,
            query_string=query,
            encoded=True,
        )
        if len(self._urls) >= MAX_REMEMBERED_TARGETS:
            self._urls.clear()  # bounded: request targets are the caller's choice
        self._urls[raw_path] = url
        return url

    def enter(self) -> None:
        """A request starts using this upstream."""
        self.in_flight += 1
        if self.in_flight == 1:
            self._idle.clear()

    def leave(self) -> None:
        """A request is done with this upstream."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def close(self, grace: float) -> None:
        """Close the pool once no request uses it (or after `grace` seconds)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self.lean_pool is not None:
            self.lean_pool.close()
        await self.session.close()


def open_upstreams(app: str, spec: ProxySpec) -> dict[str | None, Upstream]:
    """The app's pools: one per upstream, by name (None: the single `upstream`)."""
    if spec.upstream is not None:
        return {None: open_upstream(app, spec, spec.upstream)}
    return {
        u.name: open_upstream(app, spec, u.origin, u.name, u.path_prefixes) for u in spec.upstreams
    }


def open_upstream(
    app: str,
    spec: ProxySpec,
    origin: str,
    name: str | None = None,
    path_prefixes: tuple[str, ...] | None = None,
) -> Upstream:
    """A connection pool to `origin`: TLS verified (with `ca_file` if given), every address
    it connects to checked by the egress guard."""
    context = upstream_ssl_context(spec)
    connector = aiohttp.TCPConnector(
        limit=spec.max_concurrent,
        ssl=context,
        socket_factory=egress.guarded_socket(egress.parse_networks(spec.allowed_networks)),
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=None, connect=spec.connect_timeout, sock_read=spec.read_timeout
        ),
        # The body passes through as the upstream encoded it.
        auto_decompress=False,
        # Only the caller's headers go upstream, not aiohttp's defaults.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        # One pool serves every caller of the app: it must never keep and replay cookies.
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        max_line_size=MAX_HEADER_LINE,
        max_field_size=MAX_HEADER_LINE,
        max_headers=MAX_HEADERS,
    )
    return Upstream(
        spec=spec,
        session=session,
        origin=URL(origin),
        slots=asyncio.Semaphore(spec.max_concurrent),
        app=app,
        name=name,
        path_prefixes=path_prefixes or spec.path_prefixes,
        ssl_context=context,
    )


def upstream_ssl_context(spec: ProxySpec) -> ssl.SSLContext:
    """TLS to an upstream: certificates verified, against `ca_file` when given."""
    return ssl.create_default_context(cafile=str(spec.ca_file) if spec.ca_file else None)


class Upstreams:
    """Every app's upstream pools. The composition root owns it and closes it."""

    def __init__(self) -> None:
        self._by_app: dict[str, dict[str | None, Upstream]] = {}

    def select(self, app: str, raw_path: str) -> Upstream:
        """The upstream a request to `raw_path` goes to: the app's only one, or the one the
        path's first segment names. Raises ApiError 404 when the app has no proxy, or no
        upstream of that name."""
        pools = self._by_app.get(app)
        if pools is None:
            raise ApiError(404, "proxy_not_configured", f"app {app} has no proxy configured")
        single = pools.get(None)
        if single is not None:
            return single
        base = f"{PROXY_PREFIX}{app}/"
        if not raw_path.startswith(base):
            raise ApiError(
                400, "bad_request", f"the request target must be {base}<upstream>/<path>"
            )
        name = raw_path[len(base) :].partition("?")[0].partition("/")[0]
        upstream = pools.get(name)
        if upstream is None:
            shown = repr(name[:64] + ("..." if len(name) > 64 else ""))
            raise ApiError(
                404,
                "unknown_upstream",
                f"app {app} has no upstream named {shown}; its upstreams are "
                f"{', '.join(sorted(n for n in pools if n))}, reached at {base}<upstream>/<path>",
            )
        return upstream

    def update(self, apps: Mapping[str, AppSpec]) -> list[Upstream]:
        """Open pools for new or changed proxies; returns the retired ones (to close)."""
        retired: list[Upstream] = []
        for name, pools in list(self._by_app.items()):
            spec = apps[name].proxy if name in apps else None
            if any(spec != upstream.spec for upstream in pools.values()):
                retired.extend(self._by_app.pop(name).values())
        for name, app in apps.items():
            if app.proxy is not None and name not in self._by_app:
                self._by_app[name] = open_upstreams(name, app.proxy)
        return retired

    async def close(self, grace: float) -> None:
        """Close every pool (shutdown)."""
        upstreams = [u for pools in self._by_app.values() for u in pools.values()]
        self._by_app = {}
        await asyncio.gather(*(u.close(grace) for u in upstreams))


# ---- forwarding ------------------------------------------------------------------------------


@dataclass
class _Body:
    """The request body as it will be sent: bytes (replayable) or a one-shot stream."""

    data: bytes | AsyncIterator[bytes] | None
    length: int | None
    replayable: bool
    too_large: bool = False


class Proxy:
    """Forwards a caller's request to its app's upstream with the app's access token."""

    def __init__(
        self,
        service: TokenService,
        upstreams: Upstreams,
        metrics: Metrics,
        dpop: Mapping[str, AppDpop] | None = None,
    ) -> None:
        self.service = service
        self.upstreams = upstreams
        self.metrics = metrics
        # The DPoP of each app with `dpop: true` (the composition root's live mapping).
        self.dpop: Mapping[str, AppDpop] = dpop if dpop is not None else {}
        self._counters: dict[tuple[str, str], Any] = {}
        self._timers: dict[str, Any] = {}

    async def forward(self, request: web.BaseRequest, app: str) -> web.StreamResponse:
        """Answer `request` (already authenticated and allowed `app`) through the upstream."""
        upstream = self.upstreams.select(app, request.raw_path)
        started = time.perf_counter()
        status = 500
        upstream.enter()
        # The caller's W3C trace context (if any) is the parent: the proxy's spans, and the
        # `traceparent` the upstream receives, continue the caller's trace.
        with tracing.span(
            "token_broker.proxy",
            kind="server",
            remote_parent=request.headers,
            app=app,
            semantic={"http.request.method": request.method, "http.route": PROXY_ROUTE},
        ) as span:
            try:
                response = await self._forward(request, app, upstream)
            except ApiError as exc:
                status = exc.status
                span.fail(exc.code)
                raise
            else:
                status = response.status
                return response
            finally:
                span.set("http.response.status_code", status)
                upstream.leave()
                self.count(app, status, time.perf_counter() - started)

    def count(self, app: str, status: int, seconds: float) -> None:
        """Count one proxied request and its duration (the label children are kept)."""
        timer = self._timers.get(app)
        if timer is None:
            timer = self._timers[app] = self.metrics.proxy_duration.labels(app)
        timer.observe(seconds)
        key = (app, str(status))
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.proxy_requests_total.labels(*key)
        counter.inc()

    async def _forward(
        self, request: web.BaseRequest, app: str, upstream: Upstream
    ) -> web.StreamResponse:
        spec = upstream.spec
        url = upstream.url_for(request.raw_path, app)
        token = await self.token(app)
        body = await _read_body(request, spec)
        if upstream.slots.locked():  # only a full upstream pays for a timer
            await wait_for_slot(spec, upstream.slots.acquire)
        else:
            await upstream.slots.acquire()
        try:
            answer = await self._send(upstream, request, url, token, body)
            if self.dpop_challenge(app, url, answer.status, answer.headers) and body.replayable:
                # A resource server's nonce challenge (RFC 9449 §9): once more, with its nonce.
                self.metrics.dpop_nonce_retries.labels(app=app, server="resource_server").inc()
                answer.release()
                answer = await self._send(upstream, request, url, token, body)
            if spec.retry_on_401 and answer.status in spec.refresh_on_status:
                answer = await self._after_401(
                    upstream=upstream,
                    request=request,
                    url=url,
                    app=app,
                    token=token,
                    body=body,
                    answer=answer,
                )
            return await _relay(request, answer)
        finally:
            upstream.slots.release()

    async def token(self, app: str) -> TokenSet:
        """A servable token, or the contract's 503 / 409: the proxy fails closed."""
        token = self.service.cached_token(app)
        if token is not None:
            return token
        with tracing.span("token_broker.token_fetch", app=app) as span:
            try:
                return await self.service.get_token(app)
            except (NeedsAuthorization, TokenUnavailable) as exc:
                span.fail(type(exc).__name__)
                raise token_error(exc, app, self.service.status(app).last_error) from None

    async def _after_401(
        self,
        *,
        upstream: Upstream,
        request: web.BaseRequest,
        url: URL,
        app: str,
        token: TokenSet,
        body: _Body,
        answer: aiohttp.ClientResponse,
    ) -> aiohttp.ClientResponse:
        """The token reported refused (one purge for the fleet) and one retry with its
        successor; otherwise the upstream's answer goes back as it is."""
        try:
            fresh = await self.successor(app, token, replayable=body.replayable)
        except ApiError:
            answer.release()
            raise
        if fresh is None:
            return answer
        answer.release()
        return await self._send(upstream, request, url, fresh, body)

    async def successor(self, app: str, token: TokenSet, *, replayable: bool) -> TokenSet | None:
        """After an upstream refused `token` (a status of `refresh_on_status`): report it
        refused (one purge for the fleet) and return its successor to retry with, or None when
        the upstream's answer goes back as it is (no replayable body, rate-limited, no new
        token). Raises the contract's ApiError when no token can be had at all."""
        retries = self.metrics.proxy_retries_total
        if not replayable:
            retries.labels(app, "not_replayable").inc()
            return None
        try:
            with tracing.span("token_broker.token_fetch", app=app, forced=True):
                fresh = await self.service.token_refused(app, token)
        except RateLimited:
            # The refresh guard protects the authorization server; the caller sees the truth.
            retries.labels(app, "rate_limited").inc()
            return None
        except (NeedsAuthorization, TokenUnavailable) as exc:
            retries.labels(app, "refresh_failed").inc()
            raise token_error(exc, app, self.service.status(app).last_error) from None
        if fresh.access_token == token.access_token:
            # No successor came in time (or, the store down, a token younger than 5 s is not
            # replaced): retrying is futile.
            retries.labels(app, "token_unchanged").inc()
            return None
        retries.labels(app, "unauthorized").inc()
        return fresh

    async def _send(
        self,
        upstream: Upstream,
        request: web.BaseRequest,
        url: URL,
        token: TokenSet,
        body: _Body,
    ) -> aiohttp.ClientResponse:
        """One request upstream; errors before an answer become 502 / 504 / 413 JSON errors."""
        headers = request_headers(request.headers, token)
        headers.update(self.auth_headers(upstream.app, request.method, url, token))
        if body.length is not None:
            headers["Content-Length"] = str(body.length)
        try:
            with tracing.span(
                "token_broker.upstream",
                kind="client",
                semantic={
                    "http.request.method": request.method,
                    "server.address": upstream.origin.host or "",
                },
            ) as span:
                # This span's context replaces the caller's `traceparent` (same trace, this
                # hop as the parent); with traces off the caller's passes through unchanged.
                tracing.inject(headers)
                answer = await upstream.session.request(
                    request.method, url, headers=headers, data=body.data, allow_redirects=False
                )
                span.set("http.response.status_code", answer.status)
                return answer
        except TimeoutError:
            raise ApiError(504, "upstream_timeout", "the upstream did not answer in time") from None
        except (aiohttp.ClientSSLError, ssl.SSLError):
            raise ApiError(
                502, "upstream_error", "TLS with the upstream failed (is its certificate trusted?)"
            ) from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if body.too_large:
                raise too_large(upstream.spec) from None
            refused = getattr(exc, "os_error", None)
            if isinstance(refused, egress.EgressRefused):
                raise egress_refused(self.metrics, upstream, refused) from None
            raise ApiError(502, "upstream_error", "the upstream could not be reached") from None

    # ---- the DPoP hook (broker/dpop.py) ----------------------------------------------------

    def auth_headers(self, app: str, method: str, url: URL, token: TokenSet) -> dict[str, str]:
        """For a DPoP-bound token, `Authorization: DPoP` and a fresh proof of this request."""
        dpop = self.dpop.get(app)
        if dpop is None or token.dpop_jkt is None:
            return {}
        # Imported here: only DPoP apps load broker.dpop.
        from broker.dpop import DpopKeyMissing

        try:
            return dpop.token_headers(method, url, token)
        except DpopKeyMissing as exc:
            raise ApiError(503, "dpop_key_missing", str(exc), {"Retry-After": "5"}) from None

    def dpop_challenge(
        self, app: str, url: URL, status: int, headers: CIMultiDictProxy[str]
    ) -> bool:
        """Remember the upstream's DPoP nonce; True when its answer asks for one (a retry)."""
        dpop = self.dpop.get(app)
        if dpop is None:
            return False
        # Imported here: only DPoP apps load broker.dpop.
        from broker.dpop import is_resource_challenge

        sent = dpop.nonces.get(url)
        nonce = dpop.nonces.note(url, headers)
        return nonce is not None and nonce != sent and is_resource_challenge(status, headers)


async def _read_body(request: web.BaseRequest, spec: ProxySpec) -> _Body:
    """Buffer a body up to `max_buffered_body` (replayable); stream a larger one."""
    if not request.body_exists:
        return _Body(None, None, replayable=True)
    length = request.content_length
    if length is not None and length > spec.max_request_body:
        raise too_large(spec)
    try:
        if length is not None and length <= spec.max_buffered_body:
            return _Body(await request.content.readexactly(length), length, replayable=True)
        head = b""
        if length is None:
            head = await _read_up_to(request.content, spec.max_buffered_body + 1)
            if len(head) <= spec.max_buffered_body:
                return _Body(head, len(head), replayable=True)
    except (asyncio.IncompleteReadError, aiohttp.ClientError, OSError):
        raise ApiError(400, "bad_request", "the request body ended early") from None
    body = _Body(None, length, replayable=False)
    body.data = _stream(head, request.content, spec.max_request_body, body)
    return body


async def _read_up_to(content: aiohttp.StreamReader, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await content.read(min(CHUNK, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def _stream(
    head: bytes, content: aiohttp.StreamReader, limit: int, body: _Body
) -> AsyncIterator[bytes]:
    """The body as it arrives; stops (failing the upstream request) past `limit` bytes."""
    size = len(head)
    if head:
        yield head
    async for chunk in content.iter_chunked(CHUNK):
        size += len(chunk)
        if size > limit:
            body.too_large = True
            raise ValueError("request body over the limit")
        yield chunk


async def wait_for_slot(spec: ProxySpec, acquire: Callable[[], Awaitable[object]]) -> None:
    """Wait for one of the upstream's `max_concurrent` slots when none is free (both data
    paths): `acquire` takes one; 503 `proxy_busy` when none frees within `connect_timeout`."""
    try:
        async with asyncio.timeout(spec.connect_timeout):
            await acquire()
    except TimeoutError:
        raise ApiError(
            503,
            "proxy_busy",
            f"{spec.max_concurrent} requests to this app's upstream are in flight",
            {"Retry-After": "1"},
        ) from None


def egress_refused(metrics: Metrics, upstream: Upstream, refused: egress.EgressRefused) -> ApiError:
    """The 403 for an upstream whose address the egress guard refused, counted."""
    metrics.proxy_egress_refused_total.labels(upstream.app, refused.reason).inc()
    host = upstream.origin.host or ""
    return ApiError(
        403,
        "egress_refused",
        f"the upstream {host} is at {refused.address}, "
        f"{egress.DESCRIBED[refused.reason]}: nothing was sent. The proxy reaches loopback, "
        f"link-local and private addresses only when apps.{upstream.app}.proxy."
        "allowed_networks lists them",
    )


def too_large(spec: ProxySpec) -> ApiError:
    """The 413 for a request body over `max_request_body`."""
    return ApiError(
        413, "payload_too_large", f"request bodies are limited to {spec.max_request_body} bytes"
    )


async def _relay(request: web.BaseRequest, answer: aiohttp.ClientResponse) -> web.StreamResponse:
    """Stream the upstream's answer back with its status and headers."""
    headers = response_headers(answer.headers)
    length = answer.content_length
    cut = False
    if length is not None and length <= CHUNK:
        # A small answer (the common one) is read whole and goes back in one write, headers
        # and body together (a streamed answer sends its headers on their own first).
        try:
            body = await answer.content.read()
        except (aiohttp.ClientError, OSError, TimeoutError):
            cut = True  # answered below as a streamed answer cut short would be
        else:
            answer.release()
            return web.Response(
                body=body, status=answer.status, reason=answer.reason, headers=headers
            )
    response = web.StreamResponse(status=answer.status, reason=answer.reason, headers=headers)
    try:
        await response.prepare(request)
        if cut:
            raise aiohttp.ClientPayloadError("the upstream's answer ended early")
        async for chunk in answer.content.iter_chunked(CHUNK):
            await response.write(chunk)
        await response.write_eof()
    except (aiohttp.ClientError, OSError, TimeoutError):
        # The answer has begun: a cut connection is the only honest signal left (the caller
        # sees a short body), never a well-formed end of a truncated one.
        if request.transport is not None:
            request.transport.close()
    finally:
        answer.release()
    return response

"""The local HTTP API (tokens for callers in the pod) and the metrics listener.

Every route is wrapped by `_Api.endpoint`, which does the per-request work they share: the Host
and Forwarded checks, JSON errors, and the request metrics. (A wrapper rather than an aiohttp
middleware: middlewares cost a wrapper object per request on the hot path.) A catch-all route
answers unknown paths and wrong methods in JSON. The serving path logs nothing per request.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker.api.auth import ClientAuthenticator, PeerCredentials
from broker.api.errors import NO_STORE, ApiError, error_response, token_error
from broker.api.openapi import openapi_document
from broker.api.proxy import Proxy, Upstreams, check_method
from broker.clock import Clock
from broker.errors import NeedsAuthorization, RateLimited, TokenUnavailable
from broker.logs import RateLimitedLog, audit, get_logger
from broker.metrics import Metrics
from broker.model import TokenSet
from broker.service import TokenService

log = get_logger(__name__)

ROUTE_TOKEN = "/v1/token/{app}"
ROUTE_REFRESH = "/v1/token/{app}/refresh"
ROUTE_APPS = "/v1/apps"
ROUTE_OPENAPI = "/openapi.json"
ROUTE_PROXY = "/v1/proxy/{app}/{path}"
MAX_MIN_TTL = 10**9
_MIN_TTL = re.compile(r"^[0-9]{1,10}$")
_TOKEN_HEADERS = {**NO_STORE, "Content-Type": "application/json"}
_KNOWN_PATHS = (
    (re.compile(r"^/v1/token/[^/]+$"), "GET"),
    (re.compile(r"^/v1/token/[^/]+/refresh$"), "POST"),
    (re.compile(r"^/v1/apps$"), "GET"),
    (re.compile(r"^/openapi\.json$"), "GET"),
)
DENIED_LOG_INTERVAL = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Per-request labels for the metrics: a configured app and client name, or "".
APP_LABEL = web.RequestKey("app_label", str)
CLIENT_LABEL = web.RequestKey("client_label", str)


@functools.lru_cache(maxsize=1024)
def is_loopback_host(host_header: str | None) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1, with or without a port. No Host: True."""
    if host_header is None:
        return True  # HTTP/1.0 without Host: no browser sends this (DNS rebinding needs one)
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Api:
    """The handlers, with what they share: service, authenticator, metrics, clock."""

    def __init__(
        self,
        service: TokenService,
        authenticator: ClientAuthenticator,
        metrics: Metrics,
        clock: Clock,
        upstreams: Upstreams,
        *,
        peer_identity: bool = False,
    ) -> None:
        self.service = service
        self.auth = authenticator
        self.metrics = metrics
        self.clock = clock
        self.proxy = Proxy(service, upstreams, metrics)
        # Only the unix-socket API reads peer credentials; on TCP nothing is looked up.
        self._peers = PeerCredentials() if peer_identity else None
        self._issued: dict[str, tuple[TokenSet, set[str]]] = {}
        # The serialized answer per app, reused while the token and its whole seconds hold.
        self._bodies: dict[str, tuple[TokenSet, int, int, bytes]] = {}
        self._denied = RateLimitedLog(DENIED_LOG_INTERVAL)
        self._counters: dict[tuple[str, str, str, str], Any] = {}
        self._timers: dict[str, Any] = {}

    # ---- the shared per-request work ---------------------------------------------------

    def endpoint(self, route: str, handler: Handler) -> Handler:
        """Wrap `handler`: origin checks, JSON errors, metrics under the route template."""
        timer = self.metrics.request_duration.labels(route)

        async def handle(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            request[APP_LABEL] = ""
            request[CLIENT_LABEL] = ""
            try:
                _check_origin(request)
                response = await handler(request)
            except ApiError as exc:
                response = error_response(exc)
                if exc.status in (401, 403):
                    self._log_denied(request, exc.code)
            except Exception:
                log.exception("api.internal_error", route=route)
                response = error_response(ApiError(500, "internal", "internal error"))
            key = (route, request[APP_LABEL], request[CLIENT_LABEL], str(response.status))
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = self.metrics.requests_total.labels(*key)
            counter.inc()
            timer.observe(time.perf_counter() - started)
            return response

        return handle

    async def fallback(self, request: web.Request) -> web.Response:
        """Unknown paths (404) and known paths with the wrong method (405), in JSON."""
        for pattern, allowed in _KNOWN_PATHS:
            if pattern.match(request.path):
                raise ApiError(
                    405,
                    "method_not_allowed",
                    "method not allowed on this route",
                    {"Allow": allowed},
                )
        raise ApiError(404, "not_found", "no such route")

    def _log_denied(self, request: web.Request, reason: str) -> None:
        peer = self._peers.of(request.transport) if self._peers is not None else None
        where = f"uid:{peer[0]}" if peer is not None else request.remote
        who = request[CLIENT_LABEL] or (where or "unknown")
        if self._denied.allow((who, reason), self.clock.monotonic()):
            # Typed as Any: audit's own keyword `level` must not look like it could come from here.
            peer_fields: dict[str, Any] = (
                {"peer_uid": peer[0], "peer_gid": peer[1]} if peer is not None else {}
            )
            audit(
                log,
                "client.denied",
                client=request[CLIENT_LABEL] or None,
                remote=request.remote,
                reason=reason,
                app=request[APP_LABEL] or None,
                **peer_fields,
            )

    # ---- helpers -----------------------------------------------------------------------

    def _caller(self, request: web.Request) -> str:
        authorization = request.headers.get("Authorization")
        client = self.auth.identify(authorization)
        if client is None:
            if authorization is None and self._peers is not None:
                # No key presented, on the unix socket: the kernel says who is calling.
                peer = self._peers.of(request.transport)
                client = None if peer is None else self.auth.identify_peer(*peer)
            if client is None:
                raise ApiError(
                    401,
                    "unauthorized",
                    "a valid client key is required as 'Authorization: Bearer <key>'"
                    + (" (or a uid or gid mapped to a client)" if self._peers is not None else ""),
                    {"WWW-Authenticate": 'Bearer realm="token-broker"'},
                )
        request[CLIENT_LABEL] = client
        return client

    def _app_for(self, request: web.Request, client: str) -> str:
        app = request.match_info["app"]
        if app not in self.service.app_names():
            usable = sorted(self.auth.apps_of(client) & set(self.service.app_names()))
            raise ApiError(
                404,
                "unknown_app",
                f"no app named {_quoted(app)} is configured; "
                f"this client may use: {', '.join(usable) or 'no app'}",
            )
        request[APP_LABEL] = app
        if not self.auth.allowed(client, app):
            raise ApiError(403, "forbidden", f"client {client} may not use app {app}")
        return app

    def _token_response(self, app: str, client: str, token: TokenSet) -> web.Response:
        entry = self._issued.get(app)
        if entry is None or entry[0] is not token:
            entry = (token, set())
            self._issued[app] = entry
        if client not in entry[1]:
            entry[1].add(client)
            audit(log, "token.issued", app=app, client=client, token_fingerprint=token.fingerprint)
        remaining = token.expires_at - self.service.now()
        expires_in = max(0, int(remaining))
        # The service keeps fleet time (the store's clock); a caller compares expires_at with
        # its own clock, which is this pod's, so expires_at is given on the pod's clock.
        expires_at = int(self.clock.time() + remaining)
        cached = self._bodies.get(app)
        if cached is not None and cached[0] is token and cached[1:3] == (expires_in, expires_at):
            body = cached[3]
        else:
            body = json.dumps(
                {
                    "access_token": token.access_token,
                    "token_type": token.token_type,
                    "expires_at": expires_at,
                    "expires_in": expires_in,
                    "scope": token.scope,
                }
            ).encode()
            self._bodies[app] = (token, expires_in, expires_at, body)
        return web.Response(body=body, headers=_TOKEN_HEADERS)

    async def _serve(
        self,
        request: web.Request,
        fetch: Callable[[str], Awaitable[TokenSet]],
        min_ttl: float | None = None,
    ) -> web.Response:
        client = self._caller(request)
        app = self._app_for(request, client)
        if min_ttl is not None:
            # The hot path: a servable token in memory, answered without awaiting anything.
            cached = self.service.cached_token(app, min_ttl)
            if cached is not None:
                return self._token_response(app, client, cached)
        try:
            token = await fetch(app)
        except (NeedsAuthorization, RateLimited, TokenUnavailable, ValueError) as exc:
            raise token_error(exc, app, self.service.status(app).last_error) from None
        return self._token_response(app, client, token)

    # ---- handlers ----------------------------------------------------------------------

    async def get_token(self, request: web.Request) -> web.Response:
        """GET /v1/token/{app}[?min_ttl=N]."""
        min_ttl = 0.0
        if request.query_string:
            raw = request.query.get("min_ttl")
            unknown = set(request.query) - {"min_ttl"}
            if unknown:
                raise ApiError(400, "bad_request", "the only query parameter is min_ttl")
            if raw is None or not _MIN_TTL.match(raw) or int(raw) > MAX_MIN_TTL:
                raise ApiError(400, "bad_request", "min_ttl must be a whole number of seconds")
            min_ttl = float(raw)
        return await self._serve(request, lambda app: self.service.get_token(app, min_ttl), min_ttl)

    async def refresh(self, request: web.Request) -> web.Response:
        """POST /v1/token/{app}/refresh."""
        if request.query:
            raise ApiError(400, "bad_request", "this route takes no query parameters")
        return await self._serve(request, self.service.force_refresh)

    async def list_apps(self, request: web.Request) -> web.Response:
        """GET /v1/apps: the caller's apps and their state."""
        client = self._caller(request)
        apps = []
        for name in sorted(self.auth.apps_of(client) & set(self.service.app_names())):
            status = self.service.status(name)
            apps.append(
                {
                    "name": status.name,
                    "state": status.state.value,
                    "expires_at": _int_or_none(self._on_pod_clock(status.expires_at)),
                    "last_refresh_at": _int_or_none(self._on_pod_clock(status.last_refresh_at)),
                    "last_error": status.last_error,
                }
            )
        return web.json_response({"apps": apps}, headers=NO_STORE)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Any method on /v1/proxy/{app}/{path}: sent upstream with the app's token."""
        check_method(request.method)
        client = self._caller(request)
        app = self._app_for(request, client)
        return await self.proxy.forward(request, app)

    def _on_pod_clock(self, fleet_time: float | None) -> float | None:
        """A time of the service's (fleet) clock, on this pod's clock, as callers read times."""
        if fleet_time is None:
            return None
        return fleet_time - (self.service.now() - self.clock.time())

    async def openapi(self, _: web.Request) -> web.Response:
        """GET /openapi.json (no auth)."""
        return web.json_response(openapi_document())


def build_api_app(
    service: TokenService,
    authenticator: ClientAuthenticator,
    metrics: Metrics,
    clock: Clock,
    upstreams: Upstreams | None = None,
    *,
    peer_identity: bool = False,
) -> web.Application:
    """The local API application. `upstreams` holds the proxies' pools (none: no proxy).
    `peer_identity`: it serves a unix socket, where callers without a key are identified by
    their uid and gid."""
    api = _Api(
        service,
        authenticator,
        metrics,
        clock,
        upstreams or Upstreams(),
        peer_identity=peer_identity,
    )
    app = web.Application(client_max_size=4096)
    app.router.add_get(ROUTE_TOKEN, api.endpoint(ROUTE_TOKEN, api.get_token), allow_head=False)
    app.router.add_post(ROUTE_REFRESH, api.endpoint(ROUTE_REFRESH, api.refresh))
    app.router.add_get(ROUTE_APPS, api.endpoint(ROUTE_APPS, api.list_apps), allow_head=False)
    app.router.add_get(ROUTE_OPENAPI, api.endpoint(ROUTE_OPENAPI, api.openapi), allow_head=False)
    # [\s\S]: a decoded path may hold a newline (%0A); the proxy refuses it in JSON.
    proxy_route = r"/v1/proxy/{app}/{path:[\s\S]*}"
    app.router.add_route("*", proxy_route, api.endpoint(ROUTE_PROXY, api.forward))
    app.router.add_route("*", "/{tail:.*}", api.endpoint("other", api.fallback))
    return app


def build_metrics_app(service: TokenService, metrics: Metrics) -> web.Application:
    """The metrics listener: /metrics, /healthz, /readyz."""

    async def metrics_handler(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(metrics.registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        response.charset = "utf-8"
        return response

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        unready = service.unready_apps()
        if unready:
            return web.json_response({"status": "not_ready", "apps": unready}, status=503)
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _check_origin(request: web.Request) -> None:
    """Refuse proxied requests (SSRF) and non-loopback Host headers (DNS rebinding)."""
    if "Forwarded" in request.headers or "X-Forwarded-For" in request.headers:
        raise ApiError(403, "bad_host", "requests relayed by a proxy are refused")
    if not is_loopback_host(request.headers.get("Host")):
        raise ApiError(403, "bad_host", "the Host header is not a loopback name")


def _quoted(name: str) -> str:
    """A caller-supplied name, shortened and quoted, to repeat in an error message."""
    return repr(name[:64] + ("..." if len(name) > 64 else ""))


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)

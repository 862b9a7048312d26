"""The per-request work every route of the local API shares: routing, origin checks, errors, metrics.

`ApiServer.__call__` routes the request target (remembered per target), refuses relayed and
non-loopback requests, turns ApiError (and any other exception) into JSON errors, and counts
the request under its route's template. The endpoints themselves are in broker/api/token.py.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from broker import tracing
from broker.api.callers import APP_LABEL, CLIENT_LABEL, Callers
from broker.api.errors import ApiError, error_response
from broker.api.openapi import openapi_document
from broker.api.routing import Endpoint, NoRoute, Router
from broker.api.token import MAX_REQUEST_BODY, TokenRoutes
from broker.clock import Clock
from broker.logs import RateLimitedLog, audit, get_logger
from broker.metrics import Metrics

log = get_logger(__name__)

ROUTE_TOKEN = "/v1/token/{app}"
ROUTE_REFRESH = "/v1/token/{app}/refresh"
ROUTE_PROOF = "/v1/token/{app}/proof"
ROUTE_APPS = "/v1/apps"
ROUTE_OPENAPI = "/openapi.json"
# Request targets whose routing is remembered (then forgotten all at once).
MAX_RESOLVED_TARGETS = 4096
ROUTE_OTHER = "other"
DENIED_LOG_INTERVAL = 60.0


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


# A routed request target: metrics label, endpoint, path parameters.
_Resolved = tuple[str, Endpoint, Mapping[str, str]]
_NO_PARAMS: Mapping[str, str] = {}


def _no_route(missing: NoRoute) -> Endpoint:
    """The endpoint of a request no route matched: 404 not_found, or 405 with its Allow."""

    async def answer(_: web.BaseRequest, __: Mapping[str, str]) -> web.StreamResponse:
        if missing.allow is None:
            raise ApiError(404, "not_found", "no such route")
        raise ApiError(
            405, "method_not_allowed", "method not allowed on this route", {"Allow": missing.allow}
        )

    return answer


class ApiServer:
    """The local API as a low-level aiohttp handler: the route table and the per-request work."""

    def __init__(self, callers: Callers, routes: TokenRoutes, metrics: Metrics, clock: Clock):
        self.callers = callers
        self.routes = routes
        self.clock = clock
        self._denied = RateLimitedLog(DENIED_LOG_INTERVAL)
        self._requests = metrics.requests
        # (method, request target) → its route: the target's own string, as sent, is the key.
        self._resolved: dict[tuple[str, str], _Resolved] = {}
        self.router = Router()
        self.router.add("GET", ROUTE_TOKEN, _traced(ROUTE_TOKEN, routes.get_token))
        self.router.add("POST", ROUTE_REFRESH, _traced(ROUTE_REFRESH, routes.refresh))
        self.router.add("POST", ROUTE_PROOF, _traced(ROUTE_PROOF, routes.proof))
        self.router.add("GET", ROUTE_APPS, routes.list_apps)
        self.router.add("GET", ROUTE_OPENAPI, _openapi)
        # [\s\S]: a decoded path may hold a newline (%0A); the proxy refuses it in JSON.
        self.router.add("*", r"/v1/proxy/{app}/{path:[\s\S]*}", routes.forward)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request: route, origin checks, JSON errors, metrics under the template."""
        started = time.perf_counter()
        resolved = self._resolved.get((request.method, request.raw_path))
        if resolved is None:
            resolved = self._resolve(request)
        label, endpoint, params = resolved
        try:
            _check_origin(request)  # first: a relayed request learns nothing, not even a 404
            response = await endpoint(request, params)
        except ApiError as exc:
            response = error_response(exc)
            if exc.status in (401, 403):
                self._log_denied(request, exc.code)
        except Exception:
            log.exception("api.internal_error", route=label)
            response = error_response(ApiError(500, "internal", "internal error"))
        self._requests.observe(
            label,
            request.get(APP_LABEL, ""),
            request.get(CLIENT_LABEL, ""),
            response.status,
            time.perf_counter() - started,
        )
        return response

    def _resolve(self, request: web.BaseRequest) -> _Resolved:
        """Route a request target, remembering the answer for the next identical target."""
        try:
            route, endpoint, params = self.router.resolve(request.method, request.rel_url.path_safe)
            resolved: _Resolved = (route.label, endpoint, params)
        except NoRoute as exc:
            resolved = (ROUTE_OTHER, _no_route(exc), _NO_PARAMS)
        if len(self._resolved) >= MAX_RESOLVED_TARGETS:
            self._resolved.clear()  # bounded: request targets are the caller's choice
        self._resolved[(request.method, request.raw_path)] = resolved
        return resolved

    def _log_denied(self, request: web.BaseRequest, reason: str) -> None:
        peer = self.callers.peer(request.transport)
        where = f"uid:{peer[0]}" if peer is not None else request.remote
        who = request.get(CLIENT_LABEL) or (where or "unknown")
        if self._denied.allow((who, reason), self.clock.monotonic()):
            # Typed as Any: audit's own keyword `level` must not look like it could come from here.
            peer_fields: dict[str, Any] = (
                {"peer_uid": peer[0], "peer_gid": peer[1]} if peer is not None else {}
            )
            audit(
                log,
                "client.denied",
                client=request.get(CLIENT_LABEL) or None,
                remote=request.remote,
                reason=reason,
                app=request.get(APP_LABEL) or None,
                **peer_fields,
            )


async def _openapi(_: web.BaseRequest, __: Mapping[str, str]) -> web.Response:
    """GET /openapi.json (no auth)."""
    return web.json_response(openapi_document())


def api_server_options() -> dict[str, Any]:
    """`web.Server` keyword arguments of the API: small request bodies, no access log."""
    return {"request_factory": _small_request, "access_log": None}


def _traced(route: str, endpoint: Endpoint) -> Endpoint:
    """`endpoint` inside a `token_broker.token` span when traces are on (the caller's W3C
    trace context is its parent); `endpoint` itself when they are off, so the hot path pays
    nothing. Traces are set up before the API is built."""
    if not tracing.enabled():
        return endpoint

    async def traced(request: web.BaseRequest, params: Mapping[str, str]) -> web.StreamResponse:
        with tracing.span(
            "token_broker.token",
            kind="server",
            remote_parent=request.headers,
            app=params.get("app", ""),
            semantic={"http.route": route, "http.request.method": request.method},
        ) as span:
            try:
                response = await endpoint(request, params)
            except ApiError as exc:
                span.set("http.response.status_code", exc.status)
                span.fail(exc.code)
                raise
            span.set("http.response.status_code", response.status)
            # The client's configured name (never its key) once it is authenticated.
            span.set("client", request.get(CLIENT_LABEL, ""))
            return response

    return traced


def _small_request(
    message: Any,
    payload: Any,
    protocol: Any,
    writer: Any,
    task: asyncio.Task[None],
) -> web.BaseRequest:
    """A request whose body may not exceed MAX_REQUEST_BODY (413 beyond)."""
    return web.BaseRequest(
        message,
        payload,
        protocol,
        writer,
        task,
        task.get_loop(),
        client_max_size=MAX_REQUEST_BODY,
    )


def _check_origin(request: web.BaseRequest) -> None:
    """Refuse proxied requests (SSRF) and non-loopback Host headers (DNS rebinding)."""
    check_origin(
        relayed="Forwarded" in request.headers or "X-Forwarded-For" in request.headers,
        host=request.headers.get("Host"),
    )


def check_origin(*, relayed: bool, host: str | None) -> None:
    """The origin checks on a request's parts: 403 `bad_host` for a request relayed by a proxy
    (Forwarded, X-Forwarded-For) or a Host header that is not a loopback name."""
    if relayed:
        raise ApiError(403, "bad_host", "requests relayed by a proxy are refused")
    if not is_loopback_host(host):
        raise ApiError(403, "bad_host", "the Host header is not a loopback name")

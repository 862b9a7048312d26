"""The local HTTP API (tokens for callers in the pod) and the metrics listener.

The API runs on aiohttp's low-level `web.Server` with its own small router (broker/api/routing.py):
no `web.Application`, no middleware, no UrlDispatcher, so a token request costs less CPU than
a bare aiohttp application's. `_Api.__call__` does the per-request work every route shares: the
Host and Forwarded checks, JSON errors (404 and 405 included), and the request metrics. The
serving path logs nothing per request. On the unix socket (`peer_identity`) a caller without a
key is identified by the kernel's peer credentials; over TCP nothing is looked up.

A new route is one `self.router.add(methods, template, endpoint)` line in `_Api.__init__`:
`methods` is a list of methods or `"*"` for all of them, `template` a path such as
`/v1/proxy/{app}/{path:.*}`, and `endpoint` an `async (request, params) -> response`. The
template without its regexes (`/v1/proxy/{app}/{path}`) is the route's `route` metrics label.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from yarl import URL

from broker import tracing
from broker.api.answers import Answer
from broker.api.auth import ClientAuthenticator, PeerCredentials, unauthorized_message
from broker.api.errors import NO_STORE, ApiError, error_response, token_error
from broker.api.openapi import openapi_document
from broker.api.proxy import Proxy, Upstreams, check_method
from broker.api.routing import Endpoint, NoRoute, Router
from broker.clock import Clock
from broker.errors import NeedsAuthorization, RateLimited, StoreUnavailable, TokenUnavailable
from broker.logs import RateLimitedLog, audit, get_logger
from broker.metrics import Metrics
from broker.model import TokenSet
from broker.service import TokenService

if TYPE_CHECKING:
    from broker.dpop import AppDpop

log = get_logger(__name__)

ROUTE_TOKEN = "/v1/token/{app}"
ROUTE_REFRESH = "/v1/token/{app}/refresh"
ROUTE_PROOF = "/v1/token/{app}/proof"
ROUTE_APPS = "/v1/apps"
ROUTE_OPENAPI = "/openapi.json"
MAX_MIN_TTL = 10**9
_MIN_TTL = re.compile(r"^[0-9]{1,10}$")
# Request bodies the API reads whole (none of its token routes takes one beyond a few bytes;
# the proxy streams its bodies under its own limits, see broker/api/proxy.py).
MAX_REQUEST_BODY = 4096
# Request targets whose routing is remembered (then forgotten all at once).
MAX_RESOLVED_TARGETS = 4096
# (presented key, app) pairs whose authorization is remembered: only valid keys are, so the
# table is as large as the config makes it; the bound is a second line of defence.
MAX_GRANTS = 4096
ROUTE_OTHER = "other"
# The proof route's request: an HTTP method token and an absolute http(s) URL, bounded.
_METHOD = re.compile(r"^[A-Za-z]{1,16}$")
MAX_PROOF_URL = 2048
MAX_NONCE = 512
DENIED_LOG_INTERVAL = 60.0

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
        dpop: Mapping[str, AppDpop] | None = None,
    ) -> None:
        self.service = service
        self.auth = authenticator
        self.metrics = metrics
        self.clock = clock
        # The DPoP of each app with `dpop: true` (the composition root's live mapping): its
        # token is never handed out alone, only with a proof (POST /v1/token/{app}/proof).
        self._dpop: Mapping[str, AppDpop] = dpop if dpop is not None else {}
        # Per app: the token whose proofs were issued, and the clients they were issued to.
        self._proofs_issued: dict[str, tuple[TokenSet, set[str]]] = {}
        self.proxy = Proxy(service, upstreams, metrics, self._dpop)
        # Only the unix-socket API reads peer credentials; on TCP nothing is looked up.
        self._peers = PeerCredentials() if peer_identity else None
        # Per app: its current token, the clients it was issued to (token.issued once each),
        # and the serialized answer, reused while the token and its whole seconds left hold.
        self._answers: dict[str, Answer] = {}
        self._denied = RateLimitedLog(DENIED_LOG_INTERVAL)
        self._requests = metrics.requests
        # (Authorization header, app) → client, for callers already authenticated and allowed
        # the app; emptied whenever the client keys or grants change (config reload, rotation).
        self._grants: dict[tuple[str, str], str] = {}
        self._grants_generation = authenticator.generation
        # (method, request target) → its route: the target's own string, as sent, is the key.
        self._resolved: dict[tuple[str, str], _Resolved] = {}
        self.router = Router()
        self.router.add("GET", ROUTE_TOKEN, _traced(ROUTE_TOKEN, self.get_token))
        self.router.add("POST", ROUTE_REFRESH, _traced(ROUTE_REFRESH, self.refresh))
        self.router.add("POST", ROUTE_PROOF, _traced(ROUTE_PROOF, self.proof))
        self.router.add("GET", ROUTE_APPS, self.list_apps)
        self.router.add("GET", ROUTE_OPENAPI, self.openapi)
        # [\s\S]: a decoded path may hold a newline (%0A); the proxy refuses it in JSON.
        self.router.add("*", r"/v1/proxy/{app}/{path:[\s\S]*}", self.forward)

    # ---- the shared per-request work ---------------------------------------------------

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
        peer = self._peers.of(request.transport) if self._peers is not None else None
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

    # ---- helpers -----------------------------------------------------------------------

    def _caller(self, request: web.BaseRequest) -> str:
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
                    unauthorized_message(authorization, peer_identity=self._peers is not None),
                    {"WWW-Authenticate": 'Bearer realm="token-broker"'},
                )
        request[CLIENT_LABEL] = client
        return client

    def _client_and_app(self, request: web.BaseRequest, app: str) -> tuple[str, str]:
        """Authenticate the caller and check it may use `app` (401, 404, 403 otherwise).

        A decision is remembered per presented key and app: a dict lookup on the header's
        string (its hash is salted per process, so a wrong key's lookup times nothing of the
        right one) instead of a SHA-256 and a comparison with every configured key. A caller
        identified by its peer credentials presented no key, so nothing is remembered for it.
        """
        authorization = request.headers.get("Authorization")
        if self._grants_generation != self.auth.generation:
            self._grants.clear()
            self._grants_generation = self.auth.generation
        client = self._grants.get((authorization, app)) if authorization else None
        if client is not None and app in self.service.app_names():
            request[CLIENT_LABEL] = client
            request[APP_LABEL] = app
            return client, app
        client = self._caller(request)
        app = self._app_for(request, client, app)
        if authorization and len(self._grants) < MAX_GRANTS:
            self._grants[(authorization, app)] = client
        return client, app

    def _app_for(self, request: web.BaseRequest, client: str, app: str) -> str:
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

    def _token_response(
        self, request: web.BaseRequest, app: str, client: str, token: TokenSet
    ) -> web.StreamResponse:
        answer = self._answers.get(app)
        if answer is None or answer.token is not token:
            answer = self._answers[app] = Answer(token)
        if client not in answer.issued_to:
            answer.issued_to.add(client)
            audit(log, "token.issued", app=app, client=client, token_fingerprint=token.fingerprint)
        remaining = token.expires_at - self.service.now()
        current = self.service.current_token(app) is token
        if current:
            # By every clock, not the fleet's alone (issue 20, M3): after Redis's clock stepped
            # back, the fleet's says the token lives longer than it does.
            remaining = min(remaining, self.service.remaining(app))
        expires_in = max(0, int(remaining))
        # The service keeps fleet time (the store's clock); a caller compares expires_at with
        # its own clock, which is this pod's, so expires_at is given on the pod's clock.
        expires_at = int(self.clock.time() + remaining)
        until = float("-inf")
        if current:
            # Reused until it stops being servable or expires_in changes (expires_at moves
            # with neither while the clocks run at one pace).
            mono = self.clock.monotonic()
            until = min(self.service.servable_until(app), mono + remaining - expires_in)
        answer.update(expires_in, expires_at, until)
        return answer.response(request)

    async def _serve(
        self,
        request: web.BaseRequest,
        app: str,
        fetch: Callable[[str], Awaitable[TokenSet]],
    ) -> web.StreamResponse:
        client, app = self._client_and_app(request, app)
        self._refuse_bound(app)
        return self._token_response(request, app, client, await self._fetch(app, fetch))

    def _refuse_bound(self, app: str) -> None:
        """A DPoP app's token is useless alone: 409 dpop_bound names the two ways that work."""
        if app in self._dpop:
            raise ApiError(
                409,
                "dpop_bound",
                f"app {app}'s tokens are DPoP-bound (dpop: true) and useless without a proof: "
                f"send requests through /v1/proxy/{app}/..., or POST /v1/token/{app}/proof "
                '{"method": ..., "url": ...} for the token and a proof of one request',
            )

    async def _fetch(self, app: str, fetch: Callable[[str], Awaitable[TokenSet]]) -> TokenSet:
        """`fetch(app)`, its errors mapped to the contract's answers."""
        try:
            return await fetch(app)
        except (NeedsAuthorization, RateLimited, TokenUnavailable, ValueError) as exc:
            raise token_error(exc, app, self.service.status(app).last_error) from None

    # ---- handlers ----------------------------------------------------------------------

    async def get_token(
        self, request: web.BaseRequest, params: Mapping[str, str]
    ) -> web.StreamResponse:
        """GET /v1/token/{app}[?min_ttl=N]."""
        min_ttl = 0.0
        if "?" in request.raw_path and request.query_string:
            raw = request.query.get("min_ttl")
            unknown = set(request.query) - {"min_ttl"}
            if unknown:
                raise ApiError(400, "bad_request", "the only query parameter is min_ttl")
            if raw is None or not _MIN_TTL.match(raw) or int(raw) > MAX_MIN_TTL:
                raise ApiError(400, "bad_request", "min_ttl must be a whole number of seconds")
            min_ttl = float(raw)
        client, app = self._client_and_app(request, params["app"])
        self._refuse_bound(app)
        if not min_ttl:
            # The hot path: this app's answer still holds (see broker/api/answers.py).
            answer = self._answers.get(app)
            if (
                answer is not None
                and self.clock.monotonic() < answer.until
                and self.service.current_token(app) is answer.token
                and client in answer.issued_to
            ):
                return answer.response(request)
        token = self.service.cached_token(app, min_ttl)
        if token is None:
            token = await self._fetch(app, lambda name: self.service.get_token(name, min_ttl))
        return self._token_response(request, app, client, token)

    async def refresh(
        self, request: web.BaseRequest, params: Mapping[str, str]
    ) -> web.StreamResponse:
        """POST /v1/token/{app}/refresh."""
        if request.query:
            raise ApiError(400, "bad_request", "this route takes no query parameters")
        return await self._serve(request, params["app"], self.service.force_refresh)

    async def proof(self, request: web.BaseRequest, params: Mapping[str, str]) -> web.Response:
        """POST /v1/token/{app}/proof: a DPoP app's token with a proof of one request."""
        if request.query:
            raise ApiError(400, "bad_request", "this route takes no query parameters")
        client, app = self._client_and_app(request, params["app"])
        dpop = self._dpop.get(app)
        if dpop is None:
            raise ApiError(
                404,
                "dpop_not_configured",
                f"app {app} has no dpop: true; GET /v1/token/{app} gives its token",
            )
        method, url, nonce = await _proof_request(request)
        token = self.service.cached_token(app)
        if token is None:
            token = await self._fetch(app, self.service.get_token)
        # Imported here: only DPoP apps load broker.dpop.
        from broker.dpop import DpopKeyMissing

        try:
            proof = dpop.proof(
                "proof_api",
                method,
                url,
                jkt=token.dpop_jkt,
                access_token=token.access_token,
                nonce=nonce,
            )
        except DpopKeyMissing as exc:
            raise ApiError(503, "dpop_key_missing", str(exc), {"Retry-After": "5"}) from None
        issued = self._proofs_issued.get(app)
        if issued is None or issued[0] is not token:
            issued = self._proofs_issued[app] = (token, set())
        if client not in issued[1]:
            issued[1].add(client)
            audit(log, "token.issued", app=app, client=client, token_fingerprint=token.fingerprint)
        remaining = token.expires_at - self.service.now()
        if self.service.current_token(app) is token:
            remaining = min(remaining, self.service.remaining(app))
        return web.json_response(
            {
                "access_token": token.access_token,
                "token_type": token.token_type,
                "proof": proof,
                "expires_in": max(0, int(remaining)),
            },
            headers=NO_STORE,
        )

    async def list_apps(self, request: web.BaseRequest, _: Mapping[str, str]) -> web.Response:
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

    async def forward(
        self, request: web.BaseRequest, params: Mapping[str, str]
    ) -> web.StreamResponse:
        """Any method on /v1/proxy/{app}/{path}: sent upstream with the app's token."""
        check_method(request.method)
        _, app = self._client_and_app(request, params["app"])
        return await self.proxy.forward(request, app)

    def _on_pod_clock(self, fleet_time: float | None) -> float | None:
        """A time of the service's (fleet) clock, on this pod's clock, as callers read times."""
        if fleet_time is None:
            return None
        return fleet_time - (self.service.now() - self.clock.time())

    async def openapi(self, _: web.BaseRequest, __: Mapping[str, str]) -> web.Response:
        """GET /openapi.json (no auth)."""
        return web.json_response(openapi_document())


def build_api_handler(
    service: TokenService,
    authenticator: ClientAuthenticator,
    metrics: Metrics,
    clock: Clock,
    upstreams: Upstreams | None = None,
    *,
    peer_identity: bool = False,
    dpop: Mapping[str, AppDpop] | None = None,
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """The local API as a low-level aiohttp handler (serve it with `build_api_server`).
    `upstreams` holds the proxies' pools (none: no proxy). `peer_identity`: it serves a unix
    socket, where callers without a key are identified by their uid and gid. `dpop`: the
    DPoP of each app with `dpop: true`."""
    return _Api(
        service,
        authenticator,
        metrics,
        clock,
        upstreams or Upstreams(),
        peer_identity=peer_identity,
        dpop=dpop,
    )


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


def build_api_server(
    service: TokenService,
    authenticator: ClientAuthenticator,
    metrics: Metrics,
    clock: Clock,
    upstreams: Upstreams | None = None,
    *,
    peer_identity: bool = False,
    dpop: Mapping[str, AppDpop] | None = None,
) -> web.Server:
    """The local API's low-level server (call inside the running event loop); the arguments
    are `build_api_handler`'s."""
    handler = build_api_handler(
        service, authenticator, metrics, clock, upstreams, peer_identity=peer_identity, dpop=dpop
    )
    return web.Server(handler, **api_server_options())


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


def build_metrics_app(
    service: TokenService,
    metrics: Metrics,
    *,
    status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> web.Application:
    """The metrics listener: /metrics, /healthz, /readyz, /readyz/{app}; and /v1/status when
    `status` is given (`server.status_endpoint`)."""

    # Rendered on the event loop: the per-app families keep their series' text (broker/
    # exposition.py), so a scrape at a thousand apps costs a few milliseconds of the loop.
    async def metrics_handler(_: web.Request) -> web.Response:
        response = web.Response(body=metrics.render())
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

    async def readyz_app(request: web.Request) -> web.Response:
        # One app's readiness, required or not: for a probe or a check of a workload that
        # needs only this app (the pod's /readyz waits for every required app).
        name = request.match_info["app"]
        if name not in service.app_names():
            return web.json_response({"status": "unknown_app", "app": name[:64]}, status=404)
        if service.app_ready(name):
            return web.json_response({"status": "ready", "app": name})
        state = service.status(name).state.value
        return web.json_response({"status": "not_ready", "app": name, "state": state}, status=503)

    async def status_handler(_: web.Request) -> web.Response:
        assert status is not None
        try:
            document = await status()
        except StoreUnavailable as exc:
            return web.json_response(
                {"error": "store_unavailable", "message": str(exc)}, status=503
            )
        return web.json_response(document)

    app = web.Application()
    if status is not None:
        app.router.add_get("/v1/status", status_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/readyz/{app}", readyz_app)
    return app


def _check_origin(request: web.BaseRequest) -> None:
    """Refuse proxied requests (SSRF) and non-loopback Host headers (DNS rebinding)."""
    if "Forwarded" in request.headers or "X-Forwarded-For" in request.headers:
        raise ApiError(403, "bad_host", "requests relayed by a proxy are refused")
    if not is_loopback_host(request.headers.get("Host")):
        raise ApiError(403, "bad_host", "the Host header is not a loopback name")


async def _proof_request(request: web.BaseRequest) -> tuple[str, URL, str | None]:
    """The proof route's body: `{"method", "url"[, "nonce"]}` checked (400 otherwise)."""
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413, "payload_too_large", f"the body is limited to {MAX_REQUEST_BODY} bytes"
        ) from None
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        document = None
    if not isinstance(document, dict) or set(document) - {"method", "url", "nonce"}:
        raise ApiError(
            400, "bad_request", 'the body is a JSON object {"method", "url"} (and "nonce")'
        )
    method, raw_url, nonce = document.get("method"), document.get("url"), document.get("nonce")
    if not isinstance(method, str) or not _METHOD.match(method):
        raise ApiError(400, "bad_request", "method must be an HTTP method, like GET")
    url: URL | None = None
    if isinstance(raw_url, str) and len(raw_url) <= MAX_PROOF_URL:
        try:
            url = URL(raw_url)
        except ValueError:
            url = None
    if url is None or url.scheme not in ("http", "https") or not url.host or url.user:
        raise ApiError(
            400,
            "bad_request",
            f"url must be an absolute http(s) URL of at most {MAX_PROOF_URL} "
            "characters, without user information",
        )
    if nonce is not None and (
        not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE or not nonce.isprintable()
    ):
        raise ApiError(400, "bad_request", f"nonce must be text of at most {MAX_NONCE} characters")
    return method.upper(), url, nonce


def _quoted(name: str) -> str:
    """A caller-supplied name, shortened and quoted, to repeat in an error message."""
    return repr(name[:64] + ("..." if len(name) > 64 else ""))


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)

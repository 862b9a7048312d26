"""The caller-facing routes: a token, a forced refresh, a DPoP proof, the caller's apps, the proxy."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web
from yarl import URL

from broker.api.answers import Answer
from broker.api.callers import Callers
from broker.api.errors import NO_STORE, ApiError, token_error
from broker.api.proxy import Proxy, check_method
from broker.clock import Clock
from broker.errors import NeedsAuthorization, RateLimited, TokenUnavailable
from broker.logs import audit, get_logger
from broker.model import TokenSet
from broker.service import TokenService

if TYPE_CHECKING:
    from broker.dpop import AppDpop

log = get_logger(__name__)

MAX_MIN_TTL = 10**9
_MIN_TTL = re.compile(r"^[0-9]{1,10}$")
# Request bodies the API reads whole (none of its token routes takes one beyond a few bytes;
# the proxy streams its bodies under its own limits, see broker/api/proxy.py).
MAX_REQUEST_BODY = 4096
# The proof route's request: an HTTP method token and an absolute http(s) URL, bounded.
_METHOD = re.compile(r"^[A-Za-z]{1,16}$")
MAX_PROOF_URL = 2048
MAX_NONCE = 512


class TokenRoutes:
    """The endpoints that hand out (or use) an app's token, with the answers they reuse."""

    def __init__(
        self,
        service: TokenService,
        callers: Callers,
        clock: Clock,
        proxy: Proxy,
        dpop: Mapping[str, AppDpop],
    ) -> None:
        self.service = service
        self.callers = callers
        self.clock = clock
        self.proxy = proxy
        # The DPoP of each app with `dpop: true` (the composition root's live mapping): its
        # token is never handed out alone, only with a proof (POST /v1/token/{app}/proof).
        self._dpop = dpop
        # Bound once: the hot path calls it on every request.
        self._client_and_app = callers.client_and_app
        # Per app: the token whose proofs were issued, and the clients they were issued to.
        self._proofs_issued: dict[str, tuple[TokenSet, set[str]]] = {}
        # Per app: its current token, the clients it was issued to (token.issued once each),
        # and the serialized answer, reused while the token and its whole seconds left hold.
        self._answers: dict[str, Answer] = {}

    # ---- helpers -----------------------------------------------------------------------

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
        client = self.callers.caller(request)
        apps = []
        for name in sorted(self.callers.auth.apps_of(client) & set(self.service.app_names())):
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


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)

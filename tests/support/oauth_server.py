"""A real OAuth 2.0 authorization server on loopback for integration tests; misbehaves on demand.

Grants: client_credentials, authorization_code (with an /authorize endpoint, PKCE S256, single-use
codes) and refresh_token (rotated on every use; reusing a spent refresh token revokes the whole
grant, as RFC 9700 recommends). Client authentication: client_secret_post, client_secret_basic
(against a set of accepted secrets, for rotation tests) and private_key_jwt (verified with pyjwt);
a workload-identity client_assertion verified against a cluster issuer's JWKS (`federation`),
and tls_client_auth (RFC 8705) over TLS with a required client certificate (`start(tls=...)`).
Access tokens are RS256 JWTs whose keys are published at /jwks; a token can be revoked (as by an
RFC 7009 revocation), so an API checking tokens sees it rejected before it expires. Failures: a
queue of scripted responses, or a persistent mode.

DPoP (RFC 9449) on demand (`dpop = DpopVerifier()`): a token request with a `DPoP` proof is
verified (tests/support/dpop.py) and answered with a DPoP-bound token (`token_type: DPoP`,
`cnf.jkt` in the access token); the grant is bound to the key, and a refresh proved with another
key is refused (`invalid_dpop_proof`, counted). `dpop.require_nonce` makes it ask for nonces
(400 `use_dpop_nonce` with a `DPoP-Nonce` header, which every answer then carries).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlencode

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.dpop import DpopVerifier, InvalidProof
from tests.support.ports import free_port
from tests.support.workload_identity import TOKEN_EXCHANGE, FederationPolicy


@dataclass
class Scripted:
    """One canned answer: status, body, headers, and a delay before answering."""

    status: int = 500
    body: bytes = b'{"error": "server_error"}'
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    content_type: str = "application/json"
    drip: float = 0.0  # seconds between body bytes: a slow-drip answer


@dataclass
class Grant:
    """An authorization grant: its current refresh token, spent ones, and whether it is revoked."""

    grant_id: str
    client_id: str
    scope: str
    current_refresh: str
    spent: set[str] = field(default_factory=set)
    revoked: bool = False
    jkt: str | None = None  # the DPoP key the grant (its refresh tokens) is bound to


@dataclass
class RecordedRequest:
    """What the token endpoint received."""

    form: dict[str, str]
    headers: dict[str, str]
    at: float
    status: int = 0
    client_cert: str | None = None  # the TLS client certificate's common name, if any


class OAuthTestServer:
    """The server. Start with `await start()`; configure through its attributes."""

    def __init__(
        self,
        *,
        client_id: str = "test-client",
        client_secret: str = "test-secret-0123456789-abcdefghij",
        lifetime: float = 60.0,
    ) -> None:
        self.client_id = client_id
        self.accepted_secrets: set[str] = {client_secret}
        self.lifetime = lifetime
        self.refresh_jwt = False  # issue refresh tokens as JWTs instead of opaque strings
        self.issue_refresh_tokens = True  # for authorization_code and refresh_token grants
        self.rotate_refresh_tokens = True
        self.code_lifetime = 300.0
        self.public_key: Any = None  # for private_key_jwt: verify assertions with this key
        self.twilio_errors = False  # answer errors in Twilio's shape
        self.script: list[Scripted] = []
        self.delays: list[float] = []  # delays before answering normally, one per request
        # Delays after issuing, one per request: the rotation is done on receipt, and stands
        # even when the client gives up and disconnects during the delay.
        self.post_delays: list[float] = []
        self.mode: Scripted | None = None  # answered to every request until cleared
        # Statuses answered to the next refresh-token requests after rotating (the server acted,
        # then failed while rendering its answer), one per request.
        self.fail_after_rotating: list[int] = []
        self.requests: list[RecordedRequest] = []
        self.grants: dict[str, Grant] = {}
        self.reuse_detected = 0
        self.issued_tokens: list[str] = []
        self.expiry: dict[str, float] = {}  # access token -> when this server considers it expired
        self.revoked: set[str] = set()  # jti of revoked access tokens
        self.key_id = uuid.uuid4().hex[:16]
        self._refresh_index: dict[str, str] = {}
        self._codes: dict[str, dict[str, Any]] = {}
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self._seen_jti: set[str] = set()
        # DPoP: None ignores DPoP headers (bearer tokens, as before).
        self.dpop: DpopVerifier | None = None
        self.dpop_refused: list[str] = []  # why each DPoP token request was refused
        self.wrong_key_refreshes = 0  # refreshes proved with a key the grant is not bound to
        self._jkt: str | None = None  # the key of the request being answered
        self._awaiting: list[tuple[str | None, asyncio.Future[RecordedRequest]]] = []
        # Workload identity: client assertions are checked against this trust (issue 23).
        self.federation: FederationPolicy | None = None
        # tls_client_auth: the client certificate common names accepted (None: not this method).
        self.tls_client_names: set[str] | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self, port: int = 0, *, tls: ssl.SSLContext | None = None) -> str:
        """Listen on 127.0.0.1 (any free port by default), over TLS with `tls`; the base URL."""
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_get("/authorize", self._authorize)
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=tls).start()
        except BaseException:
            await self.stop()
            raise
        scheme = "https" if tls is not None else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.base_url

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def token_url(self) -> str:
        """The token endpoint."""
        return f"{self.base_url}/token"

    @property
    def jwks_url(self) -> str:
        """The JSON Web Key Set of the access tokens' signing key."""
        return f"{self.base_url}/jwks"

    @property
    def authorize_url(self) -> str:
        """The authorization endpoint."""
        return f"{self.base_url}/authorize"

    # ---- what tests look at ------------------------------------------------------------

    def count(self, grant_type: str | None = None) -> int:
        """Token requests received (of one grant type, or all)."""
        return sum(
            1 for r in self.requests if grant_type is None or r.form.get("grant_type") == grant_type
        )

    def successes(self) -> int:
        """Token requests answered 200."""
        return sum(1 for r in self.requests if r.status == 200)

    def expect_request(self, grant_type: str | None = None) -> asyncio.Future[RecordedRequest]:
        """A future set when the next token request (of `grant_type`, or any) is received,
        before it is answered or delayed: a test acts at that moment instead of polling."""
        future: asyncio.Future[RecordedRequest] = asyncio.get_running_loop().create_future()
        self._awaiting.append((grant_type, future))
        return future

    def fail_next(self, n: int = 1, **kwargs: Any) -> None:
        """Answer the next `n` requests with the given Scripted answer."""
        self.script.extend(Scripted(**kwargs) for _ in range(n))

    def verify_access_token(self, token: str) -> dict[str, Any]:
        """Verify one of our access tokens (signature and exp); returns its claims."""
        claims: dict[str, Any] = jwt.decode(
            token, self._signing_key.public_key(), algorithms=["RS256"], audience="api"
        )
        return claims

    def revoke(self, access_token: str) -> None:
        """Revoke an access token: APIs that check with this server reject it from now on."""
        self.revoked.add(jwt.decode(access_token, options={"verify_signature": False})["jti"])

    def is_revoked(self, claims: dict[str, Any]) -> bool:
        """True when the token with these (verified) claims was revoked."""
        return claims.get("jti") in self.revoked

    # ---- endpoints ---------------------------------------------------------------------

    async def _jwks(self, _: web.Request) -> web.Response:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self._signing_key.public_key(), as_dict=True)
        return web.json_response({"keys": [{**jwk, "kid": self.key_id, "alg": "RS256"}]})

    async def _authorize(self, request: web.Request) -> web.Response:
        """Consent is automatic: redirect to redirect_uri with a single-use code and the state."""
        q = request.query
        if q.get("client_id") != self.client_id or q.get("response_type") != "code":
            return web.json_response({"error": "invalid_request"}, status=400)
        code = secrets.token_urlsafe(24)
        self._codes[code] = {
            "redirect_uri": q.get("redirect_uri"),
            "challenge": q.get("code_challenge"),
            "method": q.get("code_challenge_method"),
            "scope": q.get("scope", ""),
            "expires": time.time() + self.code_lifetime,
        }
        params = {"code": code}
        if "state" in q:
            params["state"] = q["state"]
        raise web.HTTPFound(f"{q.get('redirect_uri')}?{urlencode(params)}")

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        record = RecordedRequest(
            form=form,
            headers=dict(request.headers),
            at=time.time(),
            client_cert=_peer_common_name(request),
        )
        self.requests.append(record)
        for entry in list(self._awaiting):
            grant_type, future = entry
            if grant_type is None or form.get("grant_type") == grant_type:
                self._awaiting.remove(entry)
                if not future.done():
                    future.set_result(record)
        if self.delays:
            await asyncio.sleep(self.delays.pop(0))
        canned = self.script.pop(0) if self.script else self.mode
        if canned is not None:
            if canned.delay:
                await asyncio.sleep(canned.delay)
            record.status = canned.status
            if canned.drip:
                stream = web.StreamResponse(status=canned.status, headers=canned.headers)
                stream.content_type = canned.content_type
                await stream.prepare(request)
                for byte in canned.body:
                    await stream.write(bytes([byte]))
                    await asyncio.sleep(canned.drip)
                await stream.write_eof()
                return stream
            return web.Response(
                body=canned.body,
                status=canned.status,
                headers=canned.headers,
                content_type=canned.content_type,
            )
        response = self._answer(request, form)
        if (
            self.fail_after_rotating
            and form.get("grant_type") == "refresh_token"
            and response.status == 200
        ):
            response = self._error(self.fail_after_rotating.pop(0), "server_error", 320001)
        record.status = response.status
        if self.post_delays:
            await asyncio.sleep(self.post_delays.pop(0))
        return response

    def _answer(self, request: web.Request, form: dict[str, str]) -> web.Response:
        if form.get("grant_type") == TOKEN_EXCHANGE and self.federation is not None:
            # RFC 8693 as Google STS does it: the subject token is the only credential.
            if self.federation.check(form) is not None:
                return self._error(400, "invalid_grant", 322403)
            return self._issue(form.get("scope", ""), refresh=None)
        client_error = self._authenticate(request, form)
        if client_error is not None:
            return client_error
        self._jkt = None
        if self.dpop is not None and "DPoP" in request.headers:
            try:
                self._jkt = self.dpop.verify(request.headers["DPoP"], "POST", self.token_url)
            except InvalidProof as exc:
                self.dpop_refused.append(str(exc))
                return self._dpop_error(exc.error)
        grant_type = form.get("grant_type")
        if grant_type == "client_credentials":
            return self._issue(form.get("scope", ""), refresh=None)
        if grant_type == "authorization_code":
            return self._exchange_code(form)
        if grant_type == "refresh_token":
            return self._refresh(form)
        return self._error(400, "unsupported_grant_type", 321403)

    def _authenticate(self, request: web.Request, form: dict[str, str]) -> web.Response | None:
        if self.federation is not None and form.get("client_assertion_type"):
            if form.get("client_id", self.client_id) != self.client_id:
                return self._error(401, "invalid_client", 322402)
            if self.federation.check(form) is not None:
                return self._error(401, "invalid_client", 322402)
            return None
        if self.tls_client_names is not None:
            if form.get("client_id") != self.client_id:
                return self._error(400, "invalid_request", 321402)
            if _peer_common_name(request) not in self.tls_client_names:
                return self._error(401, "invalid_client", 322402)
            return None
        if form.get("client_assertion_type"):
            return self._check_assertion(form.get("client_assertion", ""))
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            raw = base64.b64decode(header[6:]).decode()
            client_id, _, secret = raw.partition(":")
            client_id, secret = unquote(client_id), unquote(secret)
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if not client_id:
            return self._error(400, "invalid_request", 321402)
        if client_id != self.client_id or secret not in self.accepted_secrets:
            return self._error(401, "invalid_client", 322402)
        return None

    def _check_assertion(self, assertion: str) -> web.Response | None:
        if self.public_key is None:
            return self._error(401, "invalid_client", 322402)
        try:
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=["RS256", "ES256"],
                audience=self.token_url,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.PyJWTError:
            return self._error(401, "invalid_client", 322402)
        if claims["iss"] != self.client_id or claims["sub"] != self.client_id:
            return self._error(401, "invalid_client", 322402)
        if claims["jti"] in self._seen_jti:
            return self._error(401, "invalid_client", 322402)
        self._seen_jti.add(claims["jti"])
        return None

    def _exchange_code(self, form: dict[str, str]) -> web.Response:
        code = self._codes.pop(form.get("code", ""), None)
        if code is None or code["expires"] < time.time():
            return self._error(400, "invalid_grant", 322403)
        if code["redirect_uri"] != form.get("redirect_uri"):
            return self._error(400, "invalid_grant", 322403)
        if code["challenge"]:
            verifier = form.get("code_verifier", "")
            digest = hashlib.sha256(verifier.encode()).digest()
            expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
            if expected != code["challenge"]:
                return self._error(400, "invalid_grant", 322403)
        if not self.issue_refresh_tokens:
            return self._issue(code["scope"], refresh=None)
        grant = Grant(uuid.uuid4().hex, self.client_id, code["scope"], "", jkt=self._jkt)
        self.grants[grant.grant_id] = grant
        return self._issue(code["scope"], refresh=grant)

    def _refresh(self, form: dict[str, str]) -> web.Response:
        presented = form.get("refresh_token", "")
        grant_id = self._refresh_index.get(presented)
        grant = self.grants.get(grant_id) if grant_id else None
        if grant is None or grant.revoked:
            return self._error(400, "invalid_grant", 322403)
        if grant.jkt is not None and self._jkt != grant.jkt:
            # RFC 9449 §5: a bound refresh token is proved with its key; not used up.
            self.wrong_key_refreshes += 1
            return self._dpop_error("invalid_dpop_proof")
        if presented != grant.current_refresh:
            # A spent refresh token came back: someone replayed it. Revoke the grant (RFC 9700).
            grant.revoked = True
            self.reuse_detected += 1
            return self._error(400, "invalid_grant", 322403)
        if self.rotate_refresh_tokens:
            grant.spent.add(presented)
            return self._issue(grant.scope, refresh=grant)
        return self._issue(grant.scope, refresh=None)

    def _issue(self, scope: str, *, refresh: Grant | None) -> web.Response:
        now = time.time()
        claims = {
            "iss": "oauth-test-server",
            "sub": self.client_id,
            "aud": "api",
            "iat": int(now),
            "exp": int(now + self.lifetime) + 1,
            "jti": uuid.uuid4().hex,
            "scope": scope,
        }
        if self._jkt is not None:
            claims["cnf"] = {"jkt": self._jkt}
        access = jwt.encode(
            claims, self._signing_key, algorithm="RS256", headers={"kid": self.key_id}
        )
        self.issued_tokens.append(access)
        self.expiry[access] = now + self.lifetime
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "DPoP" if self._jkt is not None else "Bearer",
            "expires_in": self.lifetime,
            "scope": scope,
            "id_token": None,
            "refresh_token": None,
        }
        if refresh is not None:
            new_refresh = self._new_refresh_token(refresh)
            refresh.current_refresh = new_refresh
            self._refresh_index[new_refresh] = refresh.grant_id
            body["refresh_token"] = new_refresh
        headers = {"Cache-Control": "no-store"}
        if self.dpop is not None and self.dpop.require_nonce:
            headers["DPoP-Nonce"] = self.dpop.nonce
        return web.json_response(body, headers=headers)

    def _dpop_error(self, error: str) -> web.Response:
        """RFC 9449 §8: a refused proof is 400; a missing nonce names the one to use."""
        headers = {}
        if error == "use_dpop_nonce" and self.dpop is not None:
            headers["DPoP-Nonce"] = self.dpop.nonce
        body = {"error": error, "error_description": error.replace("_", " ")}
        return web.json_response(body, status=400, headers=headers)

    def _new_refresh_token(self, grant: Grant) -> str:
        if self.refresh_jwt:
            return jwt.encode(
                {"grant": grant.grant_id, "jti": uuid.uuid4().hex, "iat": int(time.time())},
                self._signing_key,
                algorithm="RS256",
            )
        return "rt-" + secrets.token_urlsafe(32)

    def _error(self, status: int, error: str, twilio_code: int) -> web.Response:
        if self.twilio_errors:
            body: dict[str, Any] = {
                "code": twilio_code,
                "message": error.replace("_", " "),
                "more_info": f"https://www.twilio.com/docs/errors/{twilio_code}",
                "status": status,
            }
        else:
            body = {"error": error, "error_description": error.replace("_", " ")}
        return web.json_response(body, status=status)


def _peer_common_name(request: web.Request) -> str | None:
    """The common name of the TLS client certificate (verified by the server's context)."""
    peer = request.transport.get_extra_info("peercert") if request.transport else None
    if not peer:
        return None
    for rdn in peer.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


@pytest.fixture
async def oauth_server() -> AsyncIterator[OAuthTestServer]:
    """A running OAuthTestServer with 60 s tokens (tests set `lifetime` as they need), on a port
    reserved for this run (tests/support/ports), so a test that stops it and starts it again on
    the same port finds the port still its own."""
    server = OAuthTestServer()
    await server.start(port=free_port())
    try:
        yield server
    finally:
        await server.stop()

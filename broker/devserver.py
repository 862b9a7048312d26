"""A small, real OAuth 2.0 authorization server for `token-broker dev`: every grant the broker uses.

It issues HS256-signed JWT access tokens of a fixed lifetime, authenticates the client with
client_secret_post or client_secret_basic, and answers errors in RFC 6749 §5.2 form. Grants:
client_credentials; authorization_code, from `/authorize` (consent is automatic: dev mode) with
`state` and a PKCE S256 challenge required, single-use codes bound to the redirect URI; and
refresh_token, rotated on every use, where presenting a spent refresh token revokes the whole
grant (reuse detection, RFC 9700 §4.14). `/callback` is the registered redirect URI: it shows
the URL to paste into `token-broker authorize`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import NoReturn
from urllib.parse import unquote, urlencode

import jwt
from aiohttp import web

# How long an authorization code may be exchanged (RFC 6749 §4.1.2 recommends ten minutes at
# most; `token-broker authorize` tells the operator five).
CODE_LIFETIME = 300.0


@dataclass
class _Code:
    """An issued authorization code: what its exchange must match."""

    redirect_uri: str
    challenge: str
    scope: str
    expires: float


@dataclass
class _Grant:
    """An authorization grant: its one live refresh token and those already spent."""

    scope: str
    current: str
    spent: set[str] = field(default_factory=set)
    revoked: bool = False


class DevOAuthServer:
    """An authorization server on loopback that serves one client."""

    def __init__(self, *, client_id: str, client_secret: str, lifetime: float = 60.0) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.lifetime = lifetime
        self.signing_key = secrets.token_bytes(32)
        self.issued = 0
        self.reuse_detected = 0
        self._codes: dict[str, _Code] = {}
        self._grants: dict[str, _Grant] = {}  # grant id -> grant
        self._refresh_index: dict[str, str] = {}  # refresh token -> grant id
        self._runner: web.AppRunner | None = None
        self.token_url = ""
        self.base_url = ""

    @property
    def authorize_url(self) -> str:
        """The authorization endpoint."""
        return f"{self.base_url}/authorize"

    @property
    def redirect_uri(self) -> str:
        """The one registered redirect URI: a page showing what to paste."""
        return f"{self.base_url}/callback"

    def app(self) -> web.Application:
        """The aiohttp application (POST /token, GET /authorize, GET /callback)."""
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_get("/authorize", self.authorize)
        app.router.add_get("/callback", self.callback)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on `host:port` (0: any free port); returns the token URL."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound_port}"
        self.token_url = f"{self.base_url}/token"
        return self.token_url

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _client_from(self, request: web.Request, form: dict[str, str]) -> tuple[str, str]:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                raw = base64.b64decode(header[6:], validate=True).decode()
            except ValueError:
                return "", ""
            client_id, _, secret = raw.partition(":")
            return unquote(client_id), unquote(secret)
        return form.get("client_id", ""), form.get("client_secret", "")

    async def authorize(self, request: web.Request) -> web.Response:
        """The authorization endpoint: consent is automatic (dev mode); redirects with a code.

        Errors about the client or the redirect URI are shown, never redirected (RFC 6749
        §4.1.2.1): a redirect would go to an address the client did not register.
        """
        q = request.query
        if q.get("client_id") != self.client_id:
            return _page(400, "unknown client_id")
        if q.get("redirect_uri") != self.redirect_uri:
            return _page(400, f"redirect_uri must be {self.redirect_uri}")
        state = q.get("state", "")
        if q.get("response_type") != "code":
            return _redirect(self.redirect_uri, error="unsupported_response_type", state=state)
        if not state:
            return _redirect(self.redirect_uri, error="invalid_request", state="")
        challenge = q.get("code_challenge", "")
        if not challenge or q.get("code_challenge_method") != "S256":
            # PKCE is required: a stolen code is useless without the verifier.
            return _redirect(self.redirect_uri, error="invalid_request", state=state)
        code = secrets.token_urlsafe(24)
        self._codes[code] = _Code(
            redirect_uri=self.redirect_uri,
            challenge=challenge,
            scope=q.get("scope", ""),
            expires=time.time() + CODE_LIFETIME,
        )
        return _redirect(self.redirect_uri, code=code, state=state)

    async def callback(self, request: web.Request) -> web.Response:
        """The registered redirect URI: shows the URL to paste into `token-broker authorize`."""
        url = html.escape(str(request.url))
        body = (
            "<!doctype html><title>token-broker dev</title><h1>Approved (dev mode)</h1>"
            "<p>Paste this whole URL into <code>token-broker authorize</code>:</p>"
            f"<pre>{url}</pre>"
        )
        return web.Response(
            text=body, content_type="text/html", headers={"Cache-Control": "no-store"}
        )

    async def token(self, request: web.Request) -> web.Response:
        """The token endpoint: client_credentials, authorization_code and refresh_token."""
        form = {k: str(v) for k, v in (await request.post()).items()}
        client_id, secret = self._client_from(request, form)
        if not (
            hmac.compare_digest(client_id.encode(), self.client_id.encode())
            and hmac.compare_digest(secret.encode(), self.client_secret.encode())
        ):
            return _error(401, "invalid_client", "client authentication failed")
        grant_type = form.get("grant_type")
        if grant_type == "client_credentials":
            return self._issue(client_id, form.get("scope", ""), grant_id=None)
        if grant_type == "authorization_code":
            return self._exchange_code(client_id, form)
        if grant_type == "refresh_token":
            return self._refresh(client_id, form)
        return _error(
            400, "unsupported_grant_type", "client_credentials, authorization_code or refresh_token"
        )

    def _exchange_code(self, client_id: str, form: dict[str, str]) -> web.Response:
        code = self._codes.pop(form.get("code", ""), None)  # single use, even when refused
        if code is None or code.expires < time.time():
            return _error(400, "invalid_grant", "unknown, used or expired code")
        if form.get("redirect_uri") != code.redirect_uri:
            return _error(400, "invalid_grant", "redirect_uri does not match")
        if not hmac.compare_digest(s256(form.get("code_verifier", "")), code.challenge):
            return _error(400, "invalid_grant", "PKCE verification failed")
        grant_id = uuid.uuid4().hex
        self._grants[grant_id] = _Grant(scope=code.scope, current="")
        return self._issue(client_id, code.scope, grant_id=grant_id)

    def _refresh(self, client_id: str, form: dict[str, str]) -> web.Response:
        presented = form.get("refresh_token", "")
        grant_id = self._refresh_index.get(presented)
        grant = self._grants.get(grant_id) if grant_id is not None else None
        if grant_id is None or grant is None or grant.revoked:
            return _error(400, "invalid_grant", "unknown or revoked refresh token")
        if presented != grant.current:
            # A spent refresh token came back: someone replayed it. Revoke the whole grant.
            grant.revoked = True
            self.reuse_detected += 1
            return _error(400, "invalid_grant", "refresh token reused: the grant is revoked")
        grant.spent.add(presented)
        return self._issue(client_id, grant.scope, grant_id=grant_id)

    def _issue(self, client_id: str, scope: str, *, grant_id: str | None) -> web.Response:
        """A new access token; with a grant, also its next refresh token (rotation)."""
        now = int(time.time())
        claims = {
            "iss": "token-broker-dev",
            "sub": client_id,
            "iat": now,
            "exp": now + int(self.lifetime),
            "jti": uuid.uuid4().hex,
            "scope": scope,
        }
        refresh_token = None
        if grant_id is not None:
            refresh_token = "dev-rt-" + secrets.token_urlsafe(32)
            self._grants[grant_id].current = refresh_token
            self._refresh_index[refresh_token] = grant_id
        self.issued += 1
        return web.json_response(
            {
                "access_token": jwt.encode(claims, self.signing_key, algorithm="HS256"),
                "token_type": "Bearer",
                "expires_in": int(self.lifetime),
                "scope": scope,
                "refresh_token": refresh_token,
                "id_token": None,
            },
            headers={"Cache-Control": "no-store"},
        )

    def verify(self, access_token: str) -> dict[str, object] | None:
        """The claims of an access token this server issued and that has not expired, or None."""
        try:
            claims: dict[str, object] = jwt.decode(
                access_token, self.signing_key, algorithms=["HS256"], issuer="token-broker-dev"
            )
        except jwt.PyJWTError:
            return None
        return claims


def s256(verifier: str) -> str:
    """The PKCE S256 challenge of `verifier` (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _redirect(uri: str, **params: str) -> NoReturn:
    """Redirect the browser to `uri` with `params` (the code and state, or an error)."""
    raise web.HTTPFound(f"{uri}?{urlencode({k: v for k, v in params.items() if v})}")


def _page(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=f"token-broker dev: {message}\n")


def _error(status: int, error: str, description: str) -> web.Response:
    return web.json_response(
        {"error": error, "error_description": description},
        status=status,
        headers={"Cache-Control": "no-store"},
    )

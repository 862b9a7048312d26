"""A small, real OAuth 2.0 authorization server for `token-broker dev` (client credentials).

It issues HS256-signed JWT access tokens of a fixed lifetime, authenticates the client with
client_secret_post or client_secret_basic, and answers errors in RFC 6749 §5.2 form.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import time
import uuid
from urllib.parse import unquote

import jwt
from aiohttp import web


class DevOAuthServer:
    """A token endpoint on loopback that serves one client."""

    def __init__(self, *, client_id: str, client_secret: str, lifetime: float = 60.0) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.lifetime = lifetime
        self.signing_key = secrets.token_bytes(32)
        self.issued = 0
        self._runner: web.AppRunner | None = None
        self.token_url = ""

    def app(self) -> web.Application:
        """The aiohttp application (POST /token)."""
        app = web.Application()
        app.router.add_post("/token", self.token)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on `host:port` (0: any free port); returns the token URL."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        self.token_url = f"http://{host}:{bound_port}/token"
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

    async def token(self, request: web.Request) -> web.Response:
        """The token endpoint."""
        form = {k: str(v) for k, v in (await request.post()).items()}
        client_id, secret = self._client_from(request, form)
        if not (
            hmac.compare_digest(client_id.encode(), self.client_id.encode())
            and hmac.compare_digest(secret.encode(), self.client_secret.encode())
        ):
            return _error(401, "invalid_client", "client authentication failed")
        if form.get("grant_type") != "client_credentials":
            return _error(400, "unsupported_grant_type", "only client_credentials")
        now = int(time.time())
        scope = form.get("scope", "")
        claims = {
            "iss": "token-broker-dev",
            "sub": client_id,
            "iat": now,
            "exp": now + int(self.lifetime),
            "jti": uuid.uuid4().hex,
            "scope": scope,
        }
        self.issued += 1
        return web.json_response(
            {
                "access_token": jwt.encode(claims, self.signing_key, algorithm="HS256"),
                "token_type": "Bearer",
                "expires_in": int(self.lifetime),
                "scope": scope,
                "refresh_token": None,
                "id_token": None,
            },
            headers={"Cache-Control": "no-store"},
        )


def _error(status: int, error: str, description: str) -> web.Response:
    return web.json_response(
        {"error": error, "error_description": description},
        status=status,
        headers={"Cache-Control": "no-store"},
    )

"""A real API behind the injecting proxy: aiohttp over TLS (a trustme test CA) on loopback.

It accepts a request only with a bearer JWT that verifies against the test authorization
server's JWKS (fetched over HTTP at start), has not expired and was not revoked; otherwise 401
with `WWW-Authenticate`. It records every request it receives, so tests can count what was
forwarded and look at the headers the broker sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import trustme
from aiohttp import web

from tests.support.oauth_server import OAuthTestServer
from tests.support.ports import free_port

# The bytes the download endpoint streams: a repeated pattern, so the client can check them.
PATTERN = bytes(range(256)) * 256


def pattern_digest(size: int) -> str:
    """SHA-256 of the first `size` bytes of the repeated pattern."""
    digest = hashlib.sha256()
    full, rest = divmod(size, len(PATTERN))
    for _ in range(full):
        digest.update(PATTERN)
    digest.update(PATTERN[:rest])
    return digest.hexdigest()


@dataclass
class Hit:
    """One request the upstream received."""

    method: str
    raw_path: str
    headers: dict[str, str]
    status: int = 0


class UpstreamServer:
    """The API. Start with `await start()`; `reject_next` forces 401s for the next requests."""

    def __init__(self, oauth: OAuthTestServer, ca: trustme.CA) -> None:
        self.oauth = oauth
        self.ca = ca
        self.hits: list[Hit] = []
        self.reject_next = 0
        self._keys: dict[str, Any] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The origin, as the broker's `proxy.upstream` names it."""
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> str:
        """Fetch the JWKS, then listen over TLS on a reserved loopback port (tests/support/ports:
        a test that stops the upstream knows no other run will take its port); returns the
        origin."""
        async with aiohttp.ClientSession() as session:
            async with session.get(self.oauth.jwks_url) as response:
                jwks = await response.json()
        self._keys = {key["kid"]: jwt.PyJWK(key).key for key in jwks["keys"]}
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        app = web.Application(middlewares=[self._authenticate], client_max_size=1024**2)
        app.router.add_get("/v1/items/{id}", self._item)
        app.router.add_post("/v1/items", self._create)
        app.router.add_put("/v1/upload", self._upload)
        app.router.add_get("/v1/download", self._download)
        app.router.add_get("/v1/slow", self._slow)
        app.router.add_get("/v1/error", self._error)
        app.router.add_get("/v1/redirect", self._redirect)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = self.port or free_port()
        try:
            await web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=context).start()
        except BaseException:
            await self.stop()
            raise
        self.port = port
        return self.url

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def statuses(self) -> list[int]:
        """The status of every request answered so far, in order."""
        return [hit.status for hit in self.hits]

    # ---- authentication ----------------------------------------------------------------

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        hit = Hit(request.method, request.raw_path, dict(request.headers))
        self.hits.append(hit)
        response: web.StreamResponse
        problem = self._check_bearer(request.headers.get("Authorization", ""))
        if self.reject_next > 0:
            self.reject_next -= 1
            problem = "rejected by the test"
        if problem is not None:
            response = web.json_response(
                {"error": "invalid_token", "detail": problem},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        else:
            response = await handler(request)
        hit.status = response.status
        return response

    def _check_bearer(self, header: str) -> str | None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "no bearer token"
        try:
            kid = jwt.get_unverified_header(token).get("kid", "")
            claims = jwt.decode(token, self._keys[kid], algorithms=["RS256"], audience="api")
        except (jwt.PyJWTError, KeyError):
            return "invalid or expired token"
        if self.oauth.is_revoked(claims):
            return "revoked token"
        return None

    # ---- endpoints ---------------------------------------------------------------------

    async def _item(self, request: web.Request) -> web.Response:
        raw_query = request.raw_path.partition("?")[2]
        return web.json_response({"id": request.match_info["id"], "query": raw_query})

    async def _create(self, request: web.Request) -> web.Response:
        return web.json_response({"created": await request.json()}, status=201)

    async def _upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        sent = 0
        while sent < size:
            chunk = PATTERN[: min(len(PATTERN), size - sent)]
            await response.write(chunk)
            sent += len(chunk)
        await response.write_eof()
        return response

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query["seconds"]))
        return web.json_response({"slow": True})

    async def _error(self, _: web.Request) -> web.Response:
        return web.json_response({"upstream": "broken"}, status=500)

    async def _redirect(self, _: web.Request) -> web.Response:
        # Returned, not raised: a raised HTTPFound would pass the middleware unrecorded (status 0).
        return web.Response(status=302, headers={"Location": "https://elsewhere.invalid/landing"})

    async def _echo(self, request: web.Request) -> web.Response:
        return web.json_response({"method": request.method, "raw_path": request.raw_path})


@pytest.fixture
def test_ca() -> trustme.CA:
    """A throwaway certificate authority for the upstream's TLS."""
    return trustme.CA()


@pytest.fixture
def ca_file(test_ca: trustme.CA, tmp_path: Path) -> Path:
    """The test CA's certificate as a PEM file (what `proxy.ca_file` names)."""
    path = tmp_path / "upstream-ca.pem"
    test_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def upstream(
    oauth_server: OAuthTestServer, test_ca: trustme.CA
) -> AsyncIterator[UpstreamServer]:
    """A running UpstreamServer that trusts the test authorization server's tokens."""
    server = UpstreamServer(oauth_server, test_ca)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()

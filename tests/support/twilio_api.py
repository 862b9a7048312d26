"""A local stand-in for a Twilio API host (api.twilio.com, messaging.twilio.com, ...).

Plain HTTP on loopback (a proxy upstream may be http there). It records every request (method,
raw path, headers, form body) and answers `POST /2010-04-01/Accounts/{sid}/Messages.json` as
Twilio does (201 and a message resource), `GET /v1/Services` with an empty page, and anything
else with 404 in Twilio's error shape. It checks no token itself: the tests compare the
`Authorization` it received with the token the broker serves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import parse_qsl

import pytest
from aiohttp import web

from tests.support.ports import free_port


@dataclass
class TwilioHit:
    """One request the stand-in received."""

    method: str
    raw_path: str
    headers: dict[str, str]
    form: list[tuple[str, str]]


class TwilioStandIn:
    """One Twilio host. `name` is the product (`api`, `messaging`) it answers for."""

    def __init__(self, name: str = "api") -> None:
        self.name = name
        self.hits: list[TwilioHit] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The origin, as a broker's proxy upstream names it."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> str:
        """Listen on a free loopback port; returns the origin."""
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._create_message)
        app.router.add_get("/v1/Services", self._services)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self.url

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _record(self, request: web.Request) -> TwilioHit:
        body = await request.read()
        form = parse_qsl(body.decode(), keep_blank_values=True) if body else []
        hit = TwilioHit(request.method, request.raw_path, dict(request.headers), form)
        self.hits.append(hit)
        return hit

    async def _create_message(self, request: web.Request) -> web.Response:
        hit = await self._record(request)
        form = dict(hit.form)
        sid = request.match_info["sid"]
        return web.json_response(
            {
                "sid": "SM" + "0" * 32,
                "account_sid": sid,
                "to": form.get("To"),
                "from": form.get("From"),
                "body": form.get("Body"),
                "status": "queued",
                "num_segments": "1",
                "direction": "outbound-api",
                "api_version": "2010-04-01",
                "uri": f"/2010-04-01/Accounts/{sid}/Messages/SM{'0' * 32}.json",
            },
            status=201,
        )

    async def _services(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            {"services": [], "meta": {"key": "services", "page": 0, "page_size": 50}}
        )

    async def _not_found(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            {"code": 20404, "message": "The requested resource was not found", "status": 404},
            status=404,
        )


@pytest.fixture
async def twilio_api() -> AsyncIterator[TwilioStandIn]:
    """A running stand-in for api.twilio.com."""
    server = TwilioStandIn("api")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def messaging_api() -> AsyncIterator[TwilioStandIn]:
    """A running stand-in for messaging.twilio.com."""
    server = TwilioStandIn("messaging")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()

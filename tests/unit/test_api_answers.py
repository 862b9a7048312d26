"""The token route's reused answers (broker/api/answers.py): what is reused, until when, and
that a prebuilt answer is the same HTTP message aiohttp writes for a plain `web.Response`."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer, TestClient
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from broker.api import ApiDependencies, build_api
from broker.api.answers import TOKEN_HEADERS, Answer, PrebuiltResponse
from broker.api.auth import ClientAuthenticator
from broker.api.server import api_server_options
from broker.metrics import Metrics
from broker.model import ClientSpec, TokenSet
from tests.support.fake_clock import FakeClock
from tests.support.fakes import NOW, FakeTokenService

KEY_A = "answers-client-key-a-" + "a" * 32
KEY_B = "answers-client-key-b-" + "b" * 32

Client = TestClient[Any, Any]


def token(name: str, expires_at: float = NOW + 3000.5) -> TokenSet:
    """A token set whose access token names it."""
    return TokenSet(f"access-{name}-" + "t" * 24, "Bearer", NOW - 600, expires_at, "read")


@pytest.fixture
def service(fake_clock: FakeClock) -> FakeTokenService:
    """app1 on the fake clock: a settable token and serving deadline, its full checks counted."""
    return FakeTokenService({"app1": token("one")}, clock=fake_clock)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def api(
    aiohttp_client: AiohttpClient,
    service: FakeTokenService,
    metrics: Metrics,
    fake_clock: FakeClock,
) -> Client:
    authenticator = ClientAuthenticator(
        {
            name: ClientSpec(
                name, ("app1",), key_sha256=(hashlib.sha256(key.encode()).hexdigest(),)
            )
            for name, key in (("alpha", KEY_A), ("beta", KEY_B))
        }
    )
    handler = build_api(ApiDependencies(service, authenticator, metrics, fake_clock))
    return await aiohttp_client(RawTestServer(handler), server_kwargs=api_server_options())


async def get(api: Client, key: str = KEY_A) -> tuple[int, dict[str, Any]]:
    response = await api.get("/v1/token/app1", headers={"Authorization": f"Bearer {key}"})
    return response.status, await response.json()


class TestReuse:
    async def test_reused_within_the_whole_second(
        self, api: Client, service: FakeTokenService, fake_clock: FakeClock
    ) -> None:
        """Within one whole second of expires_in, the answer is reused without a full check."""
        first = await get(api)
        await fake_clock.advance(0.3)
        second = await get(api)
        assert first == second
        assert first[1]["expires_in"] == 3000
        assert service.full_checks == 1

    async def test_expires_in_is_counted_by_every_clock(
        self, api: Client, service: FakeTokenService, fake_clock: FakeClock
    ) -> None:
        """When another clock than the fleet's says the token has less left (issue 20, M3),
        expires_in (and expires_at with it) says the shorter."""
        service.shortened_by = 40.0
        status, body = await get(api)
        assert status == 200
        assert body["expires_in"] == 2960
        assert body["expires_at"] == int(NOW + 3000.5 - 40.0)

    async def test_checked_in_full_when_the_second_changes(
        self, api: Client, service: FakeTokenService, fake_clock: FakeClock
    ) -> None:
        """Past the whole second, the full check runs again and expires_in counts down."""
        await get(api)
        await fake_clock.advance(0.6)
        _, body = await get(api)
        assert service.full_checks == 2
        assert body["expires_in"] == 2999

    async def test_not_reused_past_the_serving_deadline(
        self, api: Client, service: FakeTokenService, fake_clock: FakeClock
    ) -> None:
        """A token that stops being servable mid-second is refused from that moment: 503."""
        service.deadline = fake_clock.monotonic() + 0.2
        assert (await get(api))[0] == 200
        await fake_clock.advance(0.25)
        status, body = await get(api)
        assert (status, body["error"]) == (503, "token_unavailable")

    async def test_a_new_token_is_served_at_once(
        self, api: Client, service: FakeTokenService
    ) -> None:
        """When the service holds a new token, the next answer has it, with no time passing."""
        await get(api)
        service.tokens["app1"] = token("two")
        _, body = await get(api)
        assert body["access_token"] == service.tokens["app1"].access_token

    async def test_reused_answers_are_counted(
        self, api: Client, service: FakeTokenService, metrics: Metrics
    ) -> None:
        """Every request answered from a reused answer is in the request metrics."""
        for _ in range(3):
            await get(api)
        assert service.full_checks == 1
        labels = {"route": "/v1/token/{app}", "app": "app1", "client": "alpha", "status": "200"}
        assert metrics.registry.get_sample_value("token_broker_requests_total", labels) == 3

    async def test_a_second_client_is_audited(self, api: Client) -> None:
        """A reused answer still logs token.issued once for each new client."""
        with capture_logs() as logs:
            await get(api, KEY_A)
            await get(api, KEY_A)
            await get(api, KEY_B)
        issued = [line["client"] for line in logs if line["event"] == "token.issued"]
        assert issued == ["alpha", "beta"]

    async def test_min_ttl_always_checks_in_full(
        self, api: Client, service: FakeTokenService
    ) -> None:
        """A request with min_ttl is never answered from a reused answer."""
        await get(api)
        response = await api.get(
            "/v1/token/app1?min_ttl=10", headers={"Authorization": f"Bearer {KEY_A}"}
        )
        assert response.status == 200
        assert service.full_checks == 2


# ---- the prebuilt message against aiohttp's own -------------------------------------------


async def exchange(port: int, request: bytes) -> bytes:
    """Send `request` raw and read until the server closes or a whole answer has arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return head + await reader.readexactly(length)
    finally:
        writer.close()


def without_date(message: bytes) -> bytes:
    return b"\r\n".join(line for line in message.split(b"\r\n") if not line.startswith(b"Date:"))


REQUESTS = {
    "http/1.1": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "http/1.1 close": b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    "http/1.0": b"GET / HTTP/1.0\r\n\r\n",
    "http/1.0 keep-alive": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
}


class TestPrebuilt:
    @pytest.mark.parametrize("request_bytes", REQUESTS.values(), ids=REQUESTS.keys())
    async def test_same_bytes_as_a_plain_response(self, request_bytes: bytes) -> None:
        """The answer is byte for byte what aiohttp writes for web.Response (Date aside)."""
        answer = Answer(token("one"))
        answer.update(3000, int(NOW + 3000), float("inf"))

        async def plain(_: web.BaseRequest) -> web.StreamResponse:
            return web.Response(body=answer.body, headers=TOKEN_HEADERS)

        async def reused(request: web.BaseRequest) -> web.StreamResponse:
            return answer.response(request)

        async with RawTestServer(plain) as expected, RawTestServer(reused) as actual:
            assert expected.port is not None and actual.port is not None
            want = await exchange(expected.port, request_bytes)
            got = await exchange(actual.port, request_bytes)
        assert without_date(got) == without_date(want)
        assert b"\r\nDate: " in got

    async def test_keep_alive_connection_serves_the_next_request(self) -> None:
        """After a prebuilt answer the connection stays open for the next request."""
        answer = Answer(token("one"))
        answer.update(3000, int(NOW + 3000), float("inf"))
        kinds: list[bool] = []

        async def reused(request: web.BaseRequest) -> web.StreamResponse:
            response = answer.response(request)
            kinds.append(isinstance(response, PrebuiltResponse))
            return response

        async with RawTestServer(reused) as server:
            assert server.port is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                for _ in range(2):
                    writer.write(REQUESTS["http/1.1"])
                    head = await reader.readuntil(b"\r\n\r\n")
                    await reader.readexactly(len(answer.body))
                    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            finally:
                writer.close()
        assert kinds == [True, True]

    async def test_a_new_body_gets_a_new_message(self) -> None:
        """When the whole seconds change, the prebuilt message carries the new body."""
        answer = Answer(token("one"))
        answer.update(3000, int(NOW + 3000), float("inf"))

        async def reused(request: web.BaseRequest) -> web.StreamResponse:
            return answer.response(request)

        async with RawTestServer(reused) as server:
            assert server.port is not None
            await exchange(server.port, REQUESTS["http/1.1"])
            answer.update(2999, int(NOW + 3000), float("inf"))
            got = await exchange(server.port, REQUESTS["http/1.1"])
        assert got.endswith(answer.body)
        assert b'"expires_in": 2999' in got

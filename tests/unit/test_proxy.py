"""The proxy's pure parts (path checks, header cleaning) and its decisions against a fake service.

The decisions (fail closed, retry rules, limits) run through the real API app, with a fake
token service at the TokenService seam and a small aiohttp upstream on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer, TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from broker.api import ApiDependencies, build_api
from broker.api.auth import ClientAuthenticator, unauthorized_message
from broker.api.errors import ApiError
from broker.api.proxy import Upstreams, request_headers, response_headers, upstream_target
from broker.api.server import api_server_options
from broker.errors import NeedsAuthorization, RateLimited, TokenUnavailable
from broker.metrics import Metrics
from broker.model import AppSpec, ClientSpec, ProxySpec, TokenSet, UpstreamSpec
from tests.support.fake_clock import FakeClock
from tests.support.fakes import NOW, FakeTokenService

KEY = "p" * 20 + "-client-key-of-the-proxy-test"
TOKEN_A = TokenSet("access-a-" + "a" * 30, "Bearer", NOW - 100, NOW + 3500)
TOKEN_B = TokenSet("access-b-" + "b" * 30, "Bearer", NOW, NOW + 3600)

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


# ---- pure parts --------------------------------------------------------------------------------

ACCEPTED = [
    ("/v1/proxy/app1/v1/items", ("/v1/", "/v2"), ("/v1/items", "")),
    ("/v1/proxy/app1/v1/", ("/v1/",), ("/v1/", "")),
    ("/v1/proxy/app1/v2", ("/v1/", "/v2"), ("/v2", "")),
    ("/v1/proxy/app1/v2/x?a=1&b=%20", ("/v2",), ("/v2/x", "a=1&b=%20")),
    ("/v1/proxy/app1/", ("/",), ("/", "")),
    ("/v1/proxy/app1/v1/user%73", ("/v1/users",), ("/v1/user%73", "")),
    ("/v1/proxy/app1/v1/a@b:c", ("/v1/",), ("/v1/a@b:c", "")),
    ("/v1/proxy/app1/v1/..x/.y", ("/v1/",), ("/v1/..x/.y", "")),
]

REFUSED = [
    ("/v1/proxy/app2/v1/items", ("/",), 400),  # another app's route
    ("/v1/proxy/app1/v1/../admin", ("/",), 400),
    ("/v1/proxy/app1/v1/./items", ("/",), 400),
    ("/v1/proxy/app1/v1/%2e%2E/admin", ("/",), 400),
    ("/v1/proxy/app1/v1%2Fadmin", ("/",), 400),
    ("/v1/proxy/app1/v1%2fadmin", ("/",), 400),
    ("/v1/proxy/app1/v1%5Cadmin", ("/",), 400),
    ("/v1/proxy/app1/v1/%00", ("/",), 400),
    ("/v1/proxy/app1/v1/%0d%0aHost:%20evil", ("/",), 400),
    ("/v1/proxy/app1/v1\\admin", ("/",), 400),
    ("/v1/proxy/app1//evil.example/v1", ("/",), 400),
    ("/v1/proxy/app1/v1//x", ("/",), 400),
    ("/v1/proxy/app1/v1/%zz", ("/",), 400),
    ("/v1/proxy/app1/v1 x", ("/",), 400),
    ("/v1/proxy/app1/v1/x?a=<b>", ("/",), 400),
    ("http://evil.example/v1/proxy/app1/v1", ("/",), 400),
    ("/v1/proxy/app%31/v1", ("/",), 400),
    ("/v1/proxy/app1/v10/items", ("/v1",), 403),
    ("/v1/proxy/app1/v1", ("/v1/",), 403),
    ("/v1/proxy/app1/admin", ("/v1/", "/v2"), 403),
    ("/v1/proxy/app1/@evil.example/v1", ("/v1/",), 403),
]


class TestUpstreamTarget:
    def test_a_named_upstream_is_the_first_segment(self) -> None:
        """With an upstream name, the path after it is forwarded and checked."""
        raw = "/v1/proxy/app1/messaging/v1/Services?x=1"
        assert upstream_target(raw, "app1", ("/v1/",), "messaging") == ("/v1/Services", "x=1")
        with pytest.raises(ApiError) as caught:
            upstream_target("/v1/proxy/app1/messaging", "app1", ("/",), "messaging")
        assert caught.value.status == 400
        assert "/v1/proxy/app1/messaging/<path>" in caught.value.message
        with pytest.raises(ApiError) as caught:
            upstream_target("/v1/proxy/app1/messaging/v2/x", "app1", ("/v1/",), "messaging")
        assert caught.value.code == "path_not_allowed"
        assert "app app1's upstream messaging" in caught.value.message

    @pytest.mark.parametrize(("raw", "prefixes", "expected"), ACCEPTED)
    def test_accepted_paths_keep_their_encoding(
        self, raw: str, prefixes: tuple[str, ...], expected: tuple[str, str]
    ) -> None:
        """A plain path under a prefix is forwarded as the caller encoded it."""
        assert upstream_target(raw, "app1", prefixes) == expected

    @pytest.mark.parametrize(("raw", "prefixes", "status"), REFUSED)
    def test_refused_paths(self, raw: str, prefixes: tuple[str, ...], status: int) -> None:
        """Tricks are 400 bad_request; paths outside the prefixes are 403 path_not_allowed."""
        with pytest.raises(ApiError) as caught:
            upstream_target(raw, "app1", prefixes)
        assert caught.value.status == status
        assert caught.value.code == ("path_not_allowed" if status == 403 else "bad_request")


def headers_of(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


class TestHeaders:
    def test_request_headers_carry_the_token_and_nothing_of_the_hop(self) -> None:
        """The caller's key, Host, framing, hop-by-hop and forwarding headers are replaced or dropped."""
        sent = request_headers(
            headers_of(
                ("Authorization", f"Bearer {KEY}"),
                ("Host", "127.0.0.1:8411"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "12"),
                ("Expect", "100-continue"),
                ("TE", "trailers"),
                ("Upgrade", "websocket"),
                ("Proxy-Authorization", "Basic eA=="),
                ("Forwarded", "for=1.2.3.4"),
                ("X-Forwarded-For", "1.2.3.4"),
                ("X-Forwarded-Host", "evil.example"),
                ("X-Real-IP", "1.2.3.4"),
                ("Cookie", "a=1"),
                ("Accept", "application/json"),
                ("X-Custom", "one"),
                ("X-Custom", "two"),
            ),
            TOKEN_A,
        )
        assert list(sent.items()) == [
            ("Cookie", "a=1"),
            ("Accept", "application/json"),
            ("X-Custom", "one"),
            ("X-Custom", "two"),
            ("Authorization", f"Bearer {TOKEN_A.access_token}"),
        ]

    def test_response_headers_keep_every_set_cookie(self) -> None:
        """Hop-by-hop headers go; repeated end-to-end headers stay, in order."""
        kept = response_headers(
            headers_of(
                ("Connection", "close, X-Hop"),
                ("X-Hop", "1"),
                ("Transfer-Encoding", "chunked"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("Content-Type", "application/json"),
            )
        )
        assert list(kept.items()) == [
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Content-Type", "application/json"),
        ]


# ---- decisions, through the API ----------------------------------------------------------------


class Upstream:
    """A plain-HTTP upstream on loopback: accepts only TOKEN_B unless told to accept any."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        self.accept_any = False
        self.reject_status = 401
        self.release = asyncio.Event()
        self.release.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.authorizations.append(request.headers.get("Authorization", ""))
        body = await request.read()
        await self.release.wait()
        if not self.accept_any and request.headers.get("Authorization") != (
            f"Bearer {TOKEN_B.access_token}"
        ):
            return web.json_response({"error": "invalid_token"}, status=self.reject_status)
        return web.json_response({"sha256": hashlib.sha256(body).hexdigest()})


@pytest.fixture
def service() -> FakeTokenService:
    """app1 with TOKEN_A; a forced refresh installs TOKEN_B."""
    service = FakeTokenService({"app1": TOKEN_A})
    service.script_refresh("app1", TOKEN_B)
    return service


@pytest.fixture
async def upstream_server() -> AsyncIterator[tuple[Upstream, TestServer]]:
    upstream = Upstream()
    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield upstream, server
    finally:
        await server.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


Make = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def make_api(
    aiohttp_client: ClientFactory,
    service: FakeTokenService,
    metrics: Metrics,
    upstream_server: tuple[Upstream, TestServer],
    tmp_path: Path,
) -> AsyncIterator[Make]:
    """Build the API with app1 proxied to the loopback upstream, with `proxy` overrides."""
    (tmp_path / "key").write_text(KEY)
    authenticator = ClientAuthenticator(
        {"svc": ClientSpec("svc", ("app1",), key_files=(tmp_path / "key",))}
    )
    upstreams = Upstreams()

    async def make(**proxy: Any) -> TestClient[Any, Any]:
        spec = ProxySpec(
            **{
                "upstream": f"http://127.0.0.1:{upstream_server[1].port}",
                "allowed_networks": ("127.0.0.0/8",),
                **proxy,
            }
        )
        upstreams.update({"app1": AppSpec("app1", "https://auth.example/token", proxy=spec)})
        handler = build_api(
            ApiDependencies(service, authenticator, metrics, FakeClock(), upstreams)
        )
        return await aiohttp_client(RawTestServer(handler), server_kwargs=api_server_options())

    yield make
    await upstreams.close(grace=0.0)


AUTH = {"Authorization": f"Bearer {KEY}"}


def retries(metrics: Metrics, reason: str) -> float:
    labels = {"app": "app1", "reason": reason}
    return metrics.registry.get_sample_value("token_broker_proxy_retries_total", labels) or 0.0


class TestRetryDecisions:
    async def test_a_401_is_retried_once_with_the_refreshed_token(
        self,
        make_api: Make,
        service: FakeTokenService,
        upstream_server: tuple[Upstream, TestServer],
        metrics: Metrics,
    ) -> None:
        """First try with the old token, one forced refresh, the retry with the new one."""
        api = await make_api()
        response = await api.post("/v1/proxy/app1/x", headers=AUTH, data=b"body")
        assert response.status == 200
        assert (await response.json())["sha256"] == hashlib.sha256(b"body").hexdigest()
        assert upstream_server[0].authorizations == [
            f"Bearer {TOKEN_A.access_token}",
            f"Bearer {TOKEN_B.access_token}",
        ]
        assert service.forced == 1
        assert service.refused == [TOKEN_A]  # reported by the token that was refused
        assert retries(metrics, "unauthorized") == 1

    async def test_the_statuses_that_purge_are_configurable(
        self,
        make_api: Make,
        service: FakeTokenService,
        upstream_server: tuple[Upstream, TestServer],
    ) -> None:
        """With refresh_on_status [403], a 403 purges and retries; a 401 goes back as it is."""
        upstream = upstream_server[0]
        api = await make_api(refresh_on_status=(403,))
        upstream.reject_status = 403
        assert (await api.get("/v1/proxy/app1/x", headers=AUTH)).status == 200
        assert service.refused == [TOKEN_A]
        service.tokens["app1"] = TOKEN_A
        upstream.reject_status = 401
        assert (await api.get("/v1/proxy/app1/x", headers=AUTH)).status == 401
        assert service.refused == [TOKEN_A]
        assert len(upstream.authorizations) == 3

    async def test_a_chunked_body_within_the_buffer_is_replayed(
        self,
        make_api: Make,
        service: FakeTokenService,
        upstream_server: tuple[Upstream, TestServer],
    ) -> None:
        """A body without Content-Length but under max_buffered_body can still be retried."""
        api = await make_api()

        async def chunks() -> AsyncIterator[bytes]:
            yield b"part one, "
            yield b"part two"

        response = await api.put("/v1/proxy/app1/x", headers=AUTH, data=chunks())
        assert response.status == 200
        expected = hashlib.sha256(b"part one, part two").hexdigest()
        assert (await response.json())["sha256"] == expected
        assert len(upstream_server[0].authorizations) == 2

    @pytest.mark.parametrize(
        ("force_result", "reason"),
        [
            (RateLimited("too many", retry_after=30), "rate_limited"),
            (TOKEN_A, "token_unchanged"),
        ],
    )
    async def test_a_401_goes_back_when_no_new_token_can_be_had(
        self,
        make_api: Make,
        service: FakeTokenService,
        upstream_server: tuple[Upstream, TestServer],
        metrics: Metrics,
        force_result: TokenSet | Exception,
        reason: str,
    ) -> None:
        """Rate-limited refresh or the same token back: the upstream's 401, not retried."""
        service.script_refresh("app1", force_result)
        api = await make_api()
        response = await api.get("/v1/proxy/app1/x", headers=AUTH)
        assert response.status == 401
        assert await response.json() == {"error": "invalid_token"}
        assert len(upstream_server[0].authorizations) == 1
        assert retries(metrics, reason) == 1

    async def test_a_failed_refresh_after_a_401_answers_503(
        self,
        make_api: Make,
        service: FakeTokenService,
        upstream_server: tuple[Upstream, TestServer],
        metrics: Metrics,
    ) -> None:
        """The token was rejected and no new one exists: 503 token_unavailable, fail closed."""
        service.script_refresh("app1", TokenUnavailable("down", retry_after=7))
        api = await make_api()
        response = await api.get("/v1/proxy/app1/x", headers=AUTH)
        assert response.status == 503
        assert response.headers["Retry-After"] == "7"
        assert (await response.json())["error"] == "token_unavailable"
        assert retries(metrics, "refresh_failed") == 1

    async def test_retry_on_401_false_passes_the_401_back(
        self,
        make_api: Make,
        service: FakeTokenService,
        upstream_server: tuple[Upstream, TestServer],
    ) -> None:
        """With retry_on_401 off, no refresh is forced."""
        api = await make_api(retry_on_401=False)
        response = await api.get("/v1/proxy/app1/x", headers=AUTH)
        assert response.status == 401
        assert service.forced == 0


class TestFailClosedAndLimits:
    @pytest.mark.parametrize(
        ("error", "status", "code"),
        [
            (TokenUnavailable("none", retry_after=3), 503, "token_unavailable"),
            (NeedsAuthorization("grant"), 409, "needs_authorization"),
        ],
    )
    async def test_no_servable_token_forwards_nothing(
        self,
        make_api: Make,
        service: FakeTokenService,
        upstream_server: tuple[Upstream, TestServer],
        error: Exception,
        status: int,
        code: str,
    ) -> None:
        """Without a servable token the contract's error comes back and the upstream sees nothing."""
        service.errors["app1"] = error
        api = await make_api()
        response = await api.get("/v1/proxy/app1/x", headers=AUTH)
        assert response.status == status
        assert (await response.json())["error"] == code
        assert upstream_server[0].authorizations == []

    @pytest.mark.parametrize(
        ("error", "expected"),
        [
            (TokenUnavailable("none", retry_after=3), ("retry in 3 s", "GET /v1/apps")),
            (NeedsAuthorization("grant"), ("token-broker authorize app1 --config FILE",)),
        ],
    )
    async def test_no_servable_token_says_why_as_the_token_route_does(
        self,
        make_api: Make,
        service: FakeTokenService,
        error: Exception,
        expected: tuple[str, ...],
    ) -> None:
        """The proxy's 503/409 carries the app's last error, word for word the token route's."""
        service.errors["app1"] = error
        service.last_errors["app1"] = "transient: token endpoint answered 503"
        api = await make_api()
        proxied = await (await api.get("/v1/proxy/app1/x", headers=AUTH)).json()
        direct = await (await api.get("/v1/token/app1", headers=AUTH)).json()
        assert proxied == direct
        assert "last error: transient: token endpoint answered 503" in proxied["message"]
        for text in expected:
            assert text in proxied["message"]

    async def test_a_failed_refresh_after_a_401_says_why(
        self, make_api: Make, service: FakeTokenService
    ) -> None:
        """The 503 after a rejected token and a failed refresh names the app's last error."""
        service.script_refresh("app1", TokenUnavailable("down", retry_after=7))
        service.last_errors["app1"] = "transient: connection refused"
        api = await make_api()
        body = await (await api.get("/v1/proxy/app1/x", headers=AUTH)).json()
        assert body["error"] == "token_unavailable"
        assert "last error: transient: connection refused" in body["message"]
        assert "retry in 7 s" in body["message"]

    async def test_an_unknown_app_is_named_with_the_callers_apps(self, make_api: Make) -> None:
        """404 unknown_app on the proxy route repeats the name and lists the caller's apps."""
        api = await make_api()
        response = await api.get("/v1/proxy/twillio/x", headers=AUTH)
        assert response.status == 404
        assert await response.json() == {
            "error": "unknown_app",
            "message": "no app named 'twillio' is configured; this client may use: app1",
        }

    async def test_a_body_over_max_request_body_is_refused_with_413(
        self, make_api: Make, upstream_server: tuple[Upstream, TestServer]
    ) -> None:
        """A declared Content-Length over the limit is refused before anything is sent."""
        api = await make_api(max_request_body=1000, max_buffered_body=100)
        response = await api.post("/v1/proxy/app1/x", headers=AUTH, data=b"x" * 1001)
        assert response.status == 413
        assert (await response.json())["error"] == "payload_too_large"
        assert upstream_server[0].authorizations == []

    async def test_a_chunked_body_growing_over_the_limit_is_cut_with_413(
        self, make_api: Make, upstream_server: tuple[Upstream, TestServer]
    ) -> None:
        """A streamed body without Content-Length stops at max_request_body."""
        upstream_server[0].accept_any = True
        api = await make_api(max_request_body=200_000, max_buffered_body=1000)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(50):
                yield b"y" * 10_000

        response = await api.post("/v1/proxy/app1/x", headers=AUTH, data=chunks())
        assert response.status == 413

    async def test_a_large_body_with_content_length_streams_through(
        self, make_api: Make, upstream_server: tuple[Upstream, TestServer]
    ) -> None:
        """A body over max_buffered_body but within max_request_body arrives whole."""
        upstream_server[0].accept_any = True
        api = await make_api(max_buffered_body=1000)
        body = bytes(range(256)) * 1200
        response = await api.put("/v1/proxy/app1/x", headers=AUTH, data=body)
        assert response.status == 200
        assert (await response.json())["sha256"] == hashlib.sha256(body).hexdigest()

    async def test_head_is_answered_without_a_body(
        self, make_api: Make, upstream_server: tuple[Upstream, TestServer]
    ) -> None:
        """HEAD goes upstream and its status and Content-Length come back, with no body."""
        upstream_server[0].accept_any = True
        api = await make_api()
        response = await api.head("/v1/proxy/app1/x", headers=AUTH)
        assert response.status == 200
        assert int(response.headers["Content-Length"]) > 0
        assert await response.read() == b""

    async def test_a_full_upstream_answers_503_proxy_busy(
        self, make_api: Make, upstream_server: tuple[Upstream, TestServer]
    ) -> None:
        """Past max_concurrent requests in flight, a caller waits connect_timeout, then 503."""
        upstream, _ = upstream_server
        upstream.accept_any = True
        upstream.release.clear()
        api = await make_api(max_concurrent=1, connect_timeout=0.2)
        first = asyncio.ensure_future(api.get("/v1/proxy/app1/a", headers=AUTH))
        while not upstream.authorizations:
            await asyncio.sleep(0.01)
        second = await api.get("/v1/proxy/app1/b", headers=AUTH)
        assert second.status == 503
        assert (await second.json())["error"] == "proxy_busy"
        assert second.headers["Retry-After"] == "1"
        upstream.release.set()
        assert (await first).status == 200

    async def test_trace_is_not_forwarded(
        self, make_api: Make, upstream_server: tuple[Upstream, TestServer]
    ) -> None:
        """TRACE would echo the injected token: 405 with Allow."""
        api = await make_api()
        response = await api.request("TRACE", "/v1/proxy/app1/x", headers=AUTH)
        assert response.status == 405
        assert "GET" in response.headers["Allow"]
        assert upstream_server[0].authorizations == []

    async def test_an_app_without_a_proxy_answers_404(
        self,
        aiohttp_client: ClientFactory,
        service: FakeTokenService,
        metrics: Metrics,
        tmp_path: Path,
    ) -> None:
        """No proxy block: 404 proxy_not_configured."""
        (tmp_path / "key").write_text(KEY)
        authenticator = ClientAuthenticator(
            {"svc": ClientSpec("svc", ("app1",), key_files=(tmp_path / "key",))}
        )
        handler = build_api(ApiDependencies(service, authenticator, metrics, FakeClock()))
        api = await aiohttp_client(RawTestServer(handler), server_kwargs=api_server_options())
        response = await api.get("/v1/proxy/app1/x", headers=AUTH)
        assert response.status == 404
        assert (await response.json())["error"] == "proxy_not_configured"


class TestRequestMetrics:
    async def test_a_proxied_request_is_counted_under_the_route_template(
        self, make_api: Make, upstream_server: tuple[Upstream, TestServer], metrics: Metrics
    ) -> None:
        """The route label is `/v1/proxy/{app}/{path}`, not the router's `{path:regex}`."""
        upstream_server[0].accept_any = True
        api = await make_api()
        response = await api.delete("/v1/proxy/app1/x/y", headers=AUTH)
        assert response.status == 200
        labels = {
            "route": "/v1/proxy/{app}/{path}",
            "app": "app1",
            "client": "svc",
            "status": "200",
        }
        assert metrics.registry.get_sample_value("token_broker_requests_total", labels) == 1.0


class TestRelay:
    async def test_a_remembered_target_is_checked_again_when_the_prefixes_change(
        self, make_api: Make, upstream_server: tuple[Upstream, TestServer]
    ) -> None:
        """The checked URL of a target is remembered per upstream pool, so a new proxy block
        (a new pool) checks the same target again under its own prefixes."""
        upstream_server[0].accept_any = True
        api = await make_api(path_prefixes=("/v1/",))
        for _ in range(2):  # the second answer comes from the remembered target
            assert (await api.get("/v1/proxy/app1/v1/x", headers=AUTH)).status == 200
        api = await make_api(path_prefixes=("/v2/",))
        response = await api.get("/v1/proxy/app1/v1/x", headers=AUTH)
        assert response.status == 403
        assert (await response.json())["error"] == "path_not_allowed"

    @pytest.mark.parametrize("declared", [100, 200_000])
    async def test_an_answer_cut_short_upstream_cuts_the_callers_connection(
        self,
        aiohttp_client: ClientFactory,
        service: FakeTokenService,
        metrics: Metrics,
        tmp_path: Path,
        declared: int,
    ) -> None:
        """An upstream that closes before its Content-Length is reached (a small answer, read
        whole, or a large one, streamed) never becomes a well-formed short body for the caller."""

        async def cut(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n\r\n"
            writer.write(head.encode() + b"x" * 10)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(cut, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        (tmp_path / "key").write_text(KEY)
        authenticator = ClientAuthenticator(
            {"svc": ClientSpec("svc", ("app1",), key_files=(tmp_path / "key",))}
        )
        upstreams = Upstreams()
        spec = ProxySpec(upstream=f"http://127.0.0.1:{port}", allowed_networks=("127.0.0.0/8",))
        upstreams.update({"app1": AppSpec("app1", "https://auth.example/token", proxy=spec)})
        handler = build_api(
            ApiDependencies(service, authenticator, metrics, FakeClock(), upstreams)
        )
        api = await aiohttp_client(RawTestServer(handler), server_kwargs=api_server_options())
        try:
            response = await api.get("/v1/proxy/app1/x", headers=AUTH)
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        finally:
            await upstreams.close(grace=0.0)
            server.close()
            await server.wait_closed()


# ---- several upstreams per app, the egress guard -----------------------------------------------


def refused(metrics: Metrics, reason: str) -> float:
    labels = {"app": "app1", "reason": reason}
    value = metrics.registry.get_sample_value("token_broker_proxy_egress_refused_total", labels)
    return value or 0.0


class TestNamedUpstreams:
    async def test_each_name_reaches_its_pool_with_its_prefixes(
        self, make_api: Make, upstream_server: tuple[Upstream, TestServer]
    ) -> None:
        """`a` opens every path, `b` only /v1; both go out with the app's one token."""
        upstream, server = upstream_server
        upstream.accept_any = True
        origin = f"http://127.0.0.1:{server.port}"
        api = await make_api(
            upstream=None,
            upstreams=(UpstreamSpec("a", origin), UpstreamSpec("b", origin, ("/v1",))),
            path_prefixes=("/",),
        )
        assert (await api.get("/v1/proxy/app1/a/admin", headers=AUTH)).status == 200
        assert (await api.get("/v1/proxy/app1/b/v1/x", headers=AUTH)).status == 200
        response = await api.get("/v1/proxy/app1/b/admin", headers=AUTH)
        assert response.status == 403
        assert (await response.json())["error"] == "path_not_allowed"
        assert upstream.authorizations == [f"Bearer {TOKEN_A.access_token}"] * 2

    @pytest.mark.parametrize(
        "target", ["/v1/proxy/app1/c/x", "/v1/proxy/app1/x", "/v1/proxy/app1/"]
    )
    async def test_an_unknown_name_is_a_json_404_listing_the_names(
        self, make_api: Make, upstream_server: tuple[Upstream, TestServer], target: str
    ) -> None:
        """A name the app does not have (or none): 404 unknown_upstream, nothing sent."""
        origin = f"http://127.0.0.1:{upstream_server[1].port}"
        api = await make_api(
            upstream=None, upstreams=(UpstreamSpec("a", origin), UpstreamSpec("b", origin))
        )
        response = await api.get(target, headers=AUTH)
        assert response.status == 404
        body = await response.json()
        assert body["error"] == "unknown_upstream"
        assert (
            "its upstreams are a, b, reached at /v1/proxy/app1/<upstream>/<path>"
            in (body["message"])
        )
        assert upstream_server[0].authorizations == []


class TestEgressGuard:
    async def test_loopback_without_allowed_networks_is_refused_and_counted(
        self, make_api: Make, upstream_server: tuple[Upstream, TestServer], metrics: Metrics
    ) -> None:
        """No allow-list: the loopback upstream gets no connection; 403 egress_refused."""
        api = await make_api(allowed_networks=())
        response = await api.get("/v1/proxy/app1/x", headers=AUTH)
        assert response.status == 403
        body = await response.json()
        assert body["error"] == "egress_refused"
        assert "is at 127.0.0.1, a loopback address: nothing was sent" in body["message"]
        assert "apps.app1.proxy.allowed_networks" in body["message"]
        assert upstream_server[0].authorizations == []
        assert refused(metrics, "loopback") == 1

    async def test_the_metadata_address_is_refused_without_a_connection(
        self, make_api: Make, metrics: Metrics
    ) -> None:
        """An upstream at 169.254.169.254 (as a spec built without the config's check) is
        refused at once, not after a connect timeout, even with loopback allowed."""
        api = await make_api(upstream="https://169.254.169.254", connect_timeout=30.0)
        started = asyncio.get_running_loop().time()
        response = await api.get("/v1/proxy/app1/latest/meta-data/", headers=AUTH)
        assert response.status == 403
        assert (await response.json())["error"] == "egress_refused"
        assert asyncio.get_running_loop().time() - started < 5
        assert refused(metrics, "link_local") == 1


# ---- errors that teach -----------------------------------------------------------------------

SID = "AC" + "ab12" * 8
SECRET = "twilio-auth-token-" + "z" * 14


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


TAUGHT = [
    (None, "a valid client key is required"),
    ("", "a valid client key is required"),
    (basic(SID, SECRET), "Twilio credentials (HTTP Basic with an Account SID (AC...)"),
    (basic("SK" + "0" * 32, SECRET), "Twilio credentials (HTTP Basic with an API key SID (SK...)"),
    (basic("ac" + "ab12" * 8, SECRET), "HTTP Basic credentials ('Authorization: Basic ...')"),
    (basic("someone", SECRET), "HTTP Basic credentials ('Authorization: Basic ...')"),
    ("Basic not-base64!", "HTTP Basic credentials"),
    ("basic " + basic(SID, SECRET).split()[1], "Twilio credentials"),
    ("Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", "a JWT as its bearer key"),
    ("Bearer " + "n" * 40, "the bearer key is not a configured client key"),
    ("Digest username=x", "an Authorization header of the 'Digest' scheme"),
    ('"><script> x', "an Authorization header of a scheme it cannot read"),
]


class TestErrorsThatTeach:
    @pytest.mark.parametrize(("authorization", "says"), TAUGHT)
    def test_the_message_names_what_was_received(
        self, authorization: str | None, says: str
    ) -> None:
        """What the header held (its kind, never its value) and what to send instead."""
        message = unauthorized_message(authorization, peer_identity=False)
        assert says in message
        assert message.endswith("send the client key as 'Authorization: Bearer <client key>'")
        assert SID not in message and SECRET not in message and "someone" not in message

    def test_on_the_unix_socket_it_offers_peer_identity(self) -> None:
        """With peer identity, sending no Authorization at all is the other way."""
        message = unauthorized_message(basic(SID, SECRET), peer_identity=True)
        assert message.endswith(
            "(or no Authorization header at all, from a uid or gid mapped to a client)"
        )

    async def test_the_proxy_answers_twilio_credentials_with_the_lesson(
        self, make_api: Make, upstream_server: tuple[Upstream, TestServer]
    ) -> None:
        """Through the API: 401 unauthorized with WWW-Authenticate, the lesson, nothing sent."""
        api = await make_api()
        response = await api.get(
            "/v1/proxy/app1/2010-04-01/Accounts.json",
            headers={"Authorization": basic(SID, SECRET)},
        )
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="token-broker"'
        body = await response.json()
        assert body["error"] == "unauthorized"
        assert "Twilio credentials" in body["message"]
        assert SID not in await response.text()
        assert upstream_server[0].authorizations == []

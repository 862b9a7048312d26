"""The proxy's DPoP hook: a fresh proof per request, the resource server's nonce challenge
answered once, against a verifying upstream on loopback and a fake token service."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer, TestClient, TestServer

from broker.api import ApiDependencies, build_api, build_proxy_listener, serve_proxy
from broker.api.auth import ClientAuthenticator
from broker.api.proxy import Upstreams
from broker.api.server import api_server_options
from broker.dpop import AppDpop, ProofKey, ProofKeys, generate_key
from broker.metrics import Metrics
from broker.model import AppSpec, ClientSpec, DpopAlgorithm, ProxySpec, TokenSet
from tests.support.dpop import DpopVerifier, InvalidProof
from tests.support.fake_clock import FakeClock
from tests.support.fakes import NOW, FakeTokenService
from tests.unit.test_proxy import KEY, ClientFactory

KEY_ONE = ProofKey(generate_key(DpopAlgorithm.ES256), DpopAlgorithm.ES256)
BOUND = TokenSet("bound-access-" + "d" * 30, "DPoP", NOW - 100, NOW + 3500, dpop_jkt=KEY_ONE.jkt)
AUTH = {"Authorization": f"Bearer {KEY}"}


class VerifyingUpstream:
    """Accepts `Authorization: DPoP BOUND` with a valid proof for KEY_ONE; challenges for a
    nonce when told to."""

    def __init__(self) -> None:
        self.verifier = DpopVerifier()
        self.seen: list[tuple[str, str | None]] = []  # (Authorization, DPoP)
        self.base = ""

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.append((request.headers.get("Authorization", ""), request.headers.get("DPoP")))
        if request.headers.get("Authorization") != f"DPoP {BOUND.access_token}":
            return web.json_response({"error": "invalid_token"}, status=401)
        try:
            self.verifier.verify(
                request.headers.get("DPoP"),
                request.method,
                f"{self.base}{request.path}",
                access_token=BOUND.access_token,
                jkt=KEY_ONE.jkt,
            )
        except InvalidProof as exc:
            headers = {"WWW-Authenticate": f'DPoP error="{exc.error}"'}
            if exc.error == "use_dpop_nonce":
                headers["DPoP-Nonce"] = self.verifier.nonce
            return web.json_response({"error": exc.error}, status=401, headers=headers)
        return web.json_response({"ok": True})


@pytest.fixture
async def upstream() -> AsyncIterator[VerifyingUpstream]:
    verifying = VerifyingUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", verifying.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    verifying.base = f"http://127.0.0.1:{server.port}"
    try:
        yield verifying
    finally:
        await server.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def service() -> FakeTokenService:
    service = FakeTokenService({"app1": BOUND})
    service.script_refresh("app1", BOUND)
    return service


@pytest.fixture
def dpop() -> dict[str, AppDpop]:
    return {"app1": AppDpop("app1", ProofKeys((KEY_ONE,)), time.time)}


class ListenerClient:
    """The proxy listener behind TestClient's `get` and `post` (the tests' two calls)."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def get(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.session.get(self.base + path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.session.post(self.base + path, **kwargs)


@pytest.fixture(params=["api", "listener"])
async def api(
    request: pytest.FixtureRequest,
    aiohttp_client: ClientFactory,
    service: FakeTokenService,
    metrics: Metrics,
    upstream: VerifyingUpstream,
    dpop: dict[str, AppDpop],
    tmp_path: Path,
) -> AsyncIterator[Any]:
    """The API's proxy route, or the proxy listener, for app1 (DPoP) to the upstream."""
    (tmp_path / "key").write_text(KEY)
    authenticator = ClientAuthenticator(
        {"svc": ClientSpec("svc", ("app1",), key_files=(tmp_path / "key",))}
    )
    upstreams = Upstreams()
    spec = ProxySpec(
        upstream=upstream.base, max_buffered_body=16, allowed_networks=("127.0.0.0/8",)
    )
    upstreams.update({"app1": AppSpec("app1", "https://auth.example/token", proxy=spec)})
    deps = ApiDependencies(service, authenticator, metrics, FakeClock(), upstreams, dpop=dpop)
    if request.param == "api":
        yield await aiohttp_client(
            RawTestServer(build_api(deps)), server_kwargs=api_server_options()
        )
    else:
        listener = build_proxy_listener(deps)
        server = await serve_proxy(listener, host="127.0.0.1", port=0)
        port = server.sockets[0].getsockname()[1]
        async with aiohttp.ClientSession() as session:
            yield ListenerClient(session, f"http://127.0.0.1:{port}")
        await listener.close(0.0)
    await upstreams.close(grace=0.0)


def nonce_retries(metrics: Metrics) -> float:
    labels = {"app": "app1", "server": "resource_server"}
    return metrics.registry.get_sample_value("token_broker_dpop_nonce_retries_total", labels) or 0


class TestProofPerRequest:
    async def test_each_request_carries_a_fresh_proof(
        self, api: TestClient[Any, Any], upstream: VerifyingUpstream
    ) -> None:
        """Authorization: DPoP and a proof the upstream verifies (htu without the query),
        a new jti each time (the verifier refuses a replay)."""
        for _ in range(3):
            response = await api.get("/v1/proxy/app1/v1/items?page=2", headers=AUTH)
            assert response.status == 200, upstream.verifier.seen_jti
        assert upstream.verifier.accepted == 3
        assert {auth for auth, _ in upstream.seen} == {f"DPoP {BOUND.access_token}"}

    async def test_a_bearer_set_goes_as_bearer(
        self, api: TestClient[Any, Any], upstream: VerifyingUpstream, service: FakeTokenService
    ) -> None:
        """A token the server did not bind: Authorization: Bearer, no DPoP header."""
        plain = TokenSet("plain-" + "p" * 30, "Bearer", NOW, NOW + 60)
        service.tokens["app1"] = plain
        service.script_refresh("app1", plain)
        await api.get("/v1/proxy/app1/v1/items", headers=AUTH)
        assert upstream.seen[0] == (f"Bearer {service.tokens['app1'].access_token}", None)

    async def test_a_missing_key_forwards_nothing(
        self, api: TestClient[Any, Any], upstream: VerifyingUpstream, dpop: dict[str, AppDpop]
    ) -> None:
        """The token's key left the key file: 503 dpop_key_missing, nothing sent upstream."""
        other = ProofKey(generate_key(DpopAlgorithm.ES256), DpopAlgorithm.ES256)
        dpop["app1"].keys = ProofKeys((other,))
        response = await api.get("/v1/proxy/app1/v1/items", headers=AUTH)
        assert response.status == 503
        assert (await response.json())["error"] == "dpop_key_missing"
        assert upstream.seen == []


class TestNonceChallenge:
    async def test_answered_once_then_sent_from_the_start(
        self, api: TestClient[Any, Any], upstream: VerifyingUpstream, metrics: Metrics
    ) -> None:
        """401 use_dpop_nonce: one retry with the nonce; the next request carries it at once."""
        upstream.verifier.require_nonce = True
        response = await api.post("/v1/proxy/app1/v1/items", headers=AUTH, data=b"small")
        assert response.status == 200
        assert len(upstream.seen) == 2 and nonce_retries(metrics) == 1
        response = await api.get("/v1/proxy/app1/v1/items", headers=AUTH)
        assert response.status == 200
        assert len(upstream.seen) == 3 and nonce_retries(metrics) == 1

    async def test_a_streamed_body_is_not_retried(
        self, api: TestClient[Any, Any], upstream: VerifyingUpstream, metrics: Metrics
    ) -> None:
        """A body over max_buffered_body cannot be sent twice: the challenge goes back."""
        upstream.verifier.require_nonce = True
        response = await api.post("/v1/proxy/app1/v1/items", headers=AUTH, data=b"x" * 64)
        assert response.status == 401
        assert (await response.json())["error"] == "use_dpop_nonce"
        assert len(upstream.seen) == 1 and nonce_retries(metrics) == 0

    async def test_a_refused_nonce_is_not_retried_again(
        self, api: TestClient[Any, Any], upstream: VerifyingUpstream, service: FakeTokenService
    ) -> None:
        """A server that challenges with the nonce just sent is not asked a third time; the
        401 rule then forces one refresh (the same token here: passed back)."""
        upstream.verifier.require_nonce = True
        await api.get("/v1/proxy/app1/v1/items", headers=AUTH)  # learns the nonce
        upstream.seen.clear()
        original = upstream.verifier.verify

        def refuse(*args: Any, **kwargs: Any) -> str:
            raise InvalidProof("nonce", error="use_dpop_nonce")

        upstream.verifier.verify = refuse  # type: ignore[method-assign]
        response = await api.get("/v1/proxy/app1/v1/items", headers=AUTH)
        upstream.verifier.verify = original  # type: ignore[method-assign]
        assert response.status == 401
        assert len(upstream.seen) == 1

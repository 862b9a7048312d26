"""The local API for a DPoP app: no token alone (409 dpop_bound), and the proof route."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import RawTestServer, TestClient

from broker.api import ApiDependencies, build_api
from broker.api.auth import ClientAuthenticator
from broker.api.server import api_server_options
from broker.dpop import AppDpop, ProofKey, ProofKeys, generate_key
from broker.metrics import Metrics
from broker.model import ClientSpec, DpopAlgorithm, TokenSet
from tests.support.dpop import DpopVerifier
from tests.support.fake_clock import FakeClock
from tests.support.fakes import NOW
from tests.unit.test_api import KEY_A, KEY_B, ClientFactory, auth, fake_service

JKT_KEY = ProofKey(generate_key(DpopAlgorithm.ES256), DpopAlgorithm.ES256)


@pytest.fixture
def dpop() -> dict[str, AppDpop]:
    """app1 is a DPoP app (its set bound to JKT_KEY); app2 is not."""
    return {"app1": AppDpop("app1", ProofKeys((JKT_KEY,)), time.time)}


@pytest.fixture
def authenticator() -> ClientAuthenticator:
    """svc-a may use app2 only; svc-b both apps."""
    return ClientAuthenticator(
        {
            "svc-a": ClientSpec("svc-a", ("app2",), key_sha256=(sha(KEY_A),)),
            "svc-b": ClientSpec("svc-b", ("app1", "app2"), key_sha256=(sha(KEY_B),)),
        }
    )


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
async def api(
    aiohttp_client: ClientFactory,
    authenticator: ClientAuthenticator,
    dpop: dict[str, AppDpop],
) -> TestClient[Any, Any]:
    service = fake_service()
    service.tokens["app1"] = TokenSet(
        "bound-token-" + "z" * 30, "DPoP", NOW - 100, NOW + 3500, None, dpop_jkt=JKT_KEY.jkt
    )
    handler = build_api(ApiDependencies(service, authenticator, Metrics(), FakeClock(), dpop=dpop))
    return await aiohttp_client(RawTestServer(handler), server_kwargs=api_server_options())


async def post_proof(
    api: TestClient[Any, Any], body: object, app: str = "app1", key: str = KEY_B
) -> tuple[int, Any]:
    response = await api.post(f"/v1/token/{app}/proof", json=body, headers=auth(key))
    return response.status, await response.json()


class TestNoTokenAlone:
    """GET /v1/token and POST .../refresh never hand out a DPoP-bound token."""

    @pytest.mark.parametrize(("method", "path"), [("GET", ""), ("POST", "/refresh")])
    async def test_409_dpop_bound_names_the_ways_that_work(
        self, api: TestClient[Any, Any], method: str, path: str
    ) -> None:
        """409 dpop_bound, naming the proxy and the proof route; no token in the body."""
        response = await api.request(method, f"/v1/token/app1{path}", headers=auth(KEY_B))
        body = await response.json()
        assert response.status == 409
        assert body["error"] == "dpop_bound"
        assert "/v1/proxy/app1/" in body["message"] and "/proof" in body["message"]
        assert "bound-token" not in await response.text()

    async def test_the_caller_is_authenticated_first(self, api: TestClient[Any, Any]) -> None:
        """Without a key: 401, not a hint that the app is DPoP-bound."""
        response = await api.get("/v1/token/app1", headers={})
        assert response.status == 401

    async def test_a_bearer_app_is_served_as_before(self, api: TestClient[Any, Any]) -> None:
        """app2 (no dpop) still gets its token."""
        response = await api.get("/v1/token/app2", headers=auth(KEY_B))
        assert response.status == 200


class TestProofRoute:
    """POST /v1/token/{app}/proof."""

    async def test_token_and_a_proof_of_the_request(self, api: TestClient[Any, Any]) -> None:
        """The proof verifies for that method and URL (no query), with ath and the nonce."""
        url = "https://api.example.com/v1/items?page=2#x"
        status, body = await post_proof(api, {"method": "get", "url": url, "nonce": "n-7"})
        assert status == 200, body
        assert set(body) == {"access_token", "token_type", "proof", "expires_in"}
        assert body["token_type"] == "DPoP" and body["expires_in"] == 3500
        verifier = DpopVerifier(require_nonce=True, nonce="n-7")
        jkt = verifier.verify(
            body["proof"],
            "GET",
            "https://api.example.com/v1/items",
            access_token=body["access_token"],
            jkt=JKT_KEY.jkt,
        )
        assert jkt == JKT_KEY.jkt

    async def test_every_call_gets_a_new_proof(self, api: TestClient[Any, Any]) -> None:
        """Two calls, two jti."""
        body = {"method": "POST", "url": "https://api.example.com/v1/items"}
        proofs = [(await post_proof(api, body))[1]["proof"] for _ in range(2)]
        jtis = {jwt.decode(p, options={"verify_signature": False})["jti"] for p in proofs}
        assert len(jtis) == 2

    async def test_same_caller_authorization_as_the_token_route(
        self, api: TestClient[Any, Any]
    ) -> None:
        """No key: 401; a client without the app: 403."""
        response = await api.post(
            "/v1/token/app1/proof", json={"method": "GET", "url": "https://a.example/"}
        )
        assert response.status == 401
        status, body = await post_proof(
            api, {"method": "GET", "url": "https://a.example/"}, key=KEY_A
        )
        assert (status, body["error"]) == (403, "forbidden")

    async def test_an_app_without_dpop_is_404(self, api: TestClient[Any, Any]) -> None:
        """dpop_not_configured for a bearer app."""
        status, body = await post_proof(
            api, {"method": "GET", "url": "https://a.example/"}, app="app2"
        )
        assert (status, body["error"]) == (404, "dpop_not_configured")

    @pytest.mark.parametrize(
        "body",
        [
            None,
            [],
            {"method": "GET"},
            {"url": "https://a.example/"},
            {"method": "G ET", "url": "https://a.example/"},
            {"method": "GET", "url": "/relative"},
            {"method": "GET", "url": "ftp://a.example/"},
            {"method": "GET", "url": "https://user:pw@a.example/"},
            {"method": "GET", "url": "https://a.example/" + "a" * 3000},
            {"method": "GET", "url": "https://a.example/", "nonce": 5},
            {"method": "GET", "url": "https://a.example/", "extra": 1},
        ],
    )
    async def test_a_malformed_body_is_400(self, api: TestClient[Any, Any], body: object) -> None:
        """Each malformed body: 400 bad_request, no token."""
        status, answer = await post_proof(api, body)
        assert (status, answer["error"]) == (400, "bad_request")

    async def test_a_missing_key_is_503(
        self, api: TestClient[Any, Any], dpop: dict[str, AppDpop]
    ) -> None:
        """The key the token is bound to left the key file: 503 dpop_key_missing, no token."""
        other = ProofKey(generate_key(DpopAlgorithm.ES256), DpopAlgorithm.ES256)
        dpop["app1"].keys = ProofKeys((other,))
        status, body = await post_proof(api, {"method": "GET", "url": "https://a.example/"})
        assert (status, body["error"]) == (503, "dpop_key_missing")
        assert "access_token" not in body

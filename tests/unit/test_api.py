"""The local API against a fake token service: every status code of the contract."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import RawTestServer, TestClient
from prometheus_client import generate_latest
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from broker.api import ApiDependencies, build_api
from broker.api.auth import ClientAuthenticator
from broker.api.health import build_metrics_app
from broker.api.server import api_server_options
from broker.errors import NeedsAuthorization, RateLimited, TokenUnavailable
from broker.metrics import Metrics
from broker.model import ClientSpec, TokenSet
from tests.support.fake_clock import FakeClock
from tests.support.fakes import NOW, FakeTokenService

KEY_A = "a" * 20 + "-client-key-of-service-a"
KEY_B = "b" * 20 + "-client-key-of-service-b"

ClientFactory = AiohttpClient


def fake_service() -> FakeTokenService:
    """app1 and app2 with an hour's tokens, refreshed 100 s ago."""
    return FakeTokenService(
        {
            "app1": TokenSet("token-one-" + "x" * 30, "Bearer", NOW - 100, NOW + 3500, "read"),
            "app2": TokenSet("token-two-" + "y" * 30, "Bearer", NOW - 100, NOW + 3500, None),
        },
        refreshed_at=NOW - 100,
    )


@pytest.fixture
def service() -> FakeTokenService:
    return fake_service()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def authenticator(tmp_path: Path) -> ClientAuthenticator:
    (tmp_path / "a.key").write_text(KEY_A + "\n")
    return ClientAuthenticator(
        {
            "svc-a": ClientSpec("svc-a", ("app1",), key_files=(tmp_path / "a.key",)),
            "svc-b": ClientSpec(
                "svc-b", ("app1", "app2"), key_sha256=(hashlib.sha256(KEY_B.encode()).hexdigest(),)
            ),
        }
    )


@pytest.fixture
async def api(
    aiohttp_client: ClientFactory,
    service: FakeTokenService,
    authenticator: ClientAuthenticator,
    metrics: Metrics,
) -> TestClient[Any, Any]:
    return await aiohttp_client(
        RawTestServer(build_api(ApiDependencies(service, authenticator, metrics, FakeClock()))),
        server_kwargs=api_server_options(),
    )


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(
    api: TestClient[Any, Any],
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    response = await api.request(method, path, headers=headers if headers is not None else auth())
    return response.status, await response.json(), dict(response.headers)


class TestTokenRoute:
    async def test_returns_the_token_with_no_store(self, api: TestClient[Any, Any]) -> None:
        """200 with the contract's fields and Cache-Control: no-store."""
        status, body, headers = await call(api, "/v1/token/app1")
        assert status == 200
        assert body == {
            "access_token": "token-one-" + "x" * 30,
            "token_type": "Bearer",
            "expires_at": int(NOW + 3500),
            "expires_in": 3500,
            "scope": "read",
        }
        assert headers["Cache-Control"] == "no-store"

    @pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "99999999999"])
    async def test_bad_min_ttl_is_400(self, api: TestClient[Any, Any], value: str) -> None:
        """min_ttl must be a whole, non-negative number of seconds."""
        status, body, _ = await call(api, f"/v1/token/app1?min_ttl={value}")
        assert (status, body["error"]) == (400, "bad_request")

    async def test_min_ttl_above_lifetime_is_400(self, api: TestClient[Any, Any]) -> None:
        """A min_ttl no token can satisfy is a caller error."""
        status, body, _ = await call(api, "/v1/token/app1?min_ttl=4000")
        assert (status, body["error"]) == (400, "bad_request")

    async def test_missing_and_wrong_keys_are_401(self, api: TestClient[Any, Any]) -> None:
        """No key or a wrong key: 401 with WWW-Authenticate: Bearer."""
        for headers in ({}, auth("w" * 40), {"Authorization": "Basic abc"}):
            status, body, response_headers = await call(api, "/v1/token/app1", headers=headers)
            assert (status, body["error"]) == (401, "unauthorized")
            assert response_headers["WWW-Authenticate"].startswith("Bearer")

    async def test_unknown_app_is_404_only_after_auth(self, api: TestClient[Any, Any]) -> None:
        """An unknown app is 404 for a caller, 401 for a stranger (who learns nothing)."""
        assert (await call(api, "/v1/token/nope"))[0] == 404
        assert (await call(api, "/v1/token/nope", headers={}))[0] == 401

    async def test_app_not_allowed_is_403(self, api: TestClient[Any, Any]) -> None:
        """svc-a may not use app2."""
        status, body, _ = await call(api, "/v1/token/app2")
        assert (status, body["error"]) == (403, "forbidden")
        assert (await call(api, "/v1/token/app2", headers=auth(KEY_B)))[0] == 200

    @pytest.mark.parametrize(
        ("error", "status", "code", "retry_after"),
        [
            (NeedsAuthorization("x"), 409, "needs_authorization", False),
            (TokenUnavailable("x", retry_after=7.2), 503, "token_unavailable", True),
        ],
    )
    async def test_service_errors_map_to_codes(
        self,
        api: TestClient[Any, Any],
        service: FakeTokenService,
        error: Exception,
        status: int,
        code: str,
        retry_after: bool,
    ) -> None:
        """Needs authorization is 409; no valid token is 503 with a whole-second Retry-After."""
        service.errors["app1"] = error
        got, body, headers = await call(api, "/v1/token/app1")
        assert (got, body["error"]) == (status, code)
        if retry_after:
            assert headers["Retry-After"] == "8"

    async def test_rate_limited_refresh_is_429(
        self, api: TestClient[Any, Any], service: FakeTokenService
    ) -> None:
        """Too many forced refreshes: 429 rate_limited with Retry-After."""
        service.errors["app1"] = RateLimited("x", retry_after=30)
        status, body, headers = await call(api, "/v1/token/app1/refresh", method="POST")
        assert (status, body["error"], headers["Retry-After"]) == (429, "rate_limited", "30")

    async def test_unknown_route_and_method_are_json(self, api: TestClient[Any, Any]) -> None:
        """404 and 405 answers are JSON errors too."""
        assert (await call(api, "/v2/nothing"))[:2] == (
            404,
            {"error": "not_found", "message": "no such route"},
        )
        status, body, headers = await call(api, "/v1/token/app1", method="DELETE")
        assert (status, body["error"], headers["Allow"]) == (405, "method_not_allowed", "GET")


class TestErrorMessages:
    """Error answers say what is wrong and what to do, naming the app and its last error."""

    async def test_unknown_app_names_it_and_lists_the_callers_apps(
        self, api: TestClient[Any, Any]
    ) -> None:
        """404 unknown_app repeats the name asked for and lists the apps this client may use."""
        _, body, _ = await call(api, "/v1/token/twillio", headers=auth(KEY_B))
        assert body == {
            "error": "unknown_app",
            "message": "no app named 'twillio' is configured; this client may use: app1, app2",
        }
        _, body, _ = await call(api, "/v1/token/twillio")
        assert body["message"].endswith("this client may use: app1")

    async def test_unavailable_says_why_and_where_to_look(
        self, api: TestClient[Any, Any], service: FakeTokenService
    ) -> None:
        """503 names the app's last error, when to retry, GET /v1/apps and the log event."""
        service.errors["app1"] = TokenUnavailable("x", retry_after=4.5)
        service.last_errors["app1"] = "transient: token endpoint answered 503"
        _, body, _ = await call(api, "/v1/token/app1")
        message = body["message"]
        assert "last error: transient: token endpoint answered 503" in message
        assert "retry in 5 s" in message
        assert "GET /v1/apps" in message
        assert "token.refresh_failed" in message

    async def test_unavailable_before_any_failure_says_so(
        self, api: TestClient[Any, Any], service: FakeTokenService
    ) -> None:
        """A 503 while the first refresh is still running does not invent an error."""
        service.errors["app1"] = TokenUnavailable("x", retry_after=1)
        _, body, _ = await call(api, "/v1/token/app1")
        assert "no refresh has failed yet" in body["message"]

    async def test_needs_authorization_says_why_and_what_to_run(
        self, api: TestClient[Any, Any], service: FakeTokenService
    ) -> None:
        """409 names the dead grant's error, the authorize command and the log event."""
        service.errors["app1"] = NeedsAuthorization("x")
        service.last_errors["app1"] = "permanent: invalid_grant: refresh token revoked"
        _, body, _ = await call(api, "/v1/token/app1")
        message = body["message"]
        assert "last error: permanent: invalid_grant: refresh token revoked" in message
        assert "token-broker authorize app1 --config FILE" in message
        assert "app.needs_authorization" in message


class TestAppsRoute:
    async def test_lists_only_the_callers_apps(self, api: TestClient[Any, Any]) -> None:
        """svc-a sees app1 only; svc-b sees both."""
        _, body, _ = await call(api, "/v1/apps")
        assert [a["name"] for a in body["apps"]] == ["app1"]
        _, body, _ = await call(api, "/v1/apps", headers=auth(KEY_B))
        assert [a["name"] for a in body["apps"]] == ["app1", "app2"]

    async def test_openapi_needs_no_key(self, api: TestClient[Any, Any]) -> None:
        """The OpenAPI document is public and lists every route."""
        status, body, _ = await call(api, "/openapi.json", headers={})
        assert status == 200
        assert set(body["paths"]) == {
            "/v1/token/{app}",
            "/v1/token/{app}/refresh",
            "/v1/token/{app}/proof",
            "/v1/apps",
            "/v1/proxy/{app}/{path}",
            "/openapi.json",
        }


class TestAuditAndMetrics:
    async def test_token_issued_once_per_client_per_token(self, api: TestClient[Any, Any]) -> None:
        """token.issued is written the first time a client gets a token, not per request."""
        with capture_logs() as logs:
            for _ in range(5):
                await call(api, "/v1/token/app1")
            await call(api, "/v1/token/app1", headers=auth(KEY_B))
        issued = [e for e in logs if e["event"] == "token.issued"]
        assert [(e["client"], e["audit"]) for e in issued] == [("svc-a", True), ("svc-b", True)]
        assert "token-one" not in repr(logs)

    async def test_client_denied_is_rate_limited(self, api: TestClient[Any, Any]) -> None:
        """Fifty wrong keys in a row: one client.denied line, without the key."""
        with capture_logs() as logs:
            for i in range(50):
                await call(api, "/v1/token/app1", headers=auth(f"wrong-{i}-" + "q" * 30))
        denied = [e for e in logs if e["event"] == "client.denied"]
        assert len(denied) == 1
        assert "wrong-" not in repr(logs)

    async def test_labels_carry_only_configured_names(
        self, api: TestClient[Any, Any], metrics: Metrics
    ) -> None:
        """An unknown app from the URL and a wrong key never become label values."""
        await call(api, "/v1/token/evil-app-name")
        await call(api, "/v1/token/app1", headers=auth("k" * 40))
        await call(api, "/v1/token/app1")
        text = generate_latest(metrics.registry).decode()
        assert "evil-app-name" not in text
        assert "k" * 40 not in text
        assert KEY_A not in text
        assert 'app="app1",client="svc-a",route="/v1/token/{app}",status="200"' in text


class TestMetricsListener:
    async def test_health_readiness_and_metrics(
        self, aiohttp_client: ClientFactory, service: FakeTokenService, metrics: Metrics
    ) -> None:
        """/healthz 200; /readyz 200, then 503 naming the unready app; /metrics is text."""
        client = await aiohttp_client(build_metrics_app(service, metrics))
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 200
        service.unready = ["app2"]
        response = await client.get("/readyz")
        assert response.status == 503
        assert (await response.json()) == {"status": "not_ready", "apps": ["app2"]}
        response = await client.get("/metrics")
        assert "token_broker_build_info" in await response.text()

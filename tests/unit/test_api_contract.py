"""The local API and the metrics listener over real HTTP: every status of the contract."""

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

FILE_KEY = "file-client-key-" + "f" * 32
INLINE_KEY = "inline-client-key-" + "i" * 32
WRONG_KEY = "wrong-client-key-" + "w" * 32
UNCONFIGURED_APP = "unconfigured-app-zq7"

Client = TestClient[Any, Any]
ClientFactory = AiohttpClient


def make_token(name: str, expires_at: float = NOW + 3000, scope: str | None = "read") -> TokenSet:
    """A token set whose access token is recognisable in bodies and logs."""
    return TokenSet(f"access-{name}-" + "t" * 24, "Bearer", NOW - 600, expires_at, scope)


@pytest.fixture
def service() -> FakeTokenService:
    """The fake core: twilio and stripe, nothing answered from memory (every call recorded)."""
    return FakeTokenService(
        {"twilio": make_token("twilio"), "stripe": make_token("stripe", scope=None)},
        refreshed_at=NOW - 600.5,
        reuse=False,
    )


@pytest.fixture
def metrics() -> Metrics:
    """Metrics on a fresh registry."""
    return Metrics()


@pytest.fixture
def clock() -> FakeClock:
    """The clock the API rate-limits its denial logs with."""
    return FakeClock()


@pytest.fixture
def authenticator(tmp_path: Path) -> ClientAuthenticator:
    """`billing` (key file, twilio only) and `reports` (inline SHA-256, both apps)."""
    key_file = tmp_path / "billing.key"
    key_file.write_text(FILE_KEY + "\n")
    return ClientAuthenticator(
        {
            "billing": ClientSpec("billing", ("twilio",), key_files=(key_file,)),
            "reports": ClientSpec(
                "reports",
                ("twilio", "stripe"),
                key_sha256=(hashlib.sha256(INLINE_KEY.encode()).hexdigest(),),
            ),
        }
    )


@pytest.fixture
async def api(
    aiohttp_client: ClientFactory,
    service: FakeTokenService,
    authenticator: ClientAuthenticator,
    metrics: Metrics,
    clock: FakeClock,
) -> Client:
    """A test server running the API app."""
    return await aiohttp_client(
        RawTestServer(build_api(ApiDependencies(service, authenticator, metrics, clock))),
        server_kwargs=api_server_options(),
    )


@pytest.fixture
async def metrics_api(
    aiohttp_client: ClientFactory, service: FakeTokenService, metrics: Metrics
) -> Client:
    """A test server running the metrics app."""
    return await aiohttp_client(build_metrics_app(service, metrics))


def bearer(key: str = FILE_KEY, **extra: str) -> dict[str, str]:
    """Request headers presenting `key`."""
    return {"Authorization": f"Bearer {key}", **extra}


async def call(
    api: Client, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    """(status, JSON body, headers) of one request."""
    response = await api.request(method, path, headers=headers if headers is not None else bearer())
    return response.status, await response.json(), dict(response.headers)


def requests_total_samples(metrics: Metrics) -> list[dict[str, str]]:
    """The label sets of token_broker_requests_total."""
    return [
        sample.labels
        for family in metrics.registry.collect()
        if family.name == "token_broker_requests"
        for sample in family.samples
        if sample.name == "token_broker_requests_total"
    ]


class TestTokenOk:
    """GET /v1/token/{app} and POST /v1/token/{app}/refresh answering 200."""

    async def test_body_and_headers(
        self, api: Client, service: FakeTokenService, clock: FakeClock
    ) -> None:
        """200 with the contract's fields, Cache-Control: no-store, expires_in from now()."""
        service.wall = NOW + 1000.4
        clock.jump_wall(1000.4)
        status, body, headers = await call(api, "/v1/token/twilio")
        assert status == 200
        assert body == {
            "access_token": service.tokens["twilio"].access_token,
            "token_type": "Bearer",
            "expires_at": int(NOW + 3000),
            "expires_in": 1999,
            "scope": "read",
        }
        assert headers["Cache-Control"] == "no-store"
        assert headers["Content-Type"].startswith("application/json")

    async def test_expires_in_follows_the_clock(
        self, api: Client, service: FakeTokenService, clock: FakeClock
    ) -> None:
        """The same token answered later shows fewer seconds left (no stale cached body)."""
        _, first, _ = await call(api, "/v1/token/twilio")
        service.wall += 100
        clock.jump_wall(100)
        _, second, _ = await call(api, "/v1/token/twilio")
        assert (first["expires_in"], second["expires_in"]) == (3000, 2900)

    async def test_expires_at_is_on_the_pods_clock(
        self, api: Client, service: FakeTokenService, clock: FakeClock
    ) -> None:
        """With the fleet clock 40 s ahead of the pod's, expires_at - pod now == expires_in."""
        service.wall = NOW + 40  # the store's clock; the pod's (the caller's) still says NOW
        _, body, _ = await call(api, "/v1/token/twilio")
        assert body["expires_in"] == 2960
        assert body["expires_at"] - int(clock.time()) == body["expires_in"]
        _, listed, _ = await call(api, "/v1/apps", headers=bearer(INLINE_KEY))
        twilio = next(a for a in listed["apps"] if a["name"] == "twilio")
        assert twilio["expires_at"] == int(NOW + 2960)
        assert twilio["last_refresh_at"] == int(NOW - 640.5)

    async def test_expired_token_shows_zero(self, api: Client, service: FakeTokenService) -> None:
        """expires_in never goes negative."""
        service.wall = NOW + 5000
        _, body, _ = await call(api, "/v1/token/twilio")
        assert body["expires_in"] == 0

    async def test_null_scope(self, api: Client) -> None:
        """A token without scope answers `"scope": null`."""
        _, body, _ = await call(api, "/v1/token/stripe", headers=bearer(INLINE_KEY))
        assert body["scope"] is None

    async def test_min_ttl_is_passed_on(self, api: Client, service: FakeTokenService) -> None:
        """A valid min_ttl reaches the service as seconds."""
        status, _, _ = await call(api, "/v1/token/twilio?min_ttl=120")
        assert status == 200
        assert service.calls == [("get", "twilio", 120.0)]

    async def test_refresh(self, api: Client, service: FakeTokenService) -> None:
        """POST .../refresh forces a refresh and answers the token."""
        status, body, headers = await call(api, "/v1/token/twilio/refresh", method="POST")
        assert status == 200
        assert body["access_token"] == service.tokens["twilio"].access_token
        assert headers["Cache-Control"] == "no-store"
        assert service.calls[0] == ("refresh", "twilio", 0.0)


class TestBadRequest:
    """400 bad_request."""

    @pytest.mark.parametrize("query", ["min_ttl=abc", "min_ttl=-1", "min_ttl=1.5", "min_ttl="])
    async def test_bad_min_ttl(self, api: Client, service: FakeTokenService, query: str) -> None:
        """A min_ttl that is not a whole number of seconds is refused before the service."""
        status, body, _ = await call(api, f"/v1/token/twilio?{query}")
        assert (status, body["error"]) == (400, "bad_request")
        assert service.calls == []

    async def test_unknown_query_parameter(self, api: Client) -> None:
        """Any query parameter other than min_ttl is refused."""
        status, body, _ = await call(api, "/v1/token/twilio?ttl=5")
        assert (status, body["error"]) == (400, "bad_request")

    async def test_refresh_takes_no_query(self, api: Client) -> None:
        """POST .../refresh with a query string is refused."""
        status, body, _ = await call(api, "/v1/token/twilio/refresh?x=1", method="POST")
        assert (status, body["error"]) == (400, "bad_request")

    async def test_service_value_error(self, api: Client, service: FakeTokenService) -> None:
        """A ValueError from the service (min_ttl beyond the lifetime) is bad_request."""
        service.errors["twilio"] = ValueError("min_ttl 9000 exceeds the token lifetime")
        status, body, _ = await call(api, "/v1/token/twilio?min_ttl=9000")
        assert status == 400
        assert body == {
            "error": "bad_request",
            "message": "min_ttl 9000 exceeds the token lifetime",
        }


class TestUnauthorized:
    """401 unauthorized."""

    @pytest.mark.parametrize(
        "headers",
        [
            pytest.param({}, id="no-header"),
            pytest.param(bearer(WRONG_KEY), id="wrong-key"),
            pytest.param({"Authorization": f"Basic {FILE_KEY}"}, id="wrong-scheme"),
            pytest.param({"Authorization": "Bearer "}, id="empty-key"),
        ],
    )
    async def test_token_route(self, api: Client, headers: dict[str, str]) -> None:
        """No valid key: 401 with WWW-Authenticate: Bearer."""
        status, body, response_headers = await call(api, "/v1/token/twilio", headers=headers)
        assert (status, body["error"]) == (401, "unauthorized")
        assert response_headers["WWW-Authenticate"].startswith("Bearer")

    async def test_unknown_app_needs_auth_first(self, api: Client) -> None:
        """An unauthenticated request for an unknown app gets 401, not 404."""
        status, body, _ = await call(api, f"/v1/token/{UNCONFIGURED_APP}", headers={})
        assert (status, body["error"]) == (401, "unauthorized")

    async def test_apps_route(self, api: Client) -> None:
        """/v1/apps needs a key too."""
        status, _, _ = await call(api, "/v1/apps", headers=bearer(WRONG_KEY))
        assert status == 401

    async def test_both_key_sources_authenticate(self, api: Client) -> None:
        """A key from a key file and a key given as SHA-256 both authenticate."""
        assert (await call(api, "/v1/token/twilio", headers=bearer(FILE_KEY)))[0] == 200
        assert (await call(api, "/v1/token/twilio", headers=bearer(INLINE_KEY)))[0] == 200

    async def test_lowercase_scheme(self, api: Client) -> None:
        """The Bearer scheme is case-insensitive."""
        status, _, _ = await call(
            api, "/v1/token/twilio", headers={"Authorization": f"bearer {FILE_KEY}"}
        )
        assert status == 200


class TestForbiddenAndNotFound:
    """403 forbidden, 403 bad_host and 404 unknown_app."""

    async def test_client_not_allowed_the_app(self, api: Client, service: FakeTokenService) -> None:
        """A client asking for an app it is not allowed gets 403 forbidden."""
        status, body, _ = await call(api, "/v1/token/stripe")
        assert (status, body["error"]) == (403, "forbidden")
        assert service.calls == []

    async def test_refresh_not_allowed(self, api: Client) -> None:
        """Forced refresh of a foreign app is forbidden too."""
        status, body, _ = await call(api, "/v1/token/stripe/refresh", method="POST")
        assert (status, body["error"]) == (403, "forbidden")

    async def test_unknown_app(self, api: Client) -> None:
        """An authenticated request for an unconfigured app gets 404 unknown_app."""
        status, body, _ = await call(api, f"/v1/token/{UNCONFIGURED_APP}")
        assert (status, body["error"]) == (404, "unknown_app")

    @pytest.mark.parametrize(
        "extra",
        [
            pytest.param({"Host": "evil.example"}, id="evil-host"),
            pytest.param({"Host": "evil.example:8411"}, id="evil-host-port"),
            pytest.param({"Host": "10.0.0.5:8411"}, id="private-ip"),
            pytest.param({"X-Forwarded-For": "10.0.0.9"}, id="x-forwarded-for"),
            pytest.param({"Forwarded": "for=10.0.0.9"}, id="forwarded"),
        ],
    )
    async def test_bad_host(
        self, api: Client, service: FakeTokenService, extra: dict[str, str]
    ) -> None:
        """Non-loopback Host and proxied requests get 403 bad_host, even with a valid key."""
        status, body, _ = await call(api, "/v1/token/twilio", headers=bearer(**extra))
        assert (status, body["error"]) == (403, "bad_host")
        assert service.calls == []

    async def test_bad_host_before_auth(self, api: Client) -> None:
        """The origin check comes first: a rebinding request without a key gets 403, not 401."""
        status, body, _ = await call(api, "/openapi.json", headers={"Host": "evil.example"})
        assert (status, body["error"]) == (403, "bad_host")

    @pytest.mark.parametrize(
        "host", ["localhost:8411", "localhost", "127.0.0.1", "127.0.0.1:8411", "[::1]:8411"]
    )
    async def test_loopback_hosts_allowed(self, api: Client, host: str) -> None:
        """Loopback Host headers, with or without a port, are served."""
        status, _, _ = await call(api, "/v1/token/twilio", headers=bearer(Host=host))
        assert status == 200


class TestServiceErrors:
    """409, 429 and 503 from the service's exceptions."""

    async def test_needs_authorization(self, api: Client, service: FakeTokenService) -> None:
        """NeedsAuthorization becomes 409 needs_authorization naming the authorize command."""
        service.errors["twilio"] = NeedsAuthorization("grant revoked")
        status, body, _ = await call(api, "/v1/token/twilio")
        assert (status, body["error"]) == (409, "needs_authorization")
        assert "token-broker authorize twilio" in body["message"]

    @pytest.mark.parametrize(("retry_after", "header"), [(2.2, "3"), (5.0, "5"), (0.0, "1")])
    async def test_rate_limited(
        self, api: Client, service: FakeTokenService, retry_after: float, header: str
    ) -> None:
        """RateLimited on a forced refresh becomes 429 with Retry-After in whole seconds."""
        service.refresh_errors["twilio"] = RateLimited("slow down", retry_after=retry_after)
        status, body, headers = await call(api, "/v1/token/twilio/refresh", method="POST")
        assert (status, body["error"]) == (429, "rate_limited")
        assert headers["Retry-After"] == header

    @pytest.mark.parametrize(("retry_after", "header"), [(12.3, "13"), (0.0, "1"), (-4.0, "1")])
    async def test_token_unavailable(
        self, api: Client, service: FakeTokenService, retry_after: float, header: str
    ) -> None:
        """TokenUnavailable becomes 503 with Retry-After >= 1 and no-store."""
        service.errors["twilio"] = TokenUnavailable("backing off", retry_after=retry_after)
        status, body, headers = await call(api, "/v1/token/twilio")
        assert (status, body["error"]) == (503, "token_unavailable")
        assert headers["Retry-After"] == header
        assert headers["Cache-Control"] == "no-store"

    async def test_unexpected_exception_is_500_json(
        self, api: Client, service: FakeTokenService
    ) -> None:
        """Any other exception is a JSON 500 that does not echo the exception text."""
        service.errors["twilio"] = RuntimeError("internal detail " + FILE_KEY)
        with capture_logs():
            status, body, _ = await call(api, "/v1/token/twilio")
        assert status == 500
        assert body == {"error": "internal", "message": "internal error"}


class TestRouting:
    """Unknown routes and wrong methods, in JSON."""

    @pytest.mark.parametrize("path", ["/", "/v2/token/twilio", "/v1/token/twilio/extra/x"])
    async def test_unknown_route(self, api: Client, path: str) -> None:
        """An unknown path is 404 not_found in JSON."""
        status, body, headers = await call(api, path)
        assert (status, body["error"]) == (404, "not_found")
        assert headers["Content-Type"].startswith("application/json")

    @pytest.mark.parametrize(
        ("method", "path", "allow"),
        [
            ("POST", "/v1/token/twilio", "GET"),
            ("DELETE", "/v1/token/twilio", "GET"),
            ("GET", "/v1/token/twilio/refresh", "POST"),
            ("PUT", "/v1/apps", "GET"),
            ("POST", "/openapi.json", "GET"),
        ],
    )
    async def test_wrong_method(self, api: Client, method: str, path: str, allow: str) -> None:
        """A known path with the wrong method is 405 method_not_allowed with Allow."""
        status, body, headers = await call(api, path, method=method)
        assert (status, body["error"]) == (405, "method_not_allowed")
        assert headers["Allow"] == allow


class TestAppsAndOpenapi:
    """GET /v1/apps and GET /openapi.json."""

    async def test_apps_lists_only_the_callers_apps(self, api: Client) -> None:
        """Each client sees exactly the apps it is allowed, sorted, with their state."""
        _, billing, headers = await call(api, "/v1/apps")
        _, reports, _ = await call(api, "/v1/apps", headers=bearer(INLINE_KEY))
        assert billing == {
            "apps": [
                {
                    "name": "twilio",
                    "state": "fresh",
                    "expires_at": int(NOW + 3000),
                    "last_refresh_at": int(NOW - 600.5),
                    "last_error": None,
                }
            ]
        }
        assert [app["name"] for app in reports["apps"]] == ["stripe", "twilio"]
        assert headers["Cache-Control"] == "no-store"

    async def test_openapi_without_auth(self, api: Client) -> None:
        """/openapi.json needs no key and lists the six paths."""
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


class TestAuditLogs:
    """token.issued and client.denied audit events, and what logs never hold."""

    async def test_token_issued_once_per_client_per_token(
        self, api: Client, service: FakeTokenService
    ) -> None:
        """Repeat requests log nothing new; a new client or a new token logs once more."""
        with capture_logs() as logs:
            for _ in range(3):
                await call(api, "/v1/token/twilio")
            await call(api, "/v1/token/twilio", headers=bearer(INLINE_KEY))
            await call(api, "/v1/token/twilio", headers=bearer(INLINE_KEY))
            service.tokens["twilio"] = make_token("twilio-2")
            await call(api, "/v1/token/twilio")
        issued = [e for e in logs if e["event"] == "token.issued"]
        assert [(e["client"], e["app"], e["token_fingerprint"]) for e in issued] == [
            ("billing", "twilio", make_token("twilio").fingerprint),
            ("reports", "twilio", make_token("twilio").fingerprint),
            ("billing", "twilio", make_token("twilio-2").fingerprint),
        ]
        assert all(e["audit"] is True for e in issued)

    async def test_client_denied_rate_limited(self, api: Client, clock: FakeClock) -> None:
        """Many wrong-key requests within a minute log client.denied once; later, once more."""
        with capture_logs() as logs:
            for _ in range(10):
                await call(api, "/v1/token/twilio", headers=bearer(WRONG_KEY))
            await clock.advance(30)
            await call(api, "/v1/token/twilio", headers=bearer(WRONG_KEY))
            first_minute = [e for e in logs if e["event"] == "client.denied"]
            await clock.advance(31)
            await call(api, "/v1/token/twilio", headers=bearer(WRONG_KEY))
        denied = [e for e in logs if e["event"] == "client.denied"]
        assert len(first_minute) == 1
        assert len(denied) == 2
        assert denied[0]["reason"] == "unauthorized"
        assert denied[0]["client"] is None

    async def test_forbidden_is_logged_with_the_client(self, api: Client) -> None:
        """A 403 forbidden logs client.denied naming the client and the app."""
        with capture_logs() as logs:
            await call(api, "/v1/token/stripe")
        denied = [e for e in logs if e["event"] == "client.denied"]
        assert [(e["client"], e["app"], e["reason"]) for e in denied] == [
            ("billing", "stripe", "forbidden")
        ]

    async def test_keys_and_tokens_never_logged(
        self, api: Client, service: FakeTokenService
    ) -> None:
        """No captured event holds a client key (right or wrong) or an access token."""
        with capture_logs() as logs:
            await call(api, "/v1/token/twilio")
            await call(api, "/v1/token/stripe")
            await call(api, "/v1/token/twilio", headers=bearer(WRONG_KEY))
            await call(api, f"/v1/token/{UNCONFIGURED_APP}", headers=bearer(INLINE_KEY))
        text = repr(logs)
        assert logs
        for secret in (FILE_KEY, INLINE_KEY, WRONG_KEY, service.tokens["twilio"].access_token):
            assert secret not in text


class TestRequestMetrics:
    """token_broker_requests_total has bounded labels."""

    async def test_labels_never_hold_request_data(self, api: Client, metrics: Metrics) -> None:
        """An unconfigured app name from the URL and presented keys never become label values."""
        await call(api, f"/v1/token/{UNCONFIGURED_APP}")
        await call(api, f"/v1/token/{UNCONFIGURED_APP}", headers=bearer(WRONG_KEY))
        await call(api, f"/v1/token/{UNCONFIGURED_APP}/extra")
        await call(api, "/v1/token/twilio", headers=bearer(WRONG_KEY))
        exposition = generate_latest(metrics.registry).decode()
        for value in (UNCONFIGURED_APP, FILE_KEY, WRONG_KEY):
            assert value not in exposition
        samples = requests_total_samples(metrics)
        assert {s["app"] for s in samples} <= {"", "twilio", "stripe"}
        assert {s["client"] for s in samples} <= {"", "billing", "reports"}

    async def test_counts_by_route_app_client_status(self, api: Client, metrics: Metrics) -> None:
        """Requests are counted under the route template, configured app and client, status."""
        await call(api, "/v1/token/twilio")
        await call(api, "/v1/token/twilio")
        await call(api, "/v1/token/stripe")
        value = metrics.registry.get_sample_value(
            "token_broker_requests_total",
            {"route": "/v1/token/{app}", "app": "twilio", "client": "billing", "status": "200"},
        )
        forbidden = metrics.registry.get_sample_value(
            "token_broker_requests_total",
            {"route": "/v1/token/{app}", "app": "stripe", "client": "billing", "status": "403"},
        )
        assert (value, forbidden) == (2.0, 1.0)


class TestMetricsApp:
    """/metrics, /healthz and /readyz."""

    async def test_metrics(self, metrics_api: Client) -> None:
        """/metrics serves the Prometheus text format from the injected registry."""
        response = await metrics_api.get("/metrics")
        text = await response.text()
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        assert "token_broker_build_info" in text

    async def test_healthz(self, metrics_api: Client) -> None:
        """/healthz is always 200 ok."""
        response = await metrics_api.get("/healthz")
        assert (response.status, await response.json()) == (200, {"status": "ok"})

    async def test_ready(self, metrics_api: Client) -> None:
        """/readyz is 200 when no app is unready."""
        response = await metrics_api.get("/readyz")
        assert (response.status, await response.json()) == (200, {"status": "ready"})

    async def test_not_ready(self, metrics_api: Client, service: FakeTokenService) -> None:
        """/readyz is 503 naming the unready apps."""
        service.unready = ["stripe", "twilio"]
        response = await metrics_api.get("/readyz")
        assert response.status == 503
        assert await response.json() == {"status": "not_ready", "apps": ["stripe", "twilio"]}

    async def test_one_app_ready(self, metrics_api: Client, service: FakeTokenService) -> None:
        """/readyz/{app} is 200 for an app with a servable token, whatever the others' state."""
        service.unready = ["stripe"]
        response = await metrics_api.get("/readyz/twilio")
        assert (response.status, await response.json()) == (
            200,
            {"status": "ready", "app": "twilio"},
        )

    async def test_one_app_not_ready(self, metrics_api: Client, service: FakeTokenService) -> None:
        """/readyz/{app} is 503 with the app's state when it has no servable token."""
        service.unready = ["stripe"]
        response = await metrics_api.get("/readyz/stripe")
        assert response.status == 503
        assert await response.json() == {"status": "not_ready", "app": "stripe", "state": "fresh"}

    async def test_unknown_app_is_404(self, metrics_api: Client) -> None:
        """/readyz/{app} for an app the config does not name is 404 unknown_app."""
        response = await metrics_api.get("/readyz/nope")
        assert response.status == 404
        assert await response.json() == {"status": "unknown_app", "app": "nope"}


class TestRememberedGrants:
    """Authorization decisions are remembered per key and app, and forgotten when they change."""

    async def test_rotated_key_is_refused_at_once(
        self, api: Client, authenticator: ClientAuthenticator, tmp_path: Path
    ) -> None:
        """A key just accepted is 401 as soon as its key file holds another key."""
        assert (await call(api, "/v1/token/twilio"))[0] == 200
        (tmp_path / "billing.key").write_text("n" * 48 + "\n")
        assert authenticator.reload_changed() == ["billing"]
        status, body, _ = await call(api, "/v1/token/twilio")
        assert (status, body["error"]) == (401, "unauthorized")

    async def test_withdrawn_app_is_refused_at_once(
        self, api: Client, authenticator: ClientAuthenticator, tmp_path: Path
    ) -> None:
        """A client whose grant a reload withdrew gets 403 with the key that just worked."""
        assert (await call(api, "/v1/token/twilio"))[0] == 200
        authenticator.replace(
            {"billing": ClientSpec("billing", ("stripe",), key_files=(tmp_path / "billing.key",))}
        )
        status, body, _ = await call(api, "/v1/token/twilio")
        assert (status, body["error"]) == (403, "forbidden")

    async def test_removed_app_is_404_at_once(self, api: Client, service: FakeTokenService) -> None:
        """An app removed from the broker is 404 unknown_app for a caller it just served."""
        assert (await call(api, "/v1/token/stripe", headers=bearer(INLINE_KEY)))[0] == 200
        del service.tokens["stripe"]
        status, body, _ = await call(api, "/v1/token/stripe", headers=bearer(INLINE_KEY))
        assert (status, body["error"]) == (404, "unknown_app")

"""The injecting proxy end to end: a real broker, the real test OAuth server, and a real TLS API.

The API (tests/support/upstream.py) checks every bearer JWT against the authorization server's
JWKS and answers 401 for an expired or revoked one, so a 200 through the proxy proves a valid
token was attached.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests

from broker.app import Broker, reload_config
from broker.serving import FORCE_MIN_AGE
from tests.support.broker_process import BrokerFiles, BrokerProcess, running_broker
from tests.support.config import Document, edit_config
from tests.support.oauth_server import OAuthTestServer
from tests.support.peers import shared_directory
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.upstream import UpstreamServer, pattern_digest

pytestmark = pytest.mark.integration

OTHER_KEY = "o" * 20 + "-key-of-a-client-without-app1"
MIB = 1024 * 1024
# The test upstreams listen on loopback, which the egress guard refuses unless allowed.
LOOPBACK = ["127.0.0.0/8"]


# The proxy's two data paths: the API's route (aiohttp) and the proxy listener (lean).
PATHS = ["api", "listener"]


def proxy_config(
    tmp_path: Path,
    oauth: OAuthTestServer,
    upstream: UpstreamServer,
    ca_file: Path,
    redis: RedisServer,
    data_path: str = "api",
    **proxy: Any,
) -> BrokerFiles:
    """A broker whose app1 proxies to the upstream (paths under /v1/), and whose app `scim`
    (never authorized) proxies there too. A second client, `other`, may use only `scim`.
    The store is a real Redis: an authorization_code app's grant lives in a shared store."""
    refresh = {"at_fraction": 0.75, "min_remaining": 1, "jitter": 0.05, "safety_margin": 1}
    app1 = {
        "token_url": oauth.token_url,
        "client_id": oauth.client_id,
        "client_secret_file": "client_secret",
        "refresh": refresh,
        "proxy": {
            "upstream": upstream.url,
            "ca_file": str(ca_file),
            "path_prefixes": ["/v1/"],
            "connect_timeout": "2s",
            "read_timeout": "1s",
            "max_buffered_body": "64KiB",
            "allowed_networks": LOOPBACK,
            **proxy,
        },
    }
    scim = {
        "grant_type": "authorization_code",
        "required": False,
        "token_url": oauth.token_url,
        "authorize_url": oauth.authorize_url,
        "redirect_uri": "http://127.0.0.1/callback",
        "client_id": oauth.client_id,
        "client_secret_file": "client_secret",
        "proxy": {"upstream": upstream.url, "ca_file": str(ca_file), "allowed_networks": LOOPBACK},
    }
    files = BrokerFiles(
        directory=tmp_path / "broker",
        token_url=oauth.token_url,
        store_url=redis.url,
        apps={"app1": app1, "scim": scim},
        proxy_port=free_port() if data_path == "listener" else 0,
    )
    path = files.write()
    (files.directory / "other.key").write_text(OTHER_KEY)
    edit_config(
        path,
        lambda config: config["clients"].update(other={"key_file": "other.key", "apps": ["scim"]}),
    )
    return files


@pytest.fixture(params=PATHS)
def data_path(request: pytest.FixtureRequest) -> str:
    """Each proxy test runs against the API's proxy route and against the proxy listener."""
    value: str = request.param
    return value


@pytest.fixture
def files(
    tmp_path: Path,
    oauth_server: OAuthTestServer,
    upstream: UpstreamServer,
    ca_file: Path,
    redis_server: RedisServer,
    data_path: str,
) -> BrokerFiles:
    return proxy_config(tmp_path, oauth_server, upstream, ca_file, redis_server, data_path)


@pytest.fixture
async def broker(files: BrokerFiles) -> AsyncIterator[Broker]:
    async with running_broker(files.directory / "config.yaml") as running:
        await running.core.get_token("app1")
        yield running


def proxied(files: BrokerFiles, path: str, app: str = "app1") -> str:
    return f"{files.proxy}/v1/proxy/{app}{path}"


async def call(
    files: BrokerFiles,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    app: str = "app1",
    **kwargs: Any,
) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method,
            proxied(files, path, app),
            headers={**files.auth, **(headers or {})},
            allow_redirects=False,
            **kwargs,
        ) as response:
            return response.status, dict(response.headers), await response.read()


def sample(broker: Broker, name: str, **labels: str) -> float:
    return broker.metrics.registry.get_sample_value(name, labels) or 0.0


async def wait_for_token_age(oauth: OAuthTestServer, age: float) -> None:
    """Sleep until the newest token is `age` seconds old (a younger one is not force-refreshed)."""
    issued = max(r.at for r in oauth.requests if r.status == 200)
    await asyncio.sleep(max(0.0, issued + age - time.time()))


# (method, path, request kwargs, status, JSON body (or the error code of the contract's JSON),
# header prefixes, upstream statuses)
PASSED_BACK = [
    pytest.param(
        "POST",
        "/v1/items",
        {"json": {"name": "widget", "n": 3}},
        201,
        {"created": {"name": "widget", "n": 3}},
        {},
        [201],
        id="post-json-round-trips",
    ),
    pytest.param(
        "GET",
        "/v1/redirect",
        {},
        302,
        None,
        {"Location": "https://elsewhere.invalid/landing"},
        [302],
        id="redirect-passed-back-not-followed",
    ),
    pytest.param(
        "GET", "/v1/error", {}, 500, {"upstream": "broken"}, {}, None, id="upstream-500-passed"
    ),
    pytest.param(
        "GET",
        "/v1/slow?seconds=3",
        {},
        504,
        "upstream_timeout",
        {"Content-Type": "application/json"},
        None,
        id="slow-upstream-504",
    ),
]

# (app, path, headers, status, error code, a part of the message)
REFUSED = [
    pytest.param(
        "app1",
        "/v1/items/1",
        {"Authorization": f"Bearer {OTHER_KEY}"},
        403,
        "forbidden",
        "",
        id="caller-not-allowed-the-app",
    ),
    pytest.param(
        "app1",
        "/v1/items/1",
        {"Authorization": "Bearer " + "n" * 40},
        401,
        "unauthorized",
        "",
        id="wrong-key",
    ),
    *(
        pytest.param("app1", path, {}, 403, "path_not_allowed", "", id=f"outside-prefixes-{path}")
        for path in ["/admin/users", "/v1", "/v10/items", "/"]
    ),
    pytest.param(
        "scim",
        "/v1/items/1",
        {},
        409,
        "needs_authorization",
        "token-broker authorize scim --config FILE",
        id="app-needs-authorization",
    ),
]


class TestForwarding:
    async def test_get_json_reaches_the_upstream_with_a_valid_token(
        self, broker: Broker, files: BrokerFiles, upstream: UpstreamServer
    ) -> None:
        """A GET is forwarded with the app's bearer JWT, the query intact, the caller's key gone."""
        status, headers, body = await call(files, "GET", "/v1/items/42?expand=a%20b&x=1")
        assert status == 200, body
        assert json.loads(body) == {"id": "42", "query": "expand=a%20b&x=1"}
        assert headers["Content-Type"].startswith("application/json")
        [hit] = upstream.hits
        assert hit.headers["Host"] == f"127.0.0.1:{upstream.port}"
        token = broker.core.cached_token("app1")
        assert token is not None
        assert hit.headers["Authorization"] == f"Bearer {token.access_token}"
        assert files.client_key not in json.dumps(hit.headers)

    async def test_hop_by_hop_forwarding_and_credential_headers_are_dropped(
        self, broker: Broker, files: BrokerFiles, upstream: UpstreamServer
    ) -> None:
        """Connection-listed, proxy and X-Forwarded-* headers stay behind; cookies and the rest go."""
        status, _, _ = await call(
            files,
            "GET",
            "/v1/items/1",
            headers={
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "secret-hop",
                "Proxy-Authorization": "Basic c2VjcmV0",
                "X-Forwarded-Host": "evil.example",
                "X-Forwarded-Proto": "http",
                "Cookie": "session=abc",
                "X-Request-Id": "req-7",
            },
        )
        assert status == 200
        sent = {name.lower(): value for name, value in upstream.hits[0].headers.items()}
        for dropped in ("x-hop", "proxy-authorization", "x-forwarded-host", "x-forwarded-proto"):
            assert dropped not in sent
        assert sent["cookie"] == "session=abc"
        assert sent["x-request-id"] == "req-7"
        assert sent["host"] == f"127.0.0.1:{upstream.port}"

    @pytest.mark.parametrize(
        ("method", "path", "kwargs", "status", "body", "headers", "statuses"), PASSED_BACK
    )
    async def test_the_upstreams_answer_comes_back(
        self,
        broker: Broker,
        files: BrokerFiles,
        upstream: UpstreamServer,
        method: str,
        path: str,
        kwargs: dict[str, Any],
        status: int,
        body: Any,
        headers: dict[str, str],
        statuses: list[int] | None,
    ) -> None:
        """The upstream's answer (a created item, a redirect, its own error) or the contract's
        JSON error for no answer in time reaches the caller; the broker goes nowhere else."""
        got_status, got_headers, got_body = await call(files, method, path, **kwargs)
        assert got_status == status
        if isinstance(body, str):
            assert json.loads(got_body)["error"] == body
        elif body is not None:
            assert json.loads(got_body) == body
        for name, value in headers.items():
            assert got_headers[name].split(";")[0] == value  # a media type's parameters aside
        if statuses is not None:
            assert upstream.statuses() == statuses

    async def test_metrics_count_proxied_requests(self, broker: Broker, files: BrokerFiles) -> None:
        """token_broker_proxy_requests_total counts by app and answered status."""
        await call(files, "GET", "/v1/items/1")
        await call(files, "GET", "/v1/error")
        assert sample(broker, "token_broker_proxy_requests_total", app="app1", status="200") == 1
        assert sample(broker, "token_broker_proxy_requests_total", app="app1", status="500") == 1
        assert sample(broker, "token_broker_proxy_duration_seconds_count", app="app1") == 2


class TestRetryOn401:
    async def test_a_revoked_token_leads_to_one_refresh_and_one_successful_retry(
        self,
        broker: Broker,
        files: BrokerFiles,
        upstream: UpstreamServer,
        oauth_server: OAuthTestServer,
    ) -> None:
        """Revoked upstream: exactly one token request, one retry, and the caller sees only 200."""
        await wait_for_token_age(oauth_server, FORCE_MIN_AGE + 0.5)
        revoked = broker.core.cached_token("app1")
        assert revoked is not None
        oauth_server.revoke(revoked.access_token)
        before = oauth_server.count()
        status, _, body = await call(files, "POST", "/v1/items", json={"again": True})
        assert status == 201, body
        assert oauth_server.count() == before + 1
        assert upstream.statuses() == [401, 201]
        assert upstream.hits[1].headers["Authorization"] != f"Bearer {revoked.access_token}"
        reason = {"app": "app1", "reason": "unauthorized"}
        assert sample(broker, "token_broker_proxy_retries_total", **reason) == 1

    async def test_a_second_401_goes_back_unchanged(
        self,
        broker: Broker,
        files: BrokerFiles,
        upstream: UpstreamServer,
        oauth_server: OAuthTestServer,
    ) -> None:
        """When the retry is refused too, the caller gets the upstream's 401 as it was."""
        await wait_for_token_age(oauth_server, FORCE_MIN_AGE + 0.5)
        upstream.reject_next = 2
        before = oauth_server.count()
        status, headers, body = await call(files, "GET", "/v1/items/1")
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert json.loads(body) == {"error": "invalid_token", "detail": "rejected by the test"}
        assert upstream.statuses() == [401, 401]
        assert oauth_server.count() == before + 1

    async def test_a_streamed_body_is_not_replayed(
        self,
        broker: Broker,
        files: BrokerFiles,
        upstream: UpstreamServer,
        oauth_server: OAuthTestServer,
    ) -> None:
        """A body over max_buffered_body is sent once; its 401 goes back without a refresh."""
        upstream.reject_next = 1
        before = oauth_server.count()
        status, _, _ = await call(files, "PUT", "/v1/upload", data=b"x" * (256 * 1024))
        assert status == 401
        assert upstream.statuses() == [401]
        assert oauth_server.count() == before
        reason = {"app": "app1", "reason": "not_replayable"}
        assert sample(broker, "token_broker_proxy_retries_total", **reason) == 1


class TestFailsClosed:
    async def test_authorization_server_down_gives_503_and_forwards_nothing(
        self,
        files: BrokerFiles,
        upstream: UpstreamServer,
        oauth_server: OAuthTestServer,
    ) -> None:
        """Once no token is servable: 503 token_unavailable with Retry-After, no request upstream."""
        oauth_server.lifetime = 3.0
        async with running_broker(files.directory / "config.yaml") as broker:
            await broker.core.get_token("app1")
            await oauth_server.stop()
            deadline = time.monotonic() + 20
            status = 200
            while status != 503 and time.monotonic() < deadline:
                status, headers, body = await call(files, "GET", "/v1/items/1")
                await asyncio.sleep(0.1)
            assert status == 503
            forwarded = len(upstream.hits)
            for _ in range(3):
                status, headers, body = await call(files, "GET", "/v1/items/1")
                assert status == 503
                assert json.loads(body)["error"] == "token_unavailable"
                assert int(headers["Retry-After"]) >= 1
            # The same message as the token route: the app's last error and when to retry.
            message = json.loads(body)["message"]
            assert "no valid token for app app1 right now (last error: " in message
            assert f"retry in {headers['Retry-After']} s" in message
            assert len(upstream.hits) == forwarded
            assert all(hit.status == 200 for hit in upstream.hits)  # never an expired token


class TestUpstreamFailures:
    async def test_an_upstream_that_is_down_gives_502(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        ca_file: Path,
        redis_server: RedisServer,
        data_path: str,
    ) -> None:
        """Nothing listening upstream: 502 upstream_error in the contract's JSON."""
        await upstream.stop()
        files = proxy_config(tmp_path, oauth_server, upstream, ca_file, redis_server, data_path)
        async with running_broker(files.directory / "config.yaml"):
            status, _, body = await call(files, "GET", "/v1/items/1")
        assert status == 502
        assert json.loads(body)["error"] == "upstream_error"

    async def test_an_untrusted_upstream_certificate_gives_502(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        ca_file: Path,
        redis_server: RedisServer,
        data_path: str,
    ) -> None:
        """TLS is verified by default: without the test CA the upstream is refused."""
        files = proxy_config(tmp_path, oauth_server, upstream, ca_file, redis_server, data_path)
        edit_config(
            files.directory / "config.yaml",
            lambda config: config["apps"]["app1"]["proxy"].pop("ca_file"),
        )
        async with running_broker(files.directory / "config.yaml"):
            status, _, body = await call(files, "GET", "/v1/items/1")
        assert status == 502
        assert "TLS" in json.loads(body)["message"]
        assert upstream.hits == []


async def raw_request(port: int, request_line: str, headers: dict[str, str]) -> int:
    """Send one request as raw bytes (no client normalizes it); returns the status code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"{request_line}\r\n{head}Connection: close\r\n\r\n".encode())
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return int(status_line.split()[1])


class TestCallersAndPaths:
    @pytest.mark.parametrize(("app", "path", "headers", "status", "error", "message"), REFUSED)
    async def test_refused_requests_forward_nothing(
        self,
        broker: Broker,
        files: BrokerFiles,
        upstream: UpstreamServer,
        app: str,
        path: str,
        headers: dict[str, str],
        status: int,
        error: str,
        message: str,
    ) -> None:
        """A caller not allowed the app, a wrong key, a path outside the prefixes, an app without
        a grant: the contract's error, and nothing reaches the upstream."""
        got_status, _, body = await call(files, "GET", path, headers=headers, app=app)
        assert got_status == status
        assert json.loads(body)["error"] == error
        assert message in json.loads(body)["message"]
        assert upstream.hits == []

    @pytest.mark.parametrize(
        "target",
        [
            "/v1/proxy/app1/v1/../../admin",
            "/v1/proxy/app1/v1/%2e%2e/%2E%2E/admin",
            "/v1/proxy/app1/v1/items%2F..%2F..%2Fadmin",
            "/v1/proxy/app1/v1/items%2fx",
            "/v1/proxy/app1/v1%5C..%5Cadmin",
            "/v1/proxy/app1/v1\\..\\admin",
            "/v1/proxy/app1//evil.example/v1/items",
            "/v1/proxy/app1/https://evil.example/v1/items",
            "/v1/proxy/app1/@evil.example/v1/items",
            "/v1/proxy/app1/v1/items/1%00",
            "https://evil.example/v1/proxy/app1/v1/items/1",
            "//evil.example/v1/proxy/app1/v1/items/1",
            "/v1/proxy/app1/v1/items/1#@evil.example",
        ],
    )
    async def test_attempts_to_reach_another_host_or_path_are_refused(
        self, broker: Broker, files: BrokerFiles, upstream: UpstreamServer, target: str
    ) -> None:
        """Absolute URLs, dot segments, encoded separators and @ never leave the allowed paths."""
        status = await raw_request(
            files.proxy_port or files.api_port,
            f"GET {target} HTTP/1.1",
            {"Host": "127.0.0.1", **files.auth},
        )
        assert 400 <= status < 500
        assert upstream.hits == []

    async def test_host_games_are_refused_or_ignored(
        self, broker: Broker, files: BrokerFiles, upstream: UpstreamServer
    ) -> None:
        """A foreign Host is refused (bad_host); X-Forwarded-Host never reaches the upstream."""
        status = await raw_request(
            files.proxy_port or files.api_port,
            "GET /v1/proxy/app1/v1/items/1 HTTP/1.1",
            {"Host": "evil.example", **files.auth},
        )
        assert status == 403
        assert upstream.hits == []
        status = await raw_request(
            files.proxy_port or files.api_port,
            "GET /v1/proxy/app1/v1/items/1 HTTP/1.1",
            {"Host": "127.0.0.1", "X-Forwarded-Host": "evil.example", **files.auth},
        )
        assert status == 200
        [hit] = upstream.hits
        assert hit.headers["Host"] == f"127.0.0.1:{upstream.port}"
        assert "X-Forwarded-Host" not in hit.headers


class TestReload:
    async def test_a_changed_proxy_block_applies_without_a_new_token(
        self,
        broker: Broker,
        files: BrokerFiles,
        upstream: UpstreamServer,
        oauth_server: OAuthTestServer,
    ) -> None:
        """SIGHUP with new path prefixes: they apply at once, and the app keeps its token."""
        assert (await call(files, "GET", "/v1/items/1"))[0] == 200
        path = files.directory / "config.yaml"
        edit_config(
            path, lambda config: config["apps"]["app1"]["proxy"].update(path_prefixes=["/v2/"])
        )
        token = broker.core.cached_token("app1")
        requests_before = oauth_server.count()
        assert await reload_config(broker, path)
        status, _, body = await call(files, "GET", "/v1/items/1")
        assert status == 403
        assert json.loads(body)["error"] == "path_not_allowed"
        assert broker.core.cached_token("app1") is token
        assert oauth_server.count() == requests_before


# ---- over the unix socket, callers known by their uid ------------------------------------------


@pytest.fixture
async def socket_broker(
    files: BrokerFiles, socket_directory: Path
) -> AsyncIterator[tuple[Broker, Path]]:
    """The proxy config served on a unix socket, this process's uid mapped to a client."""
    path = files.directory / "config.yaml"
    socket = socket_directory / "api.sock"

    def on_the_socket(config: Document) -> None:
        config["server"]["proxy_listen" if files.proxy_port else "listen"] = f"unix:{socket}"
        config["clients"]["svc"] = {"uids": [os.geteuid()], "apps": ["app1", "scim"]}

    edit_config(path, on_the_socket)
    async with running_broker(path) as running:
        await running.core.get_token("app1")
        yield running, socket


@pytest.fixture
def socket_directory() -> Iterator[Path]:
    """A short directory for the socket (a unix socket path is limited to 107 bytes)."""
    with shared_directory() as directory:
        yield directory


async def call_over_socket(
    socket: Path, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as session:
        async with session.get(
            f"http://localhost/v1/proxy/app1{path}", headers=headers or {}
        ) as response:
            return response.status, await response.read()


class TestOverTheUnixSocket:
    async def test_a_caller_known_by_its_uid_sends_no_key(
        self, socket_broker: tuple[Broker, Path], upstream: UpstreamServer
    ) -> None:
        """On the socket, a mapped uid without a key is forwarded with the app's token."""
        broker, socket = socket_broker
        status, body = await call_over_socket(socket, "/v1/items/7")
        assert status == 200, body
        assert json.loads(body)["id"] == "7"
        [hit] = upstream.hits
        token = broker.core.cached_token("app1")
        assert token is not None
        assert hit.headers["Authorization"] == f"Bearer {token.access_token}"

    async def test_a_wrong_key_from_a_mapped_uid_is_refused(
        self, socket_broker: tuple[Broker, Path], upstream: UpstreamServer
    ) -> None:
        """A presented key decides even on the socket: a wrong one is 401, nothing forwarded."""
        _, socket = socket_broker
        status, body = await call_over_socket(
            socket, "/v1/items/7", {"Authorization": "Bearer " + "w" * 40}
        )
        assert status == 401
        assert json.loads(body)["error"] == "unauthorized"
        assert upstream.hits == []


# ---- real client libraries, as a service would use them ---------------------------------------


Service = Callable[..., tuple[int, Any]]


@contextmanager
def httpx_service(base_url: str, key: str, verify: str) -> Iterator[Service]:
    """A service's httpx client: base URL and key from its settings, no token code."""
    with httpx.Client(
        base_url=base_url,
        headers={"Authorization": f"Bearer {key}"},
        verify=ssl.create_default_context(cafile=verify),
    ) as client:

        def call(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
            response = client.request(method, path, **kwargs)
            return response.status_code, response.json()

        yield call


@contextmanager
def requests_service(base_url: str, key: str, verify: str) -> Iterator[Service]:
    """A service's requests session: base URL and key from its settings, no token code."""
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {key}"

        def call(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
            response = session.request(method, base_url + path, timeout=10, verify=verify, **kwargs)
            return response.status_code, response.json()

        yield call


# (a service's client, GET path, its query, POST body, the item the upstream answers)
LIBRARIES = [
    pytest.param(httpx_service, "/v1/items/7", {}, {"a": 1}, {"id": "7", "query": ""}, id="httpx"),
    pytest.param(
        requests_service,
        "/v1/items/9",
        {"q": "x y"},
        {"b": 2},
        {"id": "9", "query": "q=x+y"},
        id="requests",
    ),
]


class TestClientLibraries:
    @pytest.mark.parametrize(("service", "path", "params", "posted", "item"), LIBRARIES)
    async def test_through_the_broker_a_library_needs_only_base_url_and_key(
        self,
        broker: Broker,
        files: BrokerFiles,
        upstream: UpstreamServer,
        ca_file: Path,
        service: Callable[[str, str, str], AbstractContextManager[Service]],
        path: str,
        params: dict[str, str],
        posted: dict[str, int],
        item: dict[str, str],
    ) -> None:
        """The same httpx or requests code works against the API directly and through the broker."""

        def use(base_url: str, key: str) -> tuple[Any, Any]:
            with service(base_url, key, str(ca_file)) as call:
                _, got = call("GET", path, params=params)
                status, created = call("POST", "/v1/items", json=posted)
                assert status == 201
                return got, created

        token = broker.core.cached_token("app1")
        assert token is not None
        direct = await asyncio.to_thread(use, upstream.url, token.access_token)
        via_broker = await asyncio.to_thread(use, f"{files.proxy}/v1/proxy/app1", files.client_key)
        assert direct == via_broker == (item, {"created": posted})


# ---- streaming, in a broker process whose memory is read -------------------------------------


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


class TestStreaming:
    async def test_20_mb_upload_and_download_stream_with_flat_memory(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        ca_file: Path,
        redis_server: RedisServer,
        data_path: str,
    ) -> None:
        """20 MiB each way arrive intact, and the broker's peak memory grows far less than that.

        A proxy that buffered either body would raise its peak resident memory by at least the
        body's 20 MiB. A streaming one holds a few 64 KiB chunks per direction; allocator and
        TLS buffers and a loaded machine add noise, hence the bound of 12 MiB: well clear of
        the noise, well below one buffered body.
        """
        files = proxy_config(
            tmp_path, oauth_server, upstream, ca_file, redis_server, data_path, read_timeout="20s"
        )
        broker = BrokerProcess(files.directory / "config.yaml", tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            assert broker.process is not None
            pid = broker.process.pid
            await call(files, "PUT", "/v1/upload", data=b"warm-up" * 20000)
            await call(files, "GET", "/v1/download?size=300000")
            before = peak_rss_mib(pid)
            lines_before = len(broker.output().splitlines())

            size = 20 * MIB

            async def upload_body() -> AsyncIterator[bytes]:
                for _ in range(size // MIB):
                    yield b"u" * MIB

            status, _, body = await call(files, "PUT", "/v1/upload", data=upload_body())
            assert status == 200
            assert json.loads(body) == {
                "size": size,
                "sha256": hashlib.sha256(b"u" * size).hexdigest(),
            }

            digest = hashlib.sha256()
            received = 0
            async with aiohttp.ClientSession() as session:
                url = proxied(files, f"/v1/download?size={size}")
                async with session.get(url, headers=files.auth) as response:
                    assert response.status == 200
                    assert response.headers["Content-Length"] == str(size)
                    async for chunk in response.content.iter_chunked(MIB):
                        digest.update(chunk)
                        received += len(chunk)
            assert received == size
            assert digest.hexdigest() == pattern_digest(size)

            growth = peak_rss_mib(pid) - before
            assert growth < 12, f"peak memory grew by {growth:.1f} MiB"
            # Nothing per request at the default level, and never a token.
            assert len(broker.output().splitlines()) == lines_before
            for token in oauth_server.issued_tokens:
                assert token not in broker.output()
        finally:
            await broker.terminate_async()

"""Issue 22 end to end: one app reaching several hosts with one token, the egress guard, and
401s that say what the caller sent.

Real broker processes (`python -m broker serve`) and real TLS APIs (tests/support/upstream.py,
which accept only valid bearer JWTs of the test authorization server). Where a test needs a
name that resolves to the metadata address, the broker runs in this process, whose resolver
the test replaces for that one name.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests
import trustme

from tests.support.broker_process import REPO_ROOT, BrokerFiles, BrokerProcess, running_broker
from tests.support.config import edit_config
from tests.support.oauth_server import OAuthTestServer
from tests.support.peers import shared_directory
from tests.support.ports import free_port
from tests.support.upstream import UpstreamServer

pytestmark = pytest.mark.integration

# The test APIs listen on loopback, which the egress guard refuses unless allowed.
LOOPBACK = ["127.0.0.0/8"]
TWILIO_SID = "AC" + "0123456789abcdef" * 2
TWILIO_AUTH_TOKEN = "auth-token-" + "s" * 21


def write_config(
    tmp_path: Path,
    oauth: OAuthTestServer,
    proxy: dict[str, Any],
    *,
    server: dict[str, Any] | None = None,
    uid_client: bool = False,
    data_path: str = "api",
) -> BrokerFiles:
    """A broker whose app `twilio` has the given `proxy` block (memory store), served on the
    API's proxy route or (`data_path="listener"`) on the proxy listener."""
    files = BrokerFiles(
        directory=tmp_path / "broker",
        token_url=oauth.token_url,
        apps={
            "twilio": {
                "token_url": oauth.token_url,
                "client_id": oauth.client_id,
                "client_secret_file": "client_secret",
                "proxy": proxy,
            }
        },
        server_overrides=server or {},
        proxy_port=free_port() if data_path == "listener" else 0,
    )
    path = files.write()
    if uid_client:
        edit_config(
            path,
            lambda config: config["clients"].update(
                uid={"uids": [os.geteuid()], "apps": ["twilio"]}
            ),
        )
    return files


@pytest.fixture(params=["api", "listener"])
def data_path(request: pytest.FixtureRequest) -> str:
    """Each test runs against the API's proxy route and against the proxy listener."""
    value: str = request.param
    return value


@pytest.fixture
async def second_upstream(
    oauth_server: OAuthTestServer, test_ca: trustme.CA
) -> AsyncIterator[UpstreamServer]:
    """Another API host, trusting the same authorization server and CA as `upstream`."""
    server = UpstreamServer(oauth_server, test_ca)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Any]:
    """Start `python -m broker serve` for a BrokerFiles, ready; stopped after the test."""
    started: list[BrokerProcess] = []

    async def start(files: BrokerFiles) -> BrokerProcess:
        broker = BrokerProcess(
            files.directory / "config.yaml", tmp_path / f"broker-{len(started)}.log"
        )
        started.append(broker)
        broker.start()
        await broker.wait_ready(files.metrics)
        return broker

    try:
        yield start
    finally:
        for broker in started:
            await broker.terminate_async()


async def call(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, url, headers=headers or {}, allow_redirects=False, **kwargs
        ) as response:
            return response.status, dict(response.headers), await response.read()


async def metric(files: BrokerFiles, series: str) -> float:
    """One series' value from the broker's /metrics (0 when absent)."""
    _, _, body = await call(f"{files.metrics}/metrics")
    for line in body.decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- several hosts, one token --------------------------------------------------------------


@pytest.fixture
def two_hosts(
    tmp_path: Path,
    oauth_server: OAuthTestServer,
    upstream: UpstreamServer,
    second_upstream: UpstreamServer,
    ca_file: Path,
    data_path: str,
) -> BrokerFiles:
    """App `twilio` with two upstreams: `api` (every path, the string shorthand) and
    `messaging` (only /v1/items, the mapping form)."""
    return write_config(
        tmp_path,
        oauth_server,
        {
            "upstreams": {
                "api": upstream.url,
                "messaging": {"origin": second_upstream.url, "path_prefixes": ["/v1/items"]},
            },
            "ca_file": str(ca_file),
            "allowed_networks": LOOPBACK,
        },
        data_path=data_path,
    )


class TestSeveralUpstreams:
    async def test_one_token_reaches_two_hosts(
        self,
        serve: Any,
        two_hosts: BrokerFiles,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        second_upstream: UpstreamServer,
    ) -> None:
        """Both hosts get the same valid token, from one token request for the app."""
        await serve(two_hosts)
        proxy = f"{two_hosts.proxy}/v1/proxy/twilio"
        status, _, body = await call(f"{proxy}/api/v1/items/1?x=1", headers=two_hosts.auth)
        assert status == 200, body
        assert json.loads(body) == {"id": "1", "query": "x=1"}
        status, _, body = await call(f"{proxy}/messaging/v1/items/2", headers=two_hosts.auth)
        assert status == 200, body
        assert json.loads(body) == {"id": "2", "query": ""}
        status, _, _ = await call(
            f"{proxy}/api/v1/items", "POST", headers=two_hosts.auth, json={"n": 1}
        )
        assert status == 201

        assert oauth_server.count() == 1
        [token] = oauth_server.issued_tokens
        first, created = upstream.hits
        [second] = second_upstream.hits
        assert first.raw_path == "/v1/items/1?x=1" and second.raw_path == "/v1/items/2"
        for hit in (first, created, second):
            assert hit.headers["Authorization"] == f"Bearer {token}"
            assert two_hosts.client_key not in json.dumps(hit.headers)
        assert first.headers["Host"] == f"127.0.0.1:{upstream.port}"
        assert second.headers["Host"] == f"127.0.0.1:{second_upstream.port}"

    async def test_a_base_url_per_host_is_all_an_sdk_needs(
        self,
        serve: Any,
        two_hosts: BrokerFiles,
        second_upstream: UpstreamServer,
    ) -> None:
        """As twilio-python's `client.messaging.base_url = ...`: requests under the upstream's
        base URL reach that host with its own path."""
        await serve(two_hosts)

        def use() -> Any:
            with httpx.Client(
                base_url=f"{two_hosts.proxy}/v1/proxy/twilio/messaging", headers=two_hosts.auth
            ) as client:
                return client.get("/v1/items/5").json()

        assert await asyncio.to_thread(use) == {"id": "5", "query": ""}
        assert [hit.raw_path for hit in second_upstream.hits] == ["/v1/items/5"]

    async def test_each_upstream_keeps_its_own_paths_and_unknown_names_are_404(
        self,
        serve: Any,
        two_hosts: BrokerFiles,
        upstream: UpstreamServer,
        second_upstream: UpstreamServer,
    ) -> None:
        """`messaging` opens only its prefixes; an unknown or missing upstream name is a JSON
        404 that lists the names; a redirect on a named upstream is passed back."""
        await serve(two_hosts)
        proxy = f"{two_hosts.proxy}/v1/proxy/twilio"
        status, _, body = await call(f"{proxy}/messaging/v1/upload", headers=two_hosts.auth)
        assert status == 403
        answer = json.loads(body)
        assert answer["error"] == "path_not_allowed"
        assert "upstream messaging" in answer["message"]
        for wrong in ("voice/v1/items/1", "v1/items/1"):
            status, headers, body = await call(f"{proxy}/{wrong}", headers=two_hosts.auth)
            assert status == 404
            assert headers["Content-Type"].startswith("application/json")
            answer = json.loads(body)
            assert answer["error"] == "unknown_upstream"
            assert repr(wrong.split("/")[0]) in answer["message"]
            assert "api, messaging" in answer["message"]
        assert second_upstream.hits == [] and upstream.hits == []
        status, headers, _ = await call(f"{proxy}/api/v1/redirect", headers=two_hosts.auth)
        assert status == 302
        assert headers["Location"] == "https://elsewhere.invalid/landing"
        assert len(upstream.hits) == 1


# ---- the egress guard ----------------------------------------------------------------------


class TestEgressGuard:
    async def test_a_name_that_resolves_to_loopback_is_refused(
        self,
        serve: Any,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        ca_file: Path,
        data_path: str,
    ) -> None:
        """`localhost` resolves to loopback: 403 egress_refused, counted, nothing reaches the
        API listening there."""
        files = write_config(
            tmp_path,
            oauth_server,
            {"upstream": f"https://localhost:{upstream.port}", "ca_file": str(ca_file)},
            data_path=data_path,
        )
        await serve(files)
        status, headers, body = await call(
            f"{files.proxy}/v1/proxy/twilio/v1/items/1", headers=files.auth
        )
        assert status == 403, body
        assert headers["Content-Type"].startswith("application/json")
        answer = json.loads(body)
        assert answer["error"] == "egress_refused"
        assert "the upstream localhost is at " in answer["message"]
        assert "a loopback address" in answer["message"]
        assert "apps.twilio.proxy.allowed_networks" in answer["message"]
        assert upstream.hits == []
        refused = 'token_broker_proxy_egress_refused_total{app="twilio",reason="loopback"}'
        assert await metric(files, refused) == 1

    async def test_allowed_networks_open_loopback(
        self,
        serve: Any,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        ca_file: Path,
        data_path: str,
    ) -> None:
        """The same `localhost` upstream with 127.0.0.0/8 in allowed_networks is reached (the
        refusal above is the guard's, nothing else's). ::1 stays refused: the API listens on
        127.0.0.1 only, and the same port on ::1 may be another test's."""
        files = write_config(
            tmp_path,
            oauth_server,
            {
                "upstream": f"https://localhost:{upstream.port}",
                "ca_file": str(ca_file),
                "allowed_networks": ["127.0.0.0/8"],
            },
            data_path=data_path,
        )
        await serve(files)
        status, _, body = await call(
            f"{files.proxy}/v1/proxy/twilio/v1/items/1", headers=files.auth
        )
        assert status == 200, body
        assert upstream.statuses() == [200]

    async def test_a_name_that_resolves_to_the_metadata_address_is_refused(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        monkeypatch: pytest.MonkeyPatch,
        data_path: str,
    ) -> None:
        """A name whose DNS answer is 169.254.169.254 (the cloud metadata service) is refused
        before any connection, even with loopback allowed; the answer names the address."""
        lookups: list[str] = []
        real_getaddrinfo = socket.getaddrinfo

        def test_resolver(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host == "metadata.test":
                lookups.append(host)
                address = ("169.254.169.254", int(port))
                return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address)]
            return real_getaddrinfo(host, port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", test_resolver)
        files = write_config(
            tmp_path,
            oauth_server,
            {
                "upstream": "https://metadata.test",
                "connect_timeout": "10s",
                "allowed_networks": ["127.0.0.0/8"],
            },
            data_path=data_path,
        )
        async with running_broker(files.directory / "config.yaml") as broker:
            started = asyncio.get_running_loop().time()
            status, _, body = await call(
                f"{files.proxy}/v1/proxy/twilio/latest/meta-data/iam", headers=files.auth
            )
            elapsed = asyncio.get_running_loop().time() - started
            refused = broker.metrics.registry.get_sample_value(
                "token_broker_proxy_egress_refused_total", {"app": "twilio", "reason": "link_local"}
            )
        assert status == 403, body
        answer = json.loads(body)
        assert answer["error"] == "egress_refused"
        assert "the upstream metadata.test is at 169.254.169.254" in answer["message"]
        assert "link-local" in answer["message"]
        assert lookups == ["metadata.test"]
        assert refused == 1
        # Refused before connecting: an attempt would wait for the 10 s connect timeout or fail.
        assert elapsed < 5

    def test_the_metadata_address_itself_is_a_configuration_error(
        self, tmp_path: Path, oauth_server: OAuthTestServer
    ) -> None:
        """`upstream: https://169.254.169.254` never starts: check-config exits 2 naming the key."""
        files = write_config(tmp_path, oauth_server, {"upstream": "https://169.254.169.254"})
        result = subprocess.run(
            [sys.executable, "-m", "broker", "check-config", "--config", "config.yaml"],
            cwd=files.directory,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert "apps.twilio.proxy.upstream: 169.254.169.254 is a link-local address" in (
            result.stderr
        )
        assert "allowed_networks" in result.stderr


# ---- errors that teach -----------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def socket_directory() -> Iterator[Path]:
    """A short directory for the socket (a unix socket path is limited to 107 bytes)."""
    with shared_directory() as directory:
        yield directory


class TestErrorsThatTeach:
    async def test_twilio_credentials_get_a_401_that_says_what_to_send(
        self,
        serve: Any,
        two_hosts: BrokerFiles,
        upstream: UpstreamServer,
    ) -> None:
        """requests with auth=(Account SID, auth token), as twilio-python sends them: 401
        naming Twilio credentials and the client key, never repeating them; nothing sent."""
        await serve(two_hosts)

        def old_code() -> requests.Response:
            return requests.get(
                f"{two_hosts.proxy}/v1/proxy/twilio/api/2010-04-01/Accounts.json",
                auth=(TWILIO_SID, TWILIO_AUTH_TOKEN),
                timeout=10,
            )

        response = await asyncio.to_thread(old_code)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        answer = response.json()
        assert answer["error"] == "unauthorized"
        assert "Twilio credentials" in answer["message"]
        assert "an Account SID (AC...)" in answer["message"]
        assert "'Authorization: Bearer <client key>'" in answer["message"]
        assert TWILIO_SID not in response.text and TWILIO_AUTH_TOKEN not in response.text
        assert upstream.hits == []

    async def test_other_basic_credentials_are_named_too(
        self, serve: Any, two_hosts: BrokerFiles, upstream: UpstreamServer
    ) -> None:
        """Any HTTP Basic credentials: the 401 says Basic was received, and what to send."""
        await serve(two_hosts)
        status, _, body = await call(
            f"{two_hosts.proxy}/v1/proxy/twilio/api/v1/items/1",
            headers={"Authorization": basic("svc-user", "hunter2-password")},
        )
        assert status == 401
        message = json.loads(body)["message"]
        assert "HTTP Basic credentials" in message
        assert "Bearer <client key>" in message
        assert b"svc-user" not in body and b"hunter2" not in body
        assert upstream.hits == []

    async def test_on_the_unix_socket_the_401_also_offers_peer_identity(
        self,
        serve: Any,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        ca_file: Path,
        socket_directory: Path,
        data_path: str,
    ) -> None:
        """Over the socket, even from a mapped uid, Twilio credentials are refused with the
        same lesson, plus: send no Authorization at all; without them the uid is let through."""
        socket_path = socket_directory / "api.sock"
        files = write_config(
            tmp_path,
            oauth_server,
            {"upstream": upstream.url, "ca_file": str(ca_file), "allowed_networks": LOOPBACK},
            server={
                ("proxy_listen" if data_path == "listener" else "listen"): f"unix:{socket_path}"
            },
            uid_client=True,
            data_path=data_path,
        )
        await serve(files)
        connector = aiohttp.UnixConnector(path=str(socket_path))
        async with aiohttp.ClientSession(connector=connector) as session:
            url = "http://localhost/v1/proxy/twilio/v1/items/3"
            sid = "SK" + "f" * 32
            async with session.get(url, headers={"Authorization": basic(sid, "secret")}) as r:
                assert r.status == 401
                body = await r.read()
            async with session.get(url) as r:
                assert r.status == 200
        message = json.loads(body)["message"]
        assert "Twilio credentials" in message and "an API key SID (SK...)" in message
        assert "no Authorization header at all" in message
        assert sid.encode() not in body
        assert [hit.raw_path for hit in upstream.hits] == ["/v1/items/3"]

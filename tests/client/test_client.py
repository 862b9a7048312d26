"""The client library (clients/python) against a real broker process, over TCP and its unix socket.

The broker (`python -m broker serve`) gets its tokens from the real test OAuth server; the
direct-call tests reach the real TLS API of tests/support/upstream.py, which checks every JWT
against the authorization server, and the twilio-python tests reach a stand-in for
api.twilio.com (tests/support/twilio_api.py) that records what it received. Every sync call of
the library runs in a worker thread: the servers live on this test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import yaml
from twilio.auth_strategy.token_auth_strategy import TokenAuthStrategy
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from broker.serving import FORCE_MIN_AGE
from tests.support.broker_process import CLIENT_KEY, DEFAULT_REFRESH, BrokerProcess
from tests.support.oauth_server import OAuthTestServer
from tests.support.peers import shared_directory
from tests.support.ports import free_port
from tests.support.twilio_api import TwilioStandIn
from tests.support.upstream import UpstreamServer
from token_broker_client import (
    BadRequest,
    BrokerUnreachable,
    Forbidden,
    NotFound,
    TokenSource,
    TokenUnavailable,
    Unauthorized,
)
from token_broker_client.httpx import BrokerAuth
from token_broker_client.requests import BrokerRequestsAuth
from token_broker_client.twilio import (
    BrokerAsyncHttpClient,
    BrokerCredentials,
    BrokerHttpClient,
    BrokerTokenManager,
)

pytestmark = pytest.mark.integration

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
OTHER_KEY = "o" * 20 + "-a-client-that-may-use-app1-only"
# The stand-ins listen on loopback, which the broker's egress guard refuses unless allowed.
LOOPBACK = ["127.0.0.0/8"]


@dataclass
class RunningBroker:
    """A broker process and where to reach it."""

    url: str  # http://127.0.0.1:port or unix:/path
    metrics: str
    process: BrokerProcess

    def count(self, route: str) -> float:
        """token_broker_requests_total summed over every label but `route`."""
        text = httpx.get(f"{self.metrics}/metrics").text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("token_broker_requests_total{") and f'route="{route}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


StartBroker = Callable[..., Awaitable[RunningBroker]]


@pytest.fixture
async def start_broker(
    tmp_path: Path,
    oauth_server: OAuthTestServer,
    twilio_api: TwilioStandIn,
    messaging_api: TwilioStandIn,
) -> AsyncIterator[StartBroker]:
    """Starts a broker (`unix=True`: its API on a unix socket, where this uid is also mapped to
    the client `svc`). Apps: `app1` (tokens), `twilio` (proxy to the stand-ins for
    api.twilio.com and messaging.twilio.com, upstreams `api` and `messaging`), `sms` (proxy to
    the api stand-in alone, one `upstream`), `broken` (its token endpoint is a closed port:
    never a token). Clients: `svc` (every app, by key) and `other` (app1 only)."""
    with ExitStack() as stack:
        started: list[BrokerProcess] = []

        async def start(*, unix: bool = False) -> RunningBroker:
            directory = tmp_path / f"broker{len(started)}"
            directory.mkdir()
            (directory / "secret").write_text(oauth_server_secret(oauth_server))
            (directory / "client.key").write_text(CLIENT_KEY)
            (directory / "other.key").write_text(OTHER_KEY)
            app = {
                "token_url": oauth_server.token_url,
                "client_id": oauth_server.client_id,
                "client_secret_file": "secret",
                "refresh": dict(DEFAULT_REFRESH),
            }
            metrics_port = free_port()
            svc: dict[str, Any] = {
                "key_file": "client.key",
                "apps": ["app1", "broken", "sms", "twilio"],
            }
            if unix:
                socket = stack.enter_context(shared_directory()) / "api.sock"
                listen, url = f"unix:{socket}", f"unix:{socket}"
                svc["uids"] = [os.geteuid()]
            else:
                port = free_port()
                listen, url = f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"
            config = {
                "server": {"listen": listen, "metrics_listen": f"127.0.0.1:{metrics_port}"},
                "apps": {
                    "app1": app,
                    "twilio": {
                        **app,
                        "proxy": {
                            "upstreams": {"api": twilio_api.url, "messaging": messaging_api.url},
                            "allowed_networks": LOOPBACK,
                        },
                    },
                    "sms": {
                        **app,
                        "proxy": {"upstream": twilio_api.url, "allowed_networks": LOOPBACK},
                    },
                    "broken": {
                        **app,
                        "required": False,
                        "token_url": f"http://127.0.0.1:{free_port()}/token",
                    },
                },
                "clients": {"svc": svc, "other": {"key_file": "other.key", "apps": ["app1"]}},
            }
            path = directory / "config.yaml"
            path.write_text(yaml.safe_dump(config))
            process = BrokerProcess(path, directory / "broker.log")
            started.append(process)
            process.start()
            metrics = f"http://127.0.0.1:{metrics_port}"
            await process.wait_ready(metrics)
            return RunningBroker(url, metrics, process)

        try:
            yield start
        finally:
            for process in started:
                try:
                    process.terminate()
                finally:
                    process.kill()


def oauth_server_secret(oauth: OAuthTestServer) -> str:
    """The secret the test OAuth server accepts (it starts with exactly one)."""
    (secret,) = oauth.accepted_secrets
    return secret


def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[Any]:
    """Run a blocking call of the library off the loop that serves the OAuth server."""
    return asyncio.to_thread(function, *args, **kwargs)


def tls(ca_file: Path) -> ssl.SSLContext:
    """A client context that trusts the test CA (what httpx's `verify` takes)."""
    return ssl.create_default_context(cafile=ca_file)


async def wait_for_token_age(oauth: OAuthTestServer, age: float) -> None:
    """Sleep until the newest token is `age` seconds old (the broker's refresh route answers a
    younger one with itself)."""
    issued = max(r.at for r in oauth.requests if r.status == 200)
    await asyncio.sleep(max(0.0, issued + age - time.time()))


@pytest.fixture
def no_twilio_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """This service holds no Twilio credential: none in its environment."""
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_API_KEY", "TWILIO_API_SECRET"):
        monkeypatch.delenv(name, raising=False)


class TestTokenSource:
    async def test_over_tcp_the_source_gets_the_brokers_valid_token(
        self, start_broker: StartBroker, oauth_server: OAuthTestServer
    ) -> None:
        """Over TCP with the client key, get() returns a token the authorization server issued,
        with the broker's expires_in."""
        broker = await start_broker()
        source = TokenSource("app1", url=broker.url, key=CLIENT_KEY)
        token = await in_thread(source.get)
        oauth_server.verify_access_token(token.access_token)
        assert 0 < token.expires_in <= oauth_server.lifetime
        assert token.access_token not in repr(token)

    async def test_over_the_unix_socket_with_a_key_and_by_peer_uid(
        self, start_broker: StartBroker, oauth_server: OAuthTestServer
    ) -> None:
        """Over the unix socket the source works with the key, and without one for a mapped uid."""
        broker = await start_broker(unix=True)
        keyed = TokenSource("app1", url=broker.url, key=CLIENT_KEY)
        by_uid = TokenSource("app1", url=broker.url)
        assert by_uid.endpoint.key is None
        first, second = await in_thread(keyed.get_token), await in_thread(by_uid.get_token)
        oauth_server.verify_access_token(first)
        assert second == first

    async def test_the_environment_names_the_broker_and_the_key_file(
        self, start_broker: StartBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """TOKEN_BROKER_URL and TOKEN_BROKER_KEY_FILE are read as `token-broker token` reads them."""
        broker = await start_broker()
        (tmp_path / "key").write_text(CLIENT_KEY + "\n")
        monkeypatch.setenv("TOKEN_BROKER_URL", broker.url)
        monkeypatch.setenv("TOKEN_BROKER_KEY_FILE", str(tmp_path / "key"))
        assert await in_thread(TokenSource("app1").get_token)

    async def test_the_token_is_kept_until_expires_in_minus_the_margin(
        self, start_broker: StartBroker
    ) -> None:
        """Calls within expires_in - margin ask the broker once; the first call after it asks again."""
        broker = await start_broker()
        now = [1000.0]
        source = TokenSource(
            "app1", url=broker.url, key=CLIENT_KEY, margin=10, clock=lambda: now[0]
        )
        before = await in_thread(broker.count, "/v1/token/{app}")
        token = await in_thread(source.get)
        for _ in range(5):
            assert await in_thread(source.get_token) == token.access_token
        assert await in_thread(broker.count, "/v1/token/{app}") == before + 1
        assert token.fresh_until == pytest.approx(1000.0 + token.expires_in - 10)
        now[0] = token.fresh_until - 0.01
        await in_thread(source.get_token)
        assert await in_thread(broker.count, "/v1/token/{app}") == before + 1
        now[0] = token.fresh_until
        await in_thread(source.get_token)
        assert await in_thread(broker.count, "/v1/token/{app}") == before + 2

    async def test_asyncio_callers_share_one_request(self, start_broker: StartBroker) -> None:
        """Twenty concurrent aget_token() calls make one request to the broker."""
        broker = await start_broker()
        source = TokenSource("app1", url=broker.url, key=CLIENT_KEY)
        before = await in_thread(broker.count, "/v1/token/{app}")
        tokens = await asyncio.gather(*(source.aget_token() for _ in range(20)))
        assert len(set(tokens)) == 1
        assert await in_thread(broker.count, "/v1/token/{app}") == before + 1

    async def test_refresh_gets_a_new_token_once_for_all_who_saw_it_rejected(
        self, start_broker: StartBroker, oauth_server: OAuthTestServer
    ) -> None:
        """refresh(rejected) asks the broker's refresh route for a new token; a second caller
        with the same rejected token gets that new one without another request."""
        broker = await start_broker()
        source = TokenSource("app1", url=broker.url, key=CLIENT_KEY)
        old = await in_thread(source.get_token)
        await wait_for_token_age(oauth_server, FORCE_MIN_AGE + 0.5)
        new = (await in_thread(source.refresh, old)).access_token
        again = (await in_thread(source.refresh, old)).access_token
        assert new != old
        assert again == new
        assert await in_thread(source.get_token) == new
        assert await in_thread(broker.count, "/v1/token/{app}/refresh") == 1


class TestErrors:
    async def test_the_brokers_error_codes_become_exceptions(
        self, start_broker: StartBroker
    ) -> None:
        """unknown_app, unauthorized, forbidden, bad_request and token_unavailable each raise
        their class, with the broker's code and message."""
        broker = await start_broker()

        def error(app: str, key: str, **options: Any) -> Exception:
            try:
                TokenSource(app, url=broker.url, key=key, **options).get_token()
            except Exception as exc:
                return exc
            raise AssertionError(f"{app} gave a token")

        unknown = await in_thread(error, "nope", CLIENT_KEY)
        assert isinstance(unknown, NotFound)
        assert (unknown.status, unknown.code) == (404, "unknown_app")
        assert "nope" in str(unknown)
        bad_key = await in_thread(error, "app1", "x" * 40)
        assert isinstance(bad_key, Unauthorized)
        assert bad_key.code == "unauthorized"
        assert "x" * 40 not in str(bad_key)
        forbidden = await in_thread(error, "twilio", OTHER_KEY)
        assert isinstance(forbidden, Forbidden)
        assert forbidden.code == "forbidden"
        too_long = await in_thread(error, "app1", CLIENT_KEY, min_ttl=10 * 3600)
        assert isinstance(too_long, BadRequest)
        unavailable = await in_thread(error, "broken", CLIENT_KEY)
        assert isinstance(unavailable, TokenUnavailable)
        assert unavailable.retryable
        assert unavailable.retry_after is not None
        assert unavailable.retry_after >= 1

    async def test_no_broker_is_broker_unreachable(self, tmp_path: Path) -> None:
        """A closed port or a missing socket file raises BrokerUnreachable, naming the URL."""
        for url in (f"http://127.0.0.1:{free_port()}", f"unix:{tmp_path}/none.sock"):
            with pytest.raises(BrokerUnreachable, match="cannot reach the broker at"):
                await in_thread(TokenSource("app1", url=url, key=CLIENT_KEY).get_token)


class TestHttpAuth:
    """Direct calls to the TLS API with the broker's token; the API revokes it once."""

    async def revoked_token_answers(
        self,
        start_broker: StartBroker,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        call: Callable[[TokenSource], Awaitable[int]],
    ) -> tuple[RunningBroker, int]:
        broker = await start_broker(unix=True)
        source = TokenSource("app1", url=broker.url)
        first = await in_thread(source.get_token)
        await wait_for_token_age(oauth_server, FORCE_MIN_AGE + 0.5)
        oauth_server.revoke(first)
        status = await call(source)
        statuses = upstream.statuses()
        assert statuses == [401, status], statuses
        tokens = [hit.headers["Authorization"].removeprefix("Bearer ") for hit in upstream.hits]
        assert tokens[0] == first
        assert tokens[1] != first
        oauth_server.verify_access_token(tokens[1])
        return broker, status

    async def test_httpx_sync_refreshes_once_and_retries_after_a_401(
        self,
        start_broker: StartBroker,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        ca_file: Path,
    ) -> None:
        """httpx.Client with BrokerAuth: a 401 for a revoked token, one refresh, the retry's 200."""

        async def call(source: TokenSource) -> int:
            def post() -> int:
                with httpx.Client(auth=BrokerAuth(source), verify=tls(ca_file)) as client:
                    response = client.post(f"{upstream.url}/v1/items", json={"n": 1})
                    assert response.json() == {"created": {"n": 1}}
                    return response.status_code

            return int(await in_thread(post))

        broker, status = await self.revoked_token_answers(
            start_broker, oauth_server, upstream, call
        )
        assert status == 201
        assert await in_thread(broker.count, "/v1/token/{app}/refresh") == 1

    async def test_httpx_async_refreshes_once_and_retries_after_a_401(
        self,
        start_broker: StartBroker,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        ca_file: Path,
    ) -> None:
        """httpx.AsyncClient with BrokerAuth: the same, without blocking the event loop."""

        async def call(source: TokenSource) -> int:
            async with httpx.AsyncClient(auth=BrokerAuth(source), verify=tls(ca_file)) as client:
                response = await client.get(f"{upstream.url}/v1/items/7")
                assert response.json() == {"id": "7", "query": ""}
                return response.status_code

        _, status = await self.revoked_token_answers(start_broker, oauth_server, upstream, call)
        assert status == 200

    async def test_requests_refreshes_once_and_retries_after_a_401(
        self,
        start_broker: StartBroker,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        ca_file: Path,
    ) -> None:
        """requests with BrokerRequestsAuth: the retry resends the body; history holds the 401."""

        async def call(source: TokenSource) -> int:
            def post() -> int:
                with requests.Session() as session:
                    session.auth = BrokerRequestsAuth(source)
                    response = session.post(
                        f"{upstream.url}/v1/items", json={"n": 2}, verify=str(ca_file)
                    )
                    assert response.json() == {"created": {"n": 2}}
                    assert [r.status_code for r in response.history] == [401]
                    return response.status_code

            return int(await in_thread(post))

        _, status = await self.revoked_token_answers(start_broker, oauth_server, upstream, call)
        assert status == 201

    async def test_a_second_401_goes_back_without_another_refresh(
        self,
        start_broker: StartBroker,
        oauth_server: OAuthTestServer,
        upstream: UpstreamServer,
        ca_file: Path,
    ) -> None:
        """When the retry is refused too, its 401 is the answer: one refresh, two requests."""
        broker = await start_broker()
        source = TokenSource("app1", url=broker.url, key=CLIENT_KEY)
        await in_thread(source.get_token)
        await wait_for_token_age(oauth_server, FORCE_MIN_AGE + 0.5)
        upstream.reject_next = 2

        def get() -> int:
            with httpx.Client(auth=BrokerAuth(source), verify=tls(ca_file)) as client:
                return client.get(f"{upstream.url}/v1/items/1").status_code

        assert await in_thread(get) == 401
        assert upstream.statuses() == [401, 401]
        assert await in_thread(broker.count, "/v1/token/{app}/refresh") == 1


class TestTwilio:
    async def test_messages_create_through_the_broker_over_the_unix_socket(
        self,
        start_broker: StartBroker,
        twilio_api: TwilioStandIn,
        no_twilio_credentials: None,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The real SDK's messages.create goes through the broker's proxy over the unix socket
        (no key: this uid is mapped) to the stand-in for api.twilio.com, with the form body and
        the broker's token, although TWILIO_REGION and TWILIO_EDGE are set; the service held no
        Twilio credential."""
        broker = await start_broker(unix=True)
        monkeypatch.setenv("TWILIO_REGION", "ie1")
        monkeypatch.setenv("TWILIO_EDGE", "dublin")
        client = Client(
            account_sid=ACCOUNT_SID,
            http_client=BrokerHttpClient("sms", url=broker.url, upstream="api"),
        )
        assert (client.username, client.password) == (None, None)
        # The SDK does rewrite its hosts: BrokerHttpClient gets api.dublin.ie1.twilio.com.
        assert (
            client.get_hostname("https://api.twilio.com/x") == "https://api.dublin.ie1.twilio.com/x"
        )

        def send() -> Any:
            return client.messages.create(to="+15558675310", from_="+15017122661", body="hi")

        message = await in_thread(send)
        assert message.sid == "SM" + "0" * 32
        assert message.status == "queued"
        (hit,) = twilio_api.hits
        assert hit.method == "POST"
        assert hit.raw_path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
        assert sorted(hit.form) == [
            ("Body", "hi"),
            ("From", "+15017122661"),
            ("To", "+15558675310"),
        ]
        served = await in_thread(TokenSource("sms", url=broker.url).get_token)
        assert hit.headers["Authorization"] == f"Bearer {served}"
        assert hit.headers["User-Agent"].startswith("twilio-python/")

    async def test_one_app_reaches_two_twilio_hosts_with_one_token(
        self,
        start_broker: StartBroker,
        twilio_api: TwilioStandIn,
        messaging_api: TwilioStandIn,
        no_twilio_credentials: None,
    ) -> None:
        """With the app's `proxy.upstreams`, one SDK client reaches api.twilio.com and
        messaging.twilio.com through the broker over the unix socket, the same token on both."""
        broker = await start_broker(unix=True)
        client = Client(account_sid=ACCOUNT_SID, http_client=BrokerHttpClient(url=broker.url))

        def calls() -> list[Any]:
            client.messages.create(to="+15558675310", from_="+15017122661", body="two hosts")
            return list(client.messaging.v1.services.list(limit=5))

        assert await in_thread(calls) == []
        (api_hit,) = twilio_api.hits
        (messaging_hit,) = messaging_api.hits
        assert api_hit.raw_path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
        assert ("Body", "two hosts") in api_hit.form
        assert messaging_hit.method == "GET"
        assert messaging_hit.raw_path.startswith("/v1/Services?")
        assert "PageSize=5" in messaging_hit.raw_path
        served = await in_thread(TokenSource("twilio", url=broker.url).get_token)
        assert api_hit.headers["Authorization"] == f"Bearer {served}"
        assert messaging_hit.headers["Authorization"] == f"Bearer {served}"

    async def test_the_sdks_async_methods_go_through_the_broker_too(
        self,
        start_broker: StartBroker,
        twilio_api: TwilioStandIn,
        no_twilio_credentials: None,
    ) -> None:
        """BrokerAsyncHttpClient: `await client.messages.create_async(...)` reaches the stand-in
        through the broker over the unix socket with the broker's token."""
        broker = await start_broker(unix=True)
        client = Client(account_sid=ACCOUNT_SID, http_client=BrokerAsyncHttpClient(url=broker.url))
        message = await client.messages.create_async(to="+15558675310", from_="+1501", body="a")
        assert message.sid == "SM" + "0" * 32
        (hit,) = twilio_api.hits
        assert hit.raw_path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
        assert ("Body", "a") in hit.form
        served = await in_thread(TokenSource("twilio", url=broker.url).get_token)
        assert hit.headers["Authorization"] == f"Bearer {served}"

    async def test_basic_credentials_in_the_environment_are_never_sent(
        self,
        start_broker: StartBroker,
        twilio_api: TwilioStandIn,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """With TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN left in the environment, the SDK would
        send Basic credentials: BrokerHttpClient drops them, the broker's token goes upstream."""
        broker = await start_broker()
        monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
        monkeypatch.setenv("TWILIO_AUTH_TOKEN", "an-old-auth-token-0123456789")
        client = Client(
            http_client=BrokerHttpClient("sms", url=broker.url, key=CLIENT_KEY, upstream="api")
        )
        await in_thread(client.messages.create, to="+15558675310", from_="+15017122661", body="x")
        (hit,) = twilio_api.hits
        served = await in_thread(TokenSource("sms", url=broker.url, key=CLIENT_KEY).get_token)
        assert hit.headers["Authorization"] == f"Bearer {served}"
        basic = base64.b64encode(f"{ACCOUNT_SID}:an-old-auth-token-0123456789".encode()).decode()
        assert basic not in str(hit.headers)
        assert "an-old-auth-token" not in str(hit.headers)
        assert not any(value.startswith("Basic") for value in hit.headers.values())
        # What the service itself sends (the broker would strip an Authorization anyway): point
        # the HttpClient at the stand-in, which records it: the client key, nothing else.
        seen = Client(
            http_client=BrokerHttpClient(
                "twilio", url=twilio_api.url, key=CLIENT_KEY, upstream="api"
            )
        )
        with pytest.raises(TwilioRestException):
            await in_thread(seen.messages.create, to="+15558675310", from_="+1501", body="y")
        sent = twilio_api.hits[-1]
        assert sent.raw_path == f"/v1/proxy/twilio/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
        assert sent.headers["Authorization"] == f"Bearer {CLIENT_KEY}"
        assert "an-old-auth-token" not in str(sent.headers)

    async def test_the_upstreams_error_reaches_the_sdk_and_the_brokers_is_raised(
        self, start_broker: StartBroker, twilio_api: TwilioStandIn, no_twilio_credentials: None
    ) -> None:
        """Twilio's own 404 is the SDK's TwilioRestException; the broker's refusals are the
        library's exceptions: Forbidden (a client that may not use the app), NotFound (a host
        whose upstream the app does not name: verify.twilio.com)."""
        broker = await start_broker(unix=True)
        client = Client(
            account_sid=ACCOUNT_SID,
            http_client=BrokerHttpClient("sms", url=broker.url, upstream="api"),
        )
        with pytest.raises(TwilioRestException) as upstream_error:
            await in_thread(client.messages("SM" + "1" * 32).fetch)
        assert upstream_error.value.code == 20404
        refused = Client(
            account_sid=ACCOUNT_SID,
            http_client=BrokerHttpClient("sms", url=broker.url, key=OTHER_KEY, upstream="api"),
        )
        with pytest.raises(Forbidden):
            await in_thread(refused.messages.create, to="+1", from_="+2", body="x")
        several = Client(account_sid=ACCOUNT_SID, http_client=BrokerHttpClient(url=broker.url))
        with pytest.raises(NotFound) as unknown:
            await in_thread(several.verify.v2.services.list)
        assert unknown.value.code == "unknown_upstream"
        assert len(twilio_api.hits) == 1

    async def test_the_credential_provider_lets_the_sdk_call_twilio_with_the_brokers_token(
        self,
        start_broker: StartBroker,
        twilio_api: TwilioStandIn,
        no_twilio_credentials: None,
    ) -> None:
        """Client(credential_provider=BrokerCredentials(...)): the SDK calls the API host itself
        with the broker's token as bearer, asking the broker once for two calls; the SDK's own
        TokenAuthStrategy takes BrokerTokenManager."""
        broker = await start_broker(unix=True)
        client = Client(
            account_sid=ACCOUNT_SID, credential_provider=BrokerCredentials("twilio", url=broker.url)
        )
        client.api.base_url = twilio_api.url  # the stand-in plays api.twilio.com
        for _ in range(2):
            await in_thread(client.messages.create, to="+15558675310", from_="+1501", body="d")
        served = await in_thread(TokenSource("twilio", url=broker.url).get_token)
        assert [hit.headers["Authorization"] for hit in twilio_api.hits] == [f"Bearer {served}"] * 2
        assert await in_thread(broker.count, "/v1/token/{app}") == 2  # the provider's + ours
        manager = BrokerTokenManager("twilio", url=broker.url)
        strategy = TokenAuthStrategy(manager)
        assert await in_thread(strategy.get_auth_string) == f"Bearer {served}"

"""The whole broker against a real redis-server and a real OAuth server on loopback."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import aiohttp
import pytest
import redis

from tests.support.broker_process import BrokerFiles, BrokerProcess, running_broker
from tests.support.oauth_server import OAuthTestServer, Scripted
from tests.support.recovery import record
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration


async def poll_tokens(
    files: BrokerFiles, oauth: OAuthTestServer, seconds: float, interval: float = 0.05
) -> tuple[set[str], int, int]:
    """GET the token every `interval` for `seconds`: (distinct tokens, 200s, 503s).

    Fails at once on an expired token, on any status other than 200/503, or on a 503 without
    Retry-After.
    """
    seen: set[str] = set()
    ok = unavailable = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as response:
                body = await response.json()
                if response.status == 200:
                    now = time.time()
                    true_expiry = oauth.expiry[body["access_token"]]
                    assert true_expiry > now, "served an expired token"
                    assert body["expires_at"] <= true_expiry, "expires_at overstated"
                    assert body["expires_in"] <= true_expiry - now + 1
                    oauth.verify_access_token(body["access_token"])  # signature and JWT exp
                    assert response.headers["Cache-Control"] == "no-store"
                    seen.add(body["access_token"])
                    ok += 1
                else:
                    assert response.status == 503, body
                    assert body["error"] == "token_unavailable"
                    assert int(response.headers["Retry-After"]) >= 1
                    unavailable += 1
            await asyncio.sleep(interval)
    return seen, ok, unavailable


def redis_dump(port: int) -> bytes:
    """Every key, hash field and string value in the Redis on `port`, concatenated."""
    client = redis.Redis(host="127.0.0.1", port=port)
    parts: list[bytes | str] = []
    for key in client.scan_iter():
        kind = client.type(key)
        parts.append(key)
        if kind == b"hash":
            for field, value in client.hgetall(key).items():
                parts.extend((field, value))
        elif kind == b"string":
            parts.append(client.get(key) or b"")
    dump = b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)
    client.close()
    return dump


async def time_to_first_token(files: BrokerFiles, timeout: float) -> float:
    """Seconds until GET /v1/token/app1 answers 200 again."""
    start = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - start < timeout:
            async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as response:
                if response.status == 200:
                    return time.monotonic() - start
            await asyncio.sleep(0.1)
    raise AssertionError(f"no token within {timeout}s of the server recovering")


@pytest.fixture
def files(tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer) -> BrokerFiles:
    oauth_server.lifetime = 3.0
    return BrokerFiles(
        directory=tmp_path / "broker", token_url=oauth_server.token_url, store_url=redis_server.url
    )


class TestRefreshCycles:
    async def test_refreshes_before_expiry_over_five_lifetimes(
        self, files: BrokerFiles, oauth_server: OAuthTestServer
    ) -> None:
        """With 3 s tokens, callers get a valid token every time over 5+ lifetimes."""
        async with running_broker(files.write()):
            seen, ok, unavailable = await poll_tokens(files, oauth_server, seconds=16)
        assert unavailable == 0
        assert len(seen) >= 5
        # About one request per 0.75 lifetime (2 s here, with jitter): not one per caller.
        assert oauth_server.count() <= 16 / (3.0 * 0.25) + 1
        assert ok > 100


@pytest.mark.faults
class TestFailingTokenEndpoint:
    @pytest.mark.parametrize(
        "failure",
        [
            Scripted(
                status=500, body=b"<html>Internal Server Error</html>", content_type="text/html"
            ),
            Scripted(status=429, body=b"", headers={"Retry-After": "1"}),
            Scripted(status=200, body=b'{"access_token": ', content_type="application/json"),
            Scripted(status=200, body=b"<html>not a token</html>", content_type="text/html"),
        ],
        ids=["500", "429-retry-after", "truncated-json", "html-200"],
    )
    async def test_no_expired_token_while_the_server_fails(
        self,
        files: BrokerFiles,
        oauth_server: OAuthTestServer,
        failure: Scripted,
        request: pytest.FixtureRequest,
    ) -> None:
        """While the server fails for longer than a lifetime, callers get valid tokens or 503."""
        async with running_broker(files.write()):
            await poll_tokens(files, oauth_server, seconds=1)
            oauth_server.mode = failure
            _, _, unavailable = await poll_tokens(files, oauth_server, seconds=5)
            assert unavailable > 0  # the token did run out, and was not served past its margin
            oauth_server.mode = None
            recovered_in = await time_to_first_token(files, timeout=35)
        record(f"token endpoint failing for 5 s: {request.node.callspec.id}", recovered_in)
        # Backoff is capped at 30 s, so the broker recovers on its own within that.
        assert recovered_in < 35

    async def test_retry_after_spaces_requests(
        self, files: BrokerFiles, oauth_server: OAuthTestServer
    ) -> None:
        """Without a token to protect, 429 with Retry-After: 2 keeps attempts 2 s apart.

        (With a valid token, the broker retries sooner rather than let it fall inside the safety
        margin: the contract's exception, covered by the policy's unit tests.)
        """
        oauth_server.mode = Scripted(status=429, body=b"{}", headers={"Retry-After": "2"})
        async with running_broker(files.write()):
            _, ok, _ = await poll_tokens(files, oauth_server, seconds=6)
            failed = list(oauth_server.requests)
        assert ok == 0
        gaps = [b.at - a.at for a, b in itertools.pairwise(failed)]
        assert failed, "the broker did not retry"
        assert all(gap >= 1.9 for gap in gaps), gaps

    async def test_permanent_error_stops_hammering(
        self, files: BrokerFiles, oauth_server: OAuthTestServer
    ) -> None:
        """invalid_client is not retried in a loop: a handful of requests over several seconds."""
        async with running_broker(files.write()):
            await poll_tokens(files, oauth_server, seconds=0.5)
            oauth_server.accepted_secrets = {"some-other-secret"}
            before = oauth_server.count()
            _, _, unavailable = await poll_tokens(files, oauth_server, seconds=6)
            after = oauth_server.count()
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{files.api}/v1/apps", headers=files.auth) as response:
                    apps = (await response.json())["apps"]
        assert unavailable > 0
        assert after - before <= 3, "the broker kept hammering after invalid_client"
        assert apps[0]["state"] == "failing"
        assert "invalid_client" in apps[0]["last_error"]


class TestWarmStart:
    async def test_restart_serves_the_stored_token_without_calling_the_server(
        self, files: BrokerFiles, oauth_server: OAuthTestServer, tmp_path: Path
    ) -> None:
        """A second broker process is ready from Redis and makes no token request."""
        oauth_server.lifetime = 60.0
        config = files.write()
        first = BrokerProcess(config, tmp_path / "first.log")
        first.start()
        try:
            await first.wait_ready(files.metrics)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as r:
                    token = (await r.json())["access_token"]
        finally:
            assert await first.terminate_async() == 0
        requests_before = oauth_server.count()
        second = BrokerProcess(config, tmp_path / "second.log")
        second.start()
        try:
            await second.wait_ready(files.metrics)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as r:
                    assert (await r.json())["access_token"] == token
        finally:
            assert await second.terminate_async() == 0
        assert oauth_server.count() == requests_before
        assert any(line["event"] == "token.loaded" for line in second.log_lines())


class TestSecretsNeverLeak:
    async def test_no_token_secret_or_key_in_redis_or_logs(
        self,
        files: BrokerFiles,
        oauth_server: OAuthTestServer,
        redis_server: RedisServer,
        tmp_path: Path,
    ) -> None:
        """Every value in Redis and every log line is searched for the real secrets."""
        config = files.write()
        broker = BrokerProcess(
            config, tmp_path / "broker.log", env={"TOKEN_BROKER_LOG_LEVEL": "DEBUG"}
        )
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            await poll_tokens(files, oauth_server, seconds=4)
            async with aiohttp.ClientSession() as session:
                # Error paths too: a wrong key, a denied app, a bad Host.
                await session.get(
                    f"{files.api}/v1/token/app1",
                    headers={"Authorization": "Bearer wrong-key-" + "x" * 30},
                )
                await session.get(f"{files.api}/v1/token/nope", headers=files.auth)
                await session.post(f"{files.api}/v1/token/app1/refresh", headers=files.auth)
        finally:
            await broker.terminate_async()
        secrets = [files.client_secret, files.client_key, *oauth_server.issued_tokens]
        assert len(oauth_server.issued_tokens) >= 2

        dump = redis_dump(redis_server.port)
        assert b"{app1@" in dump  # the hash tag: the app and its client binding
        output = broker.output()
        lines = broker.log_lines()  # every line is JSON: no bare tracebacks
        assert any(line.get("event") == "token.issued" for line in lines)
        for secret in secrets:
            assert secret.encode() not in dump, "a secret is in Redis in plain text"
            assert secret not in output, "a secret is in the logs"
            # A JWT's payload alone would leak claims too.
            for part in secret.split("."):
                if len(part) > 20:
                    assert part not in output


@pytest.mark.faults
class TestShutdown:
    async def test_sigterm_drains_and_exits_zero(
        self, files: BrokerFiles, oauth_server: OAuthTestServer, tmp_path: Path
    ) -> None:
        """SIGTERM: in-flight requests finish, the process says so and exits 0."""
        config = files.write()
        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            async with aiohttp.ClientSession() as session:
                requests = [
                    asyncio.ensure_future(
                        session.get(f"{files.api}/v1/token/app1", headers=files.auth)
                    )
                    for _ in range(50)
                ]
                await asyncio.sleep(0)
                code = await broker.terminate_async()
                responses = await asyncio.gather(*requests, return_exceptions=True)
        finally:
            broker.kill()  # only if the test failed before its SIGTERM ended the broker
        assert code == 0
        events = [line["event"] for line in broker.log_lines()]
        assert "broker.draining" in events and "broker.stopped" in events
        answered = [r for r in responses if isinstance(r, aiohttp.ClientResponse)]
        assert all(r.status == 200 for r in answered)

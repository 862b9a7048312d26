"""Workload identity federation and mTLS (issue 23) against the real test token endpoint.

The broker runs as a process; its assertion file and client certificate live in directories
swapped as the kubelet swaps a projected volume. The token endpoint verifies each assertion
against a test cluster issuer's JWKS (iss, sub, aud, exp, the assertion type), and, over TLS
with a required client certificate, the certificate of each connection.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.credentials import Credentials
from broker.errors import PermanentTokenError
from broker.metrics import Metrics
from broker.model import AppSpec, ClientAuth
from broker.oauth.client import OAuthClient
from tests.support.broker_process import DEFAULT_REFRESH, BrokerFiles, BrokerProcess
from tests.support.fake_clock import FakeClock
from tests.support.mounted_secret import MountedSecret
from tests.support.oauth_server import OAuthTestServer, RecordedRequest
from tests.support.ports import free_port
from tests.support.workload_identity import (
    JWT_BEARER,
    JWT_SPIFFE,
    SERVICE_ACCOUNT,
    TOKEN_EXCHANGE,
    ClusterIssuer,
    FederationPolicy,
    TestCA,
)

pytestmark = pytest.mark.integration

AUDIENCE = "api://token-broker-test"
SPIFFE_ID = "spiffe://cluster.test/ns/payments/sa/token-broker"
# Generous: the file watcher looks every 2 s, and CI may run at load 6.
PICKUP = 20.0


@pytest.fixture
def issuer() -> ClusterIssuer:
    return ClusterIssuer()


def trust(
    server: OAuthTestServer,
    issuer: ClusterIssuer,
    *,
    subject: str = SERVICE_ACCOUNT,
    assertion_type: str = JWT_BEARER,
) -> FederationPolicy:
    """Register the cluster issuer with the token endpoint, as an IdP's federation does."""
    policy = FederationPolicy(
        issuer=issuer.issuer,
        jwks=issuer.jwks(),
        audience=AUDIENCE,
        subject=subject,
        assertion_type=assertion_type,
    )
    server.federation = policy
    return policy


def federated_broker(
    tmp_path: Path, server: OAuthTestServer, token: str, **app: Any
) -> tuple[BrokerFiles, BrokerProcess, MountedSecret]:
    """A broker whose app authenticates with the projected token in a kubelet-style volume."""
    volume = MountedSecret(tmp_path / "sa-token", {"token": token})
    files = BrokerFiles(
        directory=tmp_path / "broker",
        token_url=server.token_url,
        apps={
            "app1": {
                "token_url": server.token_url,
                "client_id": server.client_id,
                "client_auth": "client_assertion",
                "assertion_file": str(volume.root / "token"),
                "refresh": dict(DEFAULT_REFRESH),
                **app,
            }
        },
    )
    return files, BrokerProcess(files.write(), tmp_path / "broker.log"), volume


async def get_token(files: BrokerFiles) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{files.api}/v1/token/app1", headers=files.auth) as response,
    ):
        return response.status, await response.json()


async def first_request_where(
    server: OAuthTestServer, what: str, matches: Callable[[RecordedRequest], bool]
) -> None:
    """Wait until the token endpoint receives a request that `matches`."""
    deadline = time.monotonic() + PICKUP
    while time.monotonic() < deadline:
        if any(matches(r) for r in server.requests):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no request with {what} within {PICKUP}s")


def assert_no_leak(broker: BrokerProcess, *secrets: str) -> None:
    """None of the assertions or key material appears anywhere in the broker's output."""
    output = broker.output()
    assert output
    for secret in secrets:
        assert secret not in output


class TestClientAssertion:
    @pytest.mark.parametrize(
        ("assertion_type", "urn", "subject"),
        [("jwt-bearer", JWT_BEARER, SERVICE_ACCOUNT), ("jwt-spiffe", JWT_SPIFFE, SPIFFE_ID)],
    )
    async def test_the_projected_token_is_the_credential(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        issuer: ClusterIssuer,
        assertion_type: str,
        urn: str,
        subject: str,
    ) -> None:
        """The file's JWT goes as client_assertion with its type; the server verifies it."""
        policy = trust(oauth_server, issuer, subject=subject, assertion_type=urn)
        token = issuer.mint(audience=AUDIENCE, subject=subject)
        files, broker, _ = federated_broker(
            tmp_path, oauth_server, token, assertion_type=assertion_type
        )
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            status, body = await get_token(files)
        finally:
            await broker.terminate_async()
        assert status == 200
        assert body["access_token"] in oauth_server.issued_tokens
        form = oauth_server.requests[-1].form
        assert form["client_assertion_type"] == urn
        assert form["client_assertion"] == token
        assert form["client_id"] == oauth_server.client_id
        assert "client_secret" not in form
        assert policy.refusals == []
        assert [c["sub"] for c in policy.verified] == [subject]
        assert policy.verified[0]["iss"] == issuer.issuer
        assert_no_leak(broker, token)

    async def test_token_exchange_sends_the_token_as_the_subject(
        self, tmp_path: Path, oauth_server: OAuthTestServer, issuer: ClusterIssuer
    ) -> None:
        """assertion_type token-exchange: an RFC 8693 exchange with the projected token as
        subject_token and no client authentication, as Google STS takes it."""
        policy = trust(oauth_server, issuer, assertion_type=TOKEN_EXCHANGE)
        token = issuer.mint(audience=AUDIENCE)
        provider = (
            "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k"
        )
        files, broker, _ = federated_broker(
            tmp_path,
            oauth_server,
            token,
            assertion_type="token-exchange",
            client_id=None,
            audience=provider,
            scopes=["https://www.googleapis.com/auth/cloud-platform"],
        )
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            status, _ = await get_token(files)
        finally:
            await broker.terminate_async()
        assert status == 200
        form = oauth_server.requests[-1].form
        assert form["grant_type"] == TOKEN_EXCHANGE
        assert form["subject_token"] == token
        assert form["subject_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
        assert form["requested_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
        assert form["audience"] == provider
        assert form["scope"] == "https://www.googleapis.com/auth/cloud-platform"
        assert not {"client_assertion", "client_assertion_type", "client_id"} & set(form)
        assert "client_secret" not in form
        assert policy.refusals == []
        assert len(policy.verified) == 1
        assert_no_leak(broker, token)

    async def test_a_rotated_assertion_is_picked_up_without_a_restart(
        self, tmp_path: Path, oauth_server: OAuthTestServer, issuer: ClusterIssuer
    ) -> None:
        """The kubelet swaps the token: the next refresh sends the new one, same process."""
        oauth_server.lifetime = 4.0
        policy = trust(oauth_server, issuer)
        first = issuer.mint(audience=AUDIENCE)
        second = issuer.mint(audience=AUDIENCE, lifetime=7200)
        files, broker, volume = federated_broker(tmp_path, oauth_server, first)
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            pid = broker.pid
            volume.swap({"token": second})
            await first_request_where(
                oauth_server, "the new assertion", lambda r: r.form["client_assertion"] == second
            )
            status, _ = await get_token(files)
            assert broker.process is not None and broker.process.poll() is None
        finally:
            await broker.terminate_async()
        assert status == 200
        assert broker.pid == pid
        sent = [r.form["client_assertion"] for r in oauth_server.requests]
        assert sent[0] == first
        switched = sent.index(second)
        assert set(sent[switched:]) == {second}
        assert all(r.status == 200 for r in oauth_server.requests)
        assert policy.refusals == []
        assert_no_leak(broker, first, second)

    async def test_an_expired_assertion_is_never_sent_and_the_broker_waits_for_the_file(
        self, tmp_path: Path, oauth_server: OAuthTestServer, issuer: ClusterIssuer
    ) -> None:
        """Expired on disk: a clear error naming the file and exp, no request until it changes."""
        trust(oauth_server, issuer)
        expired = issuer.mint(audience=AUDIENCE, issued_at=time.time() - 7200, lifetime=3600)
        fresh = issuer.mint(audience=AUDIENCE)
        files, broker, volume = federated_broker(tmp_path, oauth_server, expired)
        broker.start()
        try:
            status, body = await wait_for_failure(files, broker)
            await asyncio.sleep(6.0)  # three looks of the file watcher: still nothing sent
            quiet_requests = oauth_server.count()
            volume.swap({"token": fresh})
            await broker.wait_ready(files.metrics, timeout=PICKUP)
            ok, _ = await get_token(files)
        finally:
            await broker.terminate_async()
        assert status == 503
        assert "apps.app1.assertion_file" in body["message"]
        assert "expired at" in body["message"]
        assert quiet_requests == 0
        assert ok == 200
        assert oauth_server.count() == 1
        assert oauth_server.requests[0].form["client_assertion"] == fresh
        failures = [e for e in broker.log_lines() if e["event"] == "token.refresh_failed"]
        assert failures
        error = failures[0]["error"]
        assert "apps.app1.assertion_file" in error
        assert str(volume.root / "token") in error
        assert "expired at" in error
        assert "(exp " in error
        assert "waiting for it to change" in error
        assert len(failures) <= 3  # one attempt, not a retry loop
        assert_no_leak(broker, expired, fresh)

    async def test_a_jwt_svid_written_after_the_start_is_picked_up(
        self, tmp_path: Path, oauth_server: OAuthTestServer, issuer: ClusterIssuer
    ) -> None:
        """spiffe-helper writes the JWT-SVID after the broker starts: the broker starts, the
        app fails naming the file, and the SVID is used as soon as it appears."""
        trust(oauth_server, issuer, subject=SPIFFE_ID, assertion_type=JWT_SPIFFE)
        svid = issuer.mint(audience=AUDIENCE, subject=SPIFFE_ID)
        shared = tmp_path / "spiffe"
        shared.mkdir()
        files, broker, _ = federated_broker(
            tmp_path,
            oauth_server,
            "unused",
            assertion_type="jwt-spiffe",
            assertion_file=str(shared / "svid.jwt"),
        )
        broker.start()
        try:
            status, body = await wait_for_failure(files, broker)
            (shared / "svid.jwt").write_text(svid)
            await broker.wait_ready(files.metrics, timeout=PICKUP)
        finally:
            await broker.terminate_async()
        assert status == 503
        assert "svid.jwt cannot be read" in body["message"]
        assert oauth_server.count() == 1
        assert oauth_server.requests[0].form["client_assertion"] == svid
        assert_no_leak(broker, svid)

    async def test_a_refused_assertion_is_not_hammered_and_a_fixed_file_recovers(
        self, tmp_path: Path, oauth_server: OAuthTestServer, issuer: ClusterIssuer
    ) -> None:
        """The wrong audience is refused (invalid_client); one request, then quiet until the
        file changes; the corrected token is then used at once."""
        policy = trust(oauth_server, issuer)
        wrong = issuer.mint(audience="api://somebody-else")
        right = issuer.mint(audience=AUDIENCE)
        files, broker, volume = federated_broker(tmp_path, oauth_server, wrong)
        broker.start()
        try:
            status, _ = await wait_for_failure(files, broker)
            await asyncio.sleep(6.0)
            refused_requests = oauth_server.count()
            volume.swap({"token": right})
            await broker.wait_ready(files.metrics, timeout=PICKUP)
        finally:
            await broker.terminate_async()
        assert status == 503
        assert refused_requests == 1
        assert policy.refusals == ["InvalidAudienceError"]
        assert oauth_server.count() == 2
        assert oauth_server.requests[-1].form["client_assertion"] == right
        assert_no_leak(broker, wrong, right)

    async def test_the_server_refuses_an_expired_assertion(
        self, tmp_path: Path, oauth_server: OAuthTestServer, issuer: ClusterIssuer
    ) -> None:
        """A broker whose clock lags sends an assertion the server's exp check refuses."""
        policy = trust(oauth_server, issuer)
        now = time.time()
        (tmp_path / "token").write_text(
            issuer.mint(audience=AUDIENCE, issued_at=now - 600, lifetime=300)
        )
        spec = AppSpec(
            name="app1",
            token_url=oauth_server.token_url,
            client_id=oauth_server.client_id,
            client_auth=ClientAuth.CLIENT_ASSERTION,
            assertion_file=tmp_path / "token",
        )
        async with aiohttp.ClientSession() as session:
            client = OAuthClient(
                spec, Credentials(spec), session, FakeClock(start=now - 3600), Metrics()
            )
            with pytest.raises(PermanentTokenError) as caught:
                await client.fetch()
        assert caught.value.is_invalid_client
        assert policy.refusals == ["expired"]


async def wait_for_failure(files: BrokerFiles, broker: BrokerProcess) -> tuple[int, Any]:
    """The first token answer once the app's first attempt has failed (the API answers 503)."""
    deadline = time.monotonic() + PICKUP
    while time.monotonic() < deadline:
        if any(e.get("event") == "token.refresh_failed" for e in broker.log_lines()):
            return await get_token(files)
        await asyncio.sleep(0.1)
    raise AssertionError(f"no failed refresh within {PICKUP}s:\n{broker.output()[-3000:]}")


# ---- tls_client_auth (RFC 8705) ------------------------------------------------------------


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
async def mtls_server(tmp_path: Path, ca: TestCA) -> AsyncIterator[OAuthTestServer]:
    """The token endpoint over TLS, requiring a client certificate from the test CA."""
    cert, key = ca.write(tmp_path, "server", "127.0.0.1", server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cadata=ca.pem.decode())
    context.verify_mode = ssl.CERT_REQUIRED
    server = OAuthTestServer()
    server.tls_client_names = {"broker-1", "broker-2"}
    await server.start(port=free_port(), tls=context)
    try:
        yield server
    finally:
        await server.stop()


class TestTlsClientAuth:
    async def test_the_certificate_authenticates_and_a_rotated_one_is_used(
        self, tmp_path: Path, mtls_server: OAuthTestServer, ca: TestCA
    ) -> None:
        """The server sees the client certificate; after the swap, the new one, no restart."""
        mtls_server.lifetime = 4.0
        (tmp_path / "ca.pem").write_bytes(ca.pem)
        cert1, key1 = ca.issue("broker-1")
        cert2, key2 = ca.issue("broker-2")
        volume = MountedSecret(
            tmp_path / "tls", {"tls.crt": cert1.decode(), "tls.key": key1.decode()}
        )
        files = BrokerFiles(
            directory=tmp_path / "broker",
            token_url=mtls_server.token_url,
            apps={
                "app1": {
                    "token_url": mtls_server.token_url,
                    "client_id": mtls_server.client_id,
                    "client_auth": "tls_client_auth",
                    "tls_client_cert_file": str(volume.root / "tls.crt"),
                    "tls_client_key_file": str(volume.root / "tls.key"),
                    "refresh": dict(DEFAULT_REFRESH),
                }
            },
        )
        # The broker trusts the test CA the way a container trusts a private CA bundle.
        broker = BrokerProcess(
            files.write(), tmp_path / "broker.log", env={"SSL_CERT_FILE": str(tmp_path / "ca.pem")}
        )
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            pid = broker.pid
            volume.swap({"tls.crt": cert2.decode(), "tls.key": key2.decode()})
            await first_request_where(
                mtls_server, "the new certificate", lambda r: r.client_cert == "broker-2"
            )
            status, _ = await get_token(files)
        finally:
            await broker.terminate_async()
        assert status == 200
        assert broker.pid == pid
        names = [r.client_cert for r in mtls_server.requests]
        assert names[0] == "broker-1"
        assert set(names[names.index("broker-2") :]) == {"broker-2"}
        assert all(r.status == 200 for r in mtls_server.requests)
        assert all(r.form["client_id"] == mtls_server.client_id for r in mtls_server.requests)
        assert all("client_secret" not in r.form for r in mtls_server.requests)
        body1 = key1.decode().splitlines()[1]
        body2 = key2.decode().splitlines()[1]
        assert_no_leak(broker, body1, body2)

    async def test_the_server_requires_a_certificate(
        self, tmp_path: Path, mtls_server: OAuthTestServer, ca: TestCA
    ) -> None:
        """Without a client certificate the TLS handshake fails: the check above is real."""
        context = ssl.create_default_context(cadata=ca.pem.decode())
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.post(
                    mtls_server.token_url, data={"grant_type": "client_credentials"}, ssl=context
                ) as response:
                    await response.read()
        assert mtls_server.requests == []

"""The token endpoint client against the real test OAuth server on loopback."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from structlog.testing import capture_logs

from broker.clock import SystemClock
from broker.credentials import Credentials
from broker.errors import PermanentTokenError, TransientTokenError
from broker.metrics import Metrics
from broker.model import AppSpec, ClientAuth
from broker.oauth.client import OAuthClient
from tests.support.oauth_server import OAuthTestServer, Scripted

pytestmark = pytest.mark.integration

SECRET = "test-secret-0123456789-abcdefghij"
PREVIOUS = "previous-secret-0123456789-abcdef"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def spec(tmp_path: Path, oauth_server: OAuthTestServer) -> AppSpec:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "previous").write_text(PREVIOUS)
    return AppSpec(
        name="app1",
        token_url=oauth_server.token_url,
        client_id="test-client",
        client_secret_file=tmp_path / "secret",
    )


def client_for(
    spec: AppSpec, session: aiohttp.ClientSession, metrics: Metrics | None = None, **kwargs: float
) -> OAuthClient:
    return OAuthClient(
        spec,
        Credentials(spec),
        session,
        SystemClock(),
        metrics or Metrics(),
        **kwargs,  # type: ignore[arg-type]
    )


class TestClientAuthentication:
    @pytest.mark.parametrize(
        "method", [ClientAuth.CLIENT_SECRET_POST, ClientAuth.CLIENT_SECRET_BASIC]
    )
    async def test_secret_methods_get_a_token(
        self,
        spec: AppSpec,
        session: aiohttp.ClientSession,
        oauth_server: OAuthTestServer,
        method: ClientAuth,
    ) -> None:
        """client_secret_post puts the secret in the form; basic in the Authorization header."""
        client = client_for(replace(spec, client_auth=method), session)
        token = await client.fetch()
        assert token.access_token in oauth_server.issued_tokens
        request = oauth_server.requests[-1]
        if method is ClientAuth.CLIENT_SECRET_POST:
            assert request.form["client_secret"] == SECRET
            assert "Authorization" not in request.headers
        else:
            assert "client_secret" not in request.form
            decoded = base64.b64decode(request.headers["Authorization"][6:]).decode()
            assert decoded == f"test-client:{SECRET}"

    @pytest.mark.parametrize("kind", ["rsa", "ec"])
    async def test_private_key_jwt_assertion_verifies(
        self,
        spec: AppSpec,
        session: aiohttp.ClientSession,
        oauth_server: OAuthTestServer,
        tmp_path: Path,
        kind: str,
    ) -> None:
        """The RFC 7523 assertion (RS256 / ES256) verifies with the public key; kid is sent."""
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if kind == "rsa"
            else ec.generate_private_key(ec.SECP256R1())
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (tmp_path / "key.pem").write_bytes(pem)
        oauth_server.public_key = key.public_key()
        jwt_spec = replace(
            spec,
            client_auth=ClientAuth.PRIVATE_KEY_JWT,
            client_secret_file=None,
            private_key_file=tmp_path / "key.pem",
            private_key_id="key-1",
        )
        await client_for(jwt_spec, session).fetch()
        assertion = oauth_server.requests[-1].form["client_assertion"]
        header = jwt.get_unverified_header(assertion)
        assert header["kid"] == "key-1"
        assert header["alg"] == ("RS256" if kind == "rsa" else "ES256")
        assert "client_secret" not in oauth_server.requests[-1].form

    async def test_private_key_jwt_with_the_wrong_key_is_invalid_client(
        self,
        spec: AppSpec,
        session: aiohttp.ClientSession,
        oauth_server: OAuthTestServer,
        tmp_path: Path,
    ) -> None:
        """An assertion signed by a key the server does not know fails as invalid_client."""
        signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (tmp_path / "key.pem").write_bytes(
            signing.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        oauth_server.public_key = other.public_key()
        jwt_spec = replace(
            spec, client_auth=ClientAuth.PRIVATE_KEY_JWT, private_key_file=tmp_path / "key.pem"
        )
        with pytest.raises(PermanentTokenError) as caught:
            await client_for(jwt_spec, session).fetch()
        assert caught.value.is_invalid_client


class TestRequestParameters:
    async def test_scope_audience_and_extra_params_are_sent(
        self, spec: AppSpec, session: aiohttp.ClientSession, oauth_server: OAuthTestServer
    ) -> None:
        """Configured scopes (space-joined), audience and extra_params reach the server."""
        full = replace(
            spec, scopes=("a.read", "b.write"), audience="https://api", extra_params={"x": "1"}
        )
        token = await client_for(full, session).fetch()
        form = oauth_server.requests[-1].form
        assert form["grant_type"] == "client_credentials"
        assert form["scope"] == "a.read b.write"
        assert form["audience"] == "https://api"
        assert form["x"] == "1"
        assert token.scope == "a.read b.write"


class TestFailures:
    async def test_wrong_secret_is_permanent(
        self, spec: AppSpec, session: aiohttp.ClientSession, oauth_server: OAuthTestServer
    ) -> None:
        """invalid_client is a permanent error."""
        oauth_server.accepted_secrets = {"another"}
        with pytest.raises(PermanentTokenError) as caught:
            await client_for(spec, session).fetch()
        assert caught.value.error == "invalid_client"

    async def test_twilio_error_shape_is_understood(
        self, spec: AppSpec, session: aiohttp.ClientSession, oauth_server: OAuthTestServer
    ) -> None:
        """Twilio's {"code": 322402, ...} body is a permanent invalid-credentials error."""
        oauth_server.accepted_secrets = {"another"}
        oauth_server.twilio_errors = True
        with pytest.raises(PermanentTokenError) as caught:
            await client_for(spec, session).fetch()
        assert caught.value.error == "322402"
        assert caught.value.is_invalid_client

    async def test_previous_secret_is_tried_after_invalid_client(
        self,
        spec: AppSpec,
        session: aiohttp.ClientSession,
        oauth_server: OAuthTestServer,
        tmp_path: Path,
    ) -> None:
        """When only the pre-rotation secret works, it is used, logged and counted."""
        oauth_server.accepted_secrets = {PREVIOUS}
        metrics = Metrics()
        rotated = replace(spec, client_secret_previous_file=tmp_path / "previous")
        with capture_logs() as logs:
            token = await client_for(rotated, session, metrics).fetch()
        assert token.access_token in oauth_server.issued_tokens
        assert [r.form["client_secret"] for r in oauth_server.requests] == [SECRET, PREVIOUS]
        assert any(
            e["event"] == "app.previous_secret_used" and e["secret"] == "previous" for e in logs
        )
        value = metrics.credential_reloads.labels(app="app1", outcome="previous_secret").get()
        assert value == 1
        assert SECRET not in repr(logs)
        assert PREVIOUS not in repr(logs)

    async def test_oversized_body_is_transient(
        self, spec: AppSpec, session: aiohttp.ClientSession, oauth_server: OAuthTestServer
    ) -> None:
        """A body larger than the limit is refused as a transient error."""
        oauth_server.fail_next(status=200, body=b'{"access_token": "' + b"x" * 5000 + b'"}')
        with pytest.raises(TransientTokenError, match="exceeds"):
            await client_for(spec, session, max_body_bytes=1000).fetch()

    async def test_slow_server_times_out_as_transient(
        self, spec: AppSpec, session: aiohttp.ClientSession, oauth_server: OAuthTestServer
    ) -> None:
        """A server slower than the timeout: transient, outcome unknown, counted as 'error'."""
        oauth_server.fail_next(status=200, body=b"{}", delay=2.0)
        metrics = Metrics()
        with pytest.raises(TransientTokenError, match="failed: TimeoutError") as caught:
            await client_for(spec, session, metrics, timeout=0.3).fetch()
        # The request was sent: the server may have acted on it (and rotated a refresh token).
        assert caught.value.outcome_unknown
        assert metrics.token_endpoint_responses.labels(app="app1", status="error").get() == 1

    async def test_unreachable_server_is_transient(
        self, spec: AppSpec, session: aiohttp.ClientSession
    ) -> None:
        """Connection refused is a transient error whose outcome is known: nothing was sent."""
        dead = replace(spec, token_url="http://127.0.0.1:9/token")
        with pytest.raises(TransientTokenError, match="unreachable") as caught:
            await client_for(dead, session).fetch()
        assert not caught.value.outcome_unknown

    async def test_server_error_carries_retry_after(
        self, spec: AppSpec, session: aiohttp.ClientSession, oauth_server: OAuthTestServer
    ) -> None:
        """A 503 with Retry-After is transient and carries the delay."""
        oauth_server.script.append(Scripted(status=503, body=b"", headers={"Retry-After": "12"}))
        with pytest.raises(TransientTokenError) as caught:
            await client_for(spec, session).fetch()
        assert caught.value.retry_after == 12


def _jwt(exp: object) -> bytes:
    token = jwt.encode({"sub": "x", "exp": 0}, "k" * 32, algorithm="HS256")
    if exp != 0:
        header, _, signature = token.split(".")
        payload = (
            base64.urlsafe_b64encode(("{" + f'"sub": "x", "exp": {exp}' + "}").encode())
            .rstrip(b"=")
            .decode()
        )
        token = f"{header}.{payload}.{signature}"
    return b'{"access_token": "' + token.encode() + b'", "token_type": "Bearer"}'


MALFORMED = [
    (
        "html-error-page",
        Scripted(
            status=502, body=b"<html><body>Bad Gateway</body></html>", content_type="text/html"
        ),
        TransientTokenError,
    ),
    (
        "truncated-json",
        Scripted(status=200, body=b'{"access_token": "abc", "expires_'),
        TransientTokenError,
    ),
    (
        "expires-in-as-text",
        Scripted(status=200, body=b'{"access_token": "abcdefgh", "expires_in": "soon"}'),
        None,
    ),
    (
        "expires-in-negative",
        Scripted(status=200, body=b'{"access_token": "abcdefgh", "expires_in": -5}'),
        None,
    ),
    (
        "expires-in-huge",
        Scripted(status=200, body=b'{"access_token": "abcdefgh", "expires_in": 1e300}'),
        None,
    ),
    (
        "missing-access-token",
        Scripted(status=200, body=b'{"token_type": "Bearer", "expires_in": 3600}'),
        TransientTokenError,
    ),
    ("jwt-with-text-exp", Scripted(status=200, body=_jwt('"tomorrow"')), None),
    ("jwt-already-expired", Scripted(status=200, body=_jwt(1000)), TransientTokenError),
    (
        "200-with-error-field",
        Scripted(status=200, body=b'{"error": "server_error", "access_token": null}'),
        TransientTokenError,
    ),
    (
        "enormous-body",
        Scripted(status=200, body=b'{"access_token": "' + b"a" * 3_000_000 + b'"}'),
        TransientTokenError,
    ),
    ("json-array", Scripted(status=200, body=b"[1, 2, 3]"), TransientTokenError),
    (
        "unknown-4xx-html",
        Scripted(status=403, body=b"<html>Forbidden</html>", content_type="text/html"),
        PermanentTokenError,
    ),
]


class TestMalformedResponses:
    @pytest.mark.parametrize(("case", "answer", "error"), MALFORMED, ids=[m[0] for m in MALFORMED])
    async def test_each_is_classified_and_counted(
        self,
        spec: AppSpec,
        session: aiohttp.ClientSession,
        oauth_server: OAuthTestServer,
        case: str,
        answer: Scripted,
        error: type[Exception] | None,
    ) -> None:
        """A malformed answer is a classified error (or a token with a sane expiry), counted."""
        oauth_server.script.append(answer)
        metrics = Metrics()
        client = client_for(spec, session, metrics)
        if error is None:
            token = await client.fetch()  # a token, with the default lifetime or the JWT's
            assert token.expires_at > token.issued_at
            assert token.lifetime <= spec.refresh.default_lifetime
        else:
            with pytest.raises(error):
                await client.fetch()
        status = str(answer.status)
        assert metrics.token_endpoint_responses.labels(app="app1", status=status).get() == 1

    async def test_slow_drip_is_cut_off_by_the_timeout(
        self, spec: AppSpec, session: aiohttp.ClientSession, oauth_server: OAuthTestServer
    ) -> None:
        """A body dripped a byte at a time is cut off by the total timeout: transient."""
        oauth_server.script.append(
            Scripted(status=200, body=b'{"access_token": "abcdefgh"}', drip=0.2)
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TransientTokenError):
            await client_for(spec, session, timeout=1.0).fetch()
        assert loop.time() - started < 3

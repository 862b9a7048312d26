"""DPoP end to end: real broker processes on a real Redis, the OAuth test server issuing
DPoP-bound tokens (and asking for nonces), and a resource server that verifies every proof.

The verifier (tests/support/dpop.py) is written from RFC 9449 with pyjwt, apart from the broker's
code: signature with the header's key, typ, htm, htu, iat, jti replay, ath, nonce, and the key
the token is bound to (`cnf.jkt`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from broker.clock import SystemClock
from broker.credentials import Credentials
from broker.dpop import ProofKey, ProofKeys, app_dpop, generate_key
from broker.errors import PermanentTokenError
from broker.metrics import Metrics
from broker.model import AppSpec, DpopAlgorithm
from broker.oauth.client import OAuthClient
from tests.support.authorization import ac_app, authorize_via_code
from tests.support.broker_process import BrokerFiles, BrokerProcess
from tests.support.dpop import DpopResourceServer, DpopVerifier, thumbprint
from tests.support.fleet import Fleet
from tests.support.oauth_server import Grant, OAuthTestServer
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

LIFETIME = 4.0


def write_key(path: Path) -> str:
    """A P-256 key in PEM at `path`; returns its RFC 7638 thumbprint."""
    private = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return thumbprint(public)


@pytest.fixture
async def resource_server(oauth_server: OAuthTestServer) -> AsyncIterator[DpopResourceServer]:
    server = DpopResourceServer(oauth_server.verify_access_token)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def dpop_files(
    root: Path,
    oauth: OAuthTestServer,
    redis_server: RedisServer,
    resource: DpopResourceServer,
) -> tuple[BrokerFiles, str]:
    """app1: authorization code, DPoP with a key file, proxied to the verifying server."""
    root.mkdir(parents=True, exist_ok=True)
    jkt = write_key(root / "dpop.pem")
    app = {
        **ac_app(oauth, at_fraction=0.5),
        "dpop": True,
        "dpop_key_file": "dpop.pem",
        "proxy": {
            "upstream": resource.base_url,
            "read_timeout": "5s",
            "allowed_networks": ["127.0.0.0/8"],
        },
    }
    files = BrokerFiles(
        directory=root, token_url=oauth.token_url, store_url=redis_server.url, apps={"app1": app}
    )
    return files, jkt


async def request(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any]:
    async with session.request(method, url, **kwargs) as response:
        return response.status, await response.json(content_type=None)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one labelled series in a /metrics text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class TestTokenClient:
    """The token endpoint client of a DPoP app against the verifying OAuth test server."""

    @pytest.fixture
    async def client(
        self, tmp_path: Path, oauth_server: OAuthTestServer
    ) -> AsyncIterator[tuple[OAuthClient, Metrics]]:
        (tmp_path / "secret").write_text(oauth_server.accepted_secrets.copy().pop())
        spec = AppSpec(
            name="app1",
            token_url=oauth_server.token_url,
            client_id="test-client",
            client_secret_file=tmp_path / "secret",
            dpop=True,
        )
        metrics = Metrics()
        async with aiohttp.ClientSession() as session:
            dpop = app_dpop(spec, metrics, time.time)
            yield (
                OAuthClient(spec, Credentials(spec), session, SystemClock(), metrics, dpop=dpop),
                metrics,
            )

    async def test_a_nonce_challenge_is_answered_once_and_remembered(
        self, client: tuple[OAuthClient, Metrics], oauth_server: OAuthTestServer
    ) -> None:
        """use_dpop_nonce: one retry with the nonce; the next request sends it at once."""
        source, metrics = client
        oauth_server.dpop = DpopVerifier(require_nonce=True)
        token = await source.fetch()
        assert token.token_type == "DPoP"
        assert source.dpop is not None and token.dpop_jkt == source.dpop.keys.current.jkt
        assert [r.status for r in oauth_server.requests] == [400, 200]
        await source.fetch()
        assert [r.status for r in oauth_server.requests] == [400, 200, 200]
        retries = metrics.dpop_nonce_retries.labels(app="app1", server="authorization_server")
        assert retries._value.get() == 1
        # A new nonce: one more challenge, one more retry, never a loop.
        oauth_server.dpop.rotate_nonce()
        await source.fetch()
        assert [r.status for r in oauth_server.requests][3:] == [400, 200]

    async def test_a_second_challenge_is_not_retried(
        self, client: tuple[OAuthClient, Metrics], oauth_server: OAuthTestServer
    ) -> None:
        """A server that refuses the nonce it gave is not asked a third time."""
        source, _ = client
        oauth_server.dpop = DpopVerifier(require_nonce=True)
        oauth_server.fail_next(
            2,
            status=400,
            body=b'{"error": "use_dpop_nonce"}',
            headers={"DPoP-Nonce": "same"},
        )
        with pytest.raises(PermanentTokenError):
            await source.fetch()
        assert len(oauth_server.requests) == 2

    async def test_a_refresh_is_proved_with_the_key_of_its_set(
        self, client: tuple[OAuthClient, Metrics], oauth_server: OAuthTestServer
    ) -> None:
        """After the key file's first key changed, a set bound to the old key refreshes with it;
        a set bound to a key that is gone is not sent at all."""
        source, _ = client
        oauth_server.dpop = DpopVerifier()
        assert source.dpop is not None
        old = source.dpop.keys.current
        # A grant bound to `old`, as an authorization proved with it would make it.
        grant = Grant("g", "test-client", "", "rt-1", jkt=old.jkt)
        oauth_server.grants["g"] = grant
        oauth_server._refresh_index["rt-1"] = "g"
        new = ProofKey(generate_key(DpopAlgorithm.ES256), DpopAlgorithm.ES256)
        source.dpop.keys = ProofKeys((new, old))
        token = await source.fetch("rt-1", dpop_jkt=old.jkt)
        assert token.dpop_jkt == old.jkt
        assert oauth_server.wrong_key_refreshes == 0
        sent = len(oauth_server.requests)
        with pytest.raises(PermanentTokenError, match="no longer holds") as caught:
            await source.fetch(grant.current_refresh, dpop_jkt="a-key-that-is-gone")
        assert caught.value.error == "dpop_key_missing"
        assert len(oauth_server.requests) == sent  # nothing was sent
        # The control: proved with the new key, the bound refresh token is refused.
        with pytest.raises(PermanentTokenError):
            await source.fetch(grant.current_refresh, dpop_jkt=new.jkt)
        assert oauth_server.wrong_key_refreshes == 1

    async def test_a_bearer_answer_is_kept_unbound_and_said(
        self, client: tuple[OAuthClient, Metrics], oauth_server: OAuthTestServer
    ) -> None:
        """A server that ignores DPoP answers Bearer: kept as a bearer set, logged, counted."""
        source, metrics = client
        oauth_server.dpop = None  # ignores the DPoP header
        with capture_logs() as logs:
            token = await source.fetch()
        assert token.token_type == "Bearer" and token.dpop_jkt is None
        assert [line["event"] for line in logs if line["log_level"] == "warning"] == [
            "dpop.token_not_bound"
        ]
        assert metrics.dpop_unbound_tokens.labels(app="app1")._value.get() == 1


class TestDpopEndToEnd:
    """One broker process: a bound token obtained, refreshed, used through the proxy and the
    proof route; a copied token is useless."""

    async def test_bound_token_refreshed_proxied_and_useless_when_copied(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        redis_server: RedisServer,
        resource_server: DpopResourceServer,
    ) -> None:
        """Nonce challenges at both servers are answered once; every proxied request passes."""
        oauth_server.lifetime = LIFETIME
        oauth_server.dpop = DpopVerifier(require_nonce=True)
        files, jkt = dpop_files(tmp_path / "b", oauth_server, redis_server, resource_server)
        config = files.write()
        await authorize_via_code(config, oauth_server)
        grant = next(iter(oauth_server.grants.values()))
        assert grant.jkt == jkt  # the exchange was proved with the key file's key
        # The exchange met the nonce challenge first, then succeeded with the nonce.
        assert [r.status for r in oauth_server.requests[:2]] == [400, 200]

        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics, timeout=60)
            async with aiohttp.ClientSession() as session:
                # The token route never hands the bound token out alone.
                status, body = await request(
                    session, "GET", f"{files.api}/v1/token/app1", headers=files.auth
                )
                assert (status, body["error"]) == (409, "dpop_bound")
                status, body = await request(
                    session, "POST", f"{files.api}/v1/token/app1/refresh", headers=files.auth
                )
                assert (status, body["error"]) == (409, "dpop_bound")

                # Through the proxy, across at least two refreshes; the resource server then
                # asks for a nonce, which the proxy answers once per new nonce.
                proxied = f"{files.api}/v1/proxy/app1/v1/items"
                statuses = []
                deadline = time.monotonic() + 60
                while oauth_server.count("refresh_token") < 2 and time.monotonic() < deadline:
                    status, _ = await request(
                        session, "GET", f"{proxied}?page=1", headers=files.auth
                    )
                    statuses.append(status)
                    await asyncio.sleep(0.2)
                resource_server.verifier.require_nonce = True
                for _ in range(3):
                    status, _ = await request(
                        session, "POST", proxied, headers=files.auth, json={"a": 1}
                    )
                    statuses.append(status)
                resource_server.verifier.rotate_nonce()
                status, _ = await request(session, "DELETE", proxied, headers=files.auth)
                statuses.append(status)
                assert set(statuses) == {200}, resource_server.refused
                assert resource_server.challenges == 2  # one per nonce, each retried once

                # The proof route: the token and a proof of one request, used directly.
                target = f"{resource_server.base_url}/v1/direct?q=1#frag"
                status, issued = await request(
                    session,
                    "POST",
                    f"{files.api}/v1/token/app1/proof",
                    headers=files.auth,
                    json={"method": "GET", "url": target, "nonce": resource_server.verifier.nonce},
                )
                assert status == 200, issued
                assert issued["token_type"] == "DPoP" and issued["expires_in"] > 0
                token, proof = issued["access_token"], issued["proof"]
                with_proof = {"Authorization": f"DPoP {token}", "DPoP": proof}
                direct = f"{resource_server.base_url}/v1/direct?q=1"
                status, _ = await request(session, "GET", direct, headers=with_proof)
                assert status == 200
                # The same proof again (a replay), the token alone, the token as Bearer: refused.
                for headers in (
                    with_proof,
                    {"Authorization": f"DPoP {token}"},
                    {"Authorization": f"Bearer {token}"},
                ):
                    status, body = await request(session, "GET", direct, headers=headers)
                    assert status == 401, headers.keys()
                assert oauth_server.verify_access_token(token)["cnf"] == {"jkt": jkt}

                async with session.get(f"{files.metrics}/metrics") as response:
                    text = await response.text()
        finally:
            await broker.terminate_async()
        assert oauth_server.reuse_detected == 0
        assert oauth_server.wrong_key_refreshes == 0
        assert not oauth_server.dpop_refused or set(oauth_server.dpop_refused) == {
            "a nonce is required"
        }
        proofs = metric(text, "token_broker_dpop_proofs_total", app="app1", use="proxy")
        assert proofs >= len(statuses) + 2  # and the two retries
        assert metric(text, "token_broker_dpop_proofs_total", app="app1", use="proof_api") == 1
        assert metric(text, "token_broker_dpop_proofs_total", app="app1", use="token_request") >= 2
        retries = metric(
            text, "token_broker_dpop_nonce_retries_total", app="app1", server="resource_server"
        )
        assert retries == 2
        # Neither a proof's jti nor the key reaches the log.
        jti = jwt.decode(proof, options={"verify_signature": False})["jti"]
        output = broker.output()
        assert jti not in output
        key_body = (files.directory / "dpop.pem").read_text().splitlines()[1]
        assert key_body not in output
        assert token not in output


class TestDpopFleet:
    """Three replicas share the key file: the fleet's one bound set is refreshed under the
    fleet protocol, each proof made by whichever replica holds the lease."""

    async def test_three_replicas_refresh_one_bound_grant(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        redis_server: RedisServer,
        resource_server: DpopResourceServer,
    ) -> None:
        """Every proxied request on every replica passes; no refresh token is used twice and
        none is proved with another key, through a nonce rotation at the token endpoint."""
        oauth_server.lifetime = LIFETIME
        oauth_server.dpop = DpopVerifier(require_nonce=True)
        key_file = tmp_path / "dpop.pem"
        jkt = write_key(key_file)
        app = {
            **ac_app(oauth_server, at_fraction=0.5),
            "dpop": True,
            "dpop_key_file": str(key_file),
            "proxy": {
                "upstream": resource_server.base_url,
                "read_timeout": "5s",
                "allowed_networks": ["127.0.0.0/8"],
            },
        }
        fleet = Fleet(tmp_path, oauth_server.token_url, redis_server.url, 3, apps={"app1": app})
        await authorize_via_code(fleet.replicas[0].files.directory / "config.yaml", oauth_server)
        await fleet.start(timeout=60)
        statuses: list[int] = []
        try:
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + 5 * LIFETIME
                rotated = False
                while time.monotonic() < deadline:
                    if not rotated and time.monotonic() > deadline - 2.5 * LIFETIME:
                        oauth_server.dpop.rotate_nonce()  # the next refresh meets a challenge
                        rotated = True
                    for replica in fleet.replicas:
                        status, _ = await request(
                            session,
                            "GET",
                            f"{replica.files.api}/v1/proxy/app1/v1/items",
                            headers=replica.files.auth,
                        )
                        statuses.append(status)
                    await asyncio.sleep(0.1)
        finally:
            await fleet.stop_async()
        assert set(statuses) == {200}, resource_server.refused
        refreshed = [
            r.form["refresh_token"]
            for r in oauth_server.requests
            if r.form.get("grant_type") == "refresh_token" and r.status == 200
        ]
        assert len(refreshed) >= 3
        assert len(set(refreshed)) == len(refreshed)  # each refresh token worked once
        assert oauth_server.reuse_detected == 0
        assert oauth_server.wrong_key_refreshes == 0
        assert next(iter(oauth_server.grants.values())).jkt == jkt
        assert set(oauth_server.dpop_refused) <= {"a nonce is required"}

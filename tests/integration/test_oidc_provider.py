"""The broker against panva's oidc-provider: a certified authorization server, not our own.

oidc-provider rotates the refresh token on every use and, when a spent one is presented again,
revokes the whole grant (its own reuse detection, not a test double's). Its access tokens live a
few seconds here, so a few lifetimes fit in a test. See tests/support/oidc_provider.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.support.authorization import Onboarding
from tests.support.broker_process import BrokerFiles, BrokerProcess
from tests.support.dpop import thumbprint
from tests.support.fleet import Fleet
from tests.support.oidc_provider import (
    AC_CLIENT,
    CC_CLIENT,
    REDIRECT,
    OIDCProvider,
    ProviderStats,
    obtain_code_redirect,
    running_provider,
    stats_json,
)
from tests.support.oidc_resource_server import IntrospectingResourceServer, present
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

# Seconds an access token lives at the provider, and how many lifetimes the fleets run.
LIFETIME = 8
LIFETIMES = 4
# The broker refreshes at half the lifetime. oidc-provider's `exp` is whole seconds (its `iat`
# rounded down) while `expires_in` is the full lifetime, so a token dies up to 1 s before the
# broker thinks; the safety margin is capped at a tenth of the lifetime (0.8 s here), so
# refreshing at 75 % (2 s before the broker's expiry) left a replica still serving the old token
# after its true expiry when a refresh ran late at load 9 (the resource server found it
# inactive). At half, 3 s remain for a late refresh and the notice to the other replicas.
REFRESH = {"at_fraction": 0.5, "min_remaining": 1, "jitter": 0.05, "safety_margin": 2}


def cc_app(provider: OIDCProvider) -> dict[str, Any]:
    """A client_credentials app of oidc-provider's cc-client."""
    return {
        "token_url": provider.token_url,
        "client_id": CC_CLIENT[0],
        "client_secret_file": "client_secret",
        "scopes": ["api"],
        "refresh": dict(REFRESH),
    }


def ac_app(provider: OIDCProvider) -> dict[str, Any]:
    """An authorization-code app of oidc-provider's ac-client, with refresh tokens."""
    return {
        "grant_type": "authorization_code",
        "token_url": provider.token_url,
        "authorize_url": provider.authorize_url,
        "redirect_uri": REDIRECT,
        "client_id": AC_CLIENT[0],
        "client_secret_file": "client_secret",
        "scopes": ["api", "offline_access"],
        # OpenID Connect grants offline_access (a refresh token) only with prompt=consent.
        "authorize_params": {"prompt": "consent"},
        "refresh": dict(REFRESH),
    }


def dpop_key(path: Path) -> str:
    """Write a new P-256 key as `dpop_key_file` holds it; returns its thumbprint (cnf.jkt)."""
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return thumbprint(ECAlgorithm.to_jwk(key.public_key(), as_dict=True))


def with_dpop(
    app: dict[str, Any], key_file: Path, rs: IntrospectingResourceServer
) -> dict[str, Any]:
    """`app` with `dpop: true`, the fleet's key file, and a proxy to the resource server."""
    return {
        **app,
        "dpop": True,
        "dpop_key_file": str(key_file),
        "proxy": {
            "upstream": rs.origin,
            "path_prefixes": ["/v1/"],
            "read_timeout": "10s",
            # The resource server is on loopback, which the proxy refuses unless allowed.
            "allowed_networks": ["127.0.0.0/8"],
        },
    }


async def onboard(
    directory: Path, provider: OIDCProvider, redis: RedisServer, app: dict[str, Any]
) -> None:
    """`token-broker authorize` against the provider: its login and consent, the code pasted."""
    seed = BrokerFiles(
        directory=directory,
        token_url=provider.token_url,
        store_url=redis.url,
        client_secret=AC_CLIENT[1],
        apps={"app1": app},
    )
    onboarding = Onboarding(seed.write())
    redirected = await obtain_code_redirect(onboarding.authorize_url())
    code, out, err = await asyncio.to_thread(onboarding.paste, redirected)
    assert code == 0, out + err


@dataclass
class Answers:
    """What polling the fleet saw: every answer, and when each access token was first served."""

    statuses: list[tuple[float, int, int]] = field(default_factory=list)  # (at, replica, status)
    served: dict[str, float] = field(default_factory=dict)  # token -> last time it was served

    def not_ok(self) -> list[tuple[float, int, int]]:
        """Every answer other than 200."""
        return [a for a in self.statuses if a[2] != 200]

    def expired(self, stats: ProviderStats) -> list[str]:
        """Tokens served at or after the expiry the provider gave them."""
        return [
            token for token, at in self.served.items() if at >= stats.access_tokens[token]["exp"]
        ]


async def poll(fleet: Fleet, seconds: float, interval: float = 0.2) -> Answers:
    """Ask every replica for app1's token every `interval` for `seconds`."""
    answers = Answers()
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            for index, replica in enumerate(fleet.replicas):
                async with session.get(
                    f"{replica.files.api}/v1/token/app1", headers=replica.files.auth
                ) as response:
                    body = await response.json()
                    now = time.time()
                    answers.statuses.append((now, index, response.status))
                    if response.status == 200:
                        answers.served[body["access_token"]] = now
            await asyncio.sleep(interval)
    return answers


async def token_from(files: BrokerFiles) -> dict[str, Any]:
    """app1's token from one broker's API (asserting a 200)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{files.api}/v1/token/app1", headers=files.auth) as response,
    ):
        body: dict[str, Any] = await response.json()
        assert response.status == 200, body
        return body


async def refresh_at(provider: OIDCProvider, refresh_token: str) -> tuple[int, dict[str, Any]]:
    """One refresh_token grant of ac-client, straight to the provider."""
    form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": AC_CLIENT[0],
        "client_secret": AC_CLIENT[1],
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(provider.token_url, data=form) as response,
    ):
        return response.status, await response.json()


class TestHarness:
    async def test_a_spent_refresh_token_presented_again_revokes_the_grant(
        self, tmp_path: Path
    ) -> None:
        """The reuse detection the rotation tests count on is live: a second use of a spent
        refresh token is refused, counted, and the grant (with its newest token) revoked."""
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        with running_provider(tmp_path / "op") as provider:
            query = urllib.parse.urlencode(
                {
                    "client_id": AC_CLIENT[0],
                    "response_type": "code",
                    "redirect_uri": REDIRECT,
                    "scope": "api offline_access",
                    "prompt": "consent",
                    "code_challenge": challenge.rstrip(b"=").decode(),
                    "code_challenge_method": "S256",
                }
            )
            redirected = await obtain_code_redirect(f"{provider.authorize_url}?{query}")
            code = urllib.parse.parse_qs(urllib.parse.urlsplit(redirected).query)["code"][0]
            form = {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT,
                "code_verifier": verifier,
                "client_id": AC_CLIENT[0],
                "client_secret": AC_CLIENT[1],
            }
            async with (
                aiohttp.ClientSession() as session,
                session.post(provider.token_url, data=form) as response,
            ):
                assert response.status == 200, await response.text()
                first = (await response.json())["refresh_token"]
            status, rotated = await refresh_at(provider, first)
            assert status == 200, rotated
            second = rotated["refresh_token"]
            assert second != first
            reused, refused = await refresh_at(provider, first)
            after, revoked = await refresh_at(provider, second)
            stats = await provider.stats()
        assert (reused, refused["error"]) == (400, "invalid_grant")
        assert stats.reuse_detected == 1
        assert len(stats.grants_revoked) == 1
        assert (after, revoked["error"]) == (400, "invalid_grant")


class TestClientCredentials:
    async def test_a_broker_serves_a_client_credentials_token(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """The broker's client_credentials token is one oidc-provider issued and holds active."""
        with running_provider(tmp_path / "op", access_token_ttl=60) as provider:
            files = BrokerFiles(
                directory=tmp_path / "broker",
                token_url=provider.token_url,
                store_url=redis_server.url,
                client_secret=CC_CLIENT[1],
                apps={"app1": cc_app(provider)},
            )
            broker = BrokerProcess(files.write(), tmp_path / "broker.log")
            broker.start()
            try:
                await broker.wait_ready(files.metrics, timeout=60)
                body = await token_from(files)
                introspection = await provider.introspect(body["access_token"])
            finally:
                await broker.terminate_async()
            stats = await provider.stats()
        assert body["token_type"] == "Bearer"
        assert introspection["active"] is True
        assert introspection["client_id"] == CC_CLIENT[0]
        assert introspection["scope"] == "api"
        assert stats.grants == {"client_credentials": 1}, stats_json(stats)


class TestRotation:
    async def test_three_replicas_rotate_without_reuse(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """3 replicas, one Redis, four lifetimes: every refresh token is spent once, the grant
        lives, no expired token is served."""
        with running_provider(tmp_path / "op", access_token_ttl=LIFETIME) as provider:
            await onboard(tmp_path / "seed", provider, redis_server, ac_app(provider))
            fleet = Fleet(
                tmp_path / "fleet",
                provider.token_url,
                redis_server.url,
                3,
                apps={"app1": ac_app(provider)},
            )
            for replica in fleet.replicas:
                (replica.files.directory / "client_secret").write_text(AC_CLIENT[1] + "\n")
            try:
                await fleet.start(timeout=60)
                answers = await poll(fleet, LIFETIMES * LIFETIME)
                # The grant is alive at the end: a token served now is active at the provider.
                last = await token_from(fleet.replicas[0].files)
                introspection = await provider.introspect(last["access_token"])
                refreshed_by = [
                    sum(line["event"] == "token.refreshed" for line in r.process.log_lines())
                    for r in fleet.replicas
                ]
            finally:
                await fleet.stop_async()
            stats = await provider.stats()
        assert stats.reuse_detected == 0, stats_json(stats)
        assert stats.grants_revoked == [], stats_json(stats)
        assert stats.errors == [], stats_json(stats)
        assert introspection["active"] is True, introspection
        assert stats.grants["authorization_code"] == 1
        assert stats.grants["refresh_token"] >= 5, stats_json(stats)
        assert sum(refreshed_by) == stats.grants["refresh_token"], refreshed_by
        assert answers.not_ok() == []
        assert answers.expired(stats) == []
        print(f"refreshes {stats.grants['refresh_token']}, by replica {refreshed_by}")


async def proxied_gets(fleet: Fleet, seconds: float, interval: float = 0.2) -> list[int]:
    """GET through every replica's proxy every `interval` for `seconds`; the statuses."""
    statuses = []
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            for index, replica in enumerate(fleet.replicas):
                url = f"{replica.files.api}/v1/proxy/app1/v1/items/{index}"
                async with session.get(url, headers=replica.files.auth) as response:
                    await response.read()
                    statuses.append(response.status)
            await asyncio.sleep(interval)
    return statuses


async def token_and_proof(files: BrokerFiles, url: str) -> dict[str, Any]:
    """POST /v1/token/app1/proof: the DPoP app's token with a proof of GET `url`."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{files.api}/v1/token/app1/proof",
            json={"method": "GET", "url": url},
            headers=files.auth,
        ) as response,
    ):
        body: dict[str, Any] = await response.json()
        assert response.status == 200, body
        return body


def only_nonce_challenges(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The provider's grant errors other than its nonce challenges (which the broker answers)."""
    return [e for e in errors if e["error"] != "use_dpop_nonce"]


class TestDpop:
    async def test_a_bound_token_works_with_a_proof_and_a_copy_without_one_does_not(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """The provider binds the token to the broker's key (cnf.jkt) after a nonce challenge;
        the resource server accepts every proxied request and the proof API's proof, and
        refuses the same token copied without a proof, as a bearer token, with a replayed
        proof, or with a proof of another URL."""
        jkt = dpop_key(tmp_path / "dpop.pem")
        with running_provider(
            tmp_path / "op", access_token_ttl=300, dpop_require_nonce=True
        ) as provider:
            rs = IntrospectingResourceServer(provider, nonce_period=600)
            await rs.start()
            try:
                files = BrokerFiles(
                    directory=tmp_path / "broker",
                    token_url=provider.token_url,
                    store_url=redis_server.url,
                    client_secret=CC_CLIENT[1],
                    apps={"app1": with_dpop(cc_app(provider), tmp_path / "dpop.pem", rs)},
                )
                broker = BrokerProcess(files.write(), tmp_path / "broker.log")
                broker.start()
                try:
                    await broker.wait_ready(files.metrics, timeout=60)
                    async with (
                        aiohttp.ClientSession() as session,
                        session.get(f"{files.api}/v1/token/app1", headers=files.auth) as response,
                    ):
                        alone = response.status, (await response.json())["error"]
                    proxied = []
                    for i in range(5):
                        async with (
                            aiohttp.ClientSession() as session,
                            session.get(
                                f"{files.api}/v1/proxy/app1/v1/items/{i}", headers=files.auth
                            ) as response,
                        ):
                            proxied.append(response.status)
                    url = f"{rs.origin}/v1/items/7"
                    issued = await token_and_proof(files, url)
                finally:
                    await broker.terminate_async()
                token, proof = issued["access_token"], issued["proof"]
                with_proof = await present(url, token, proof)
                without = await present(url, token, None)
                as_bearer = await present(url, token, None, scheme="Bearer")
                replayed = await present(url, token, proof)
                elsewhere = await present(f"{rs.origin}/v1/admin", token, proof)
                introspection = await provider.introspect(token)
                stats = await provider.stats()
            finally:
                await rs.stop()
        assert alone == (409, "dpop_bound")
        assert proxied == [200] * 5
        assert with_proof == (200, "ok")
        assert without == (401, "no DPoP proof")
        assert as_bearer == (401, "no DPoP token")
        assert replayed == (401, "jti replayed")
        assert elsewhere[0] == 401
        assert elsewhere[1].startswith("htu "), elsewhere
        assert rs.accepted == 6
        # The first proxied request met the resource server's nonce challenge and was retried.
        assert rs.refusals["nonce"] == 1
        assert sum(rs.refusals.values()) == 5, rs.refusals
        assert introspection["active"] is True
        assert introspection["token_type"] == "DPoP"
        assert introspection["cnf"] == {"jkt": jkt}
        assert stats.access_tokens[token]["jkt"] == jkt
        assert stats.grants == {"client_credentials": 1}, stats_json(stats)
        assert stats.dpop_nonce_challenges >= 1, stats_json(stats)
        assert only_nonce_challenges(stats.errors) == [], stats_json(stats)

    async def test_three_replicas_rotate_a_bound_grant_without_reuse(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """3 replicas, one Redis, one DPoP key, four lifetimes: every access token is bound to
        the key, every refresh token is spent once, the grant lives, and the resource server
        accepts every request proxied meanwhile (nonce challenges answered on both sides)."""
        key_file = tmp_path / "dpop.pem"
        jkt = dpop_key(key_file)
        with running_provider(
            tmp_path / "op", access_token_ttl=LIFETIME, dpop_require_nonce=True
        ) as provider:
            # A new resource-server nonce every 7 s: the proxies meet challenges throughout.
            rs = IntrospectingResourceServer(provider, nonce_period=7)
            await rs.start()
            try:
                app = with_dpop(ac_app(provider), key_file, rs)
                await onboard(tmp_path / "seed", provider, redis_server, app)
                fleet = Fleet(
                    tmp_path / "fleet", provider.token_url, redis_server.url, 3, apps={"app1": app}
                )
                for replica in fleet.replicas:
                    (replica.files.directory / "client_secret").write_text(AC_CLIENT[1] + "\n")
                try:
                    await fleet.start(timeout=60)
                    statuses = await proxied_gets(fleet, LIFETIMES * LIFETIME)
                    last = await token_and_proof(fleet.replicas[0].files, f"{rs.origin}/v1/x")
                    introspection = await provider.introspect(last["access_token"])
                    refreshed_by = [
                        sum(line["event"] == "token.refreshed" for line in r.process.log_lines())
                        for r in fleet.replicas
                    ]
                finally:
                    await fleet.stop_async()
                stats = await provider.stats()
            finally:
                await rs.stop()
        assert stats.reuse_detected == 0, stats_json(stats)
        assert stats.grants_revoked == [], stats_json(stats)
        assert only_nonce_challenges(stats.errors) == [], stats_json(stats)
        assert stats.dpop_nonce_challenges >= 1, stats_json(stats)
        assert stats.grants["authorization_code"] == 1
        assert stats.grants["refresh_token"] >= 5, stats_json(stats)
        assert sum(refreshed_by) == stats.grants["refresh_token"], refreshed_by
        assert {t["jkt"] for t in stats.access_tokens.values()} == {jkt}
        assert introspection["active"] is True, introspection
        assert introspection["cnf"] == {"jkt": jkt}
        assert statuses and set(statuses) == {200}, (Counter(statuses), rs.refusals)
        assert rs.accepted == len(statuses)
        assert set(rs.refusals) <= {"nonce"}, rs.refusals
        assert rs.refusals["nonce"] >= 2
        print(
            f"refreshes {stats.grants['refresh_token']}, by replica {refreshed_by}; "
            f"{len(statuses)} proxied requests accepted, {rs.refusals['nonce']} resource-server "
            f"and {stats.dpop_nonce_challenges} token-endpoint nonce challenges answered"
        )

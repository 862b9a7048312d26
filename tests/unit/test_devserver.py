"""The dev OAuth server's grants: authorization code with state and PKCE S256, single-use codes,
refresh tokens rotated on every use, and a reused refresh token revoking the whole grant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest

from broker.authorize import pkce_pair
from broker.devserver import DevOAuthServer

CLIENT = {"client_id": "dev-client", "client_secret": "dev-secret-0123456789"}


@pytest.fixture
async def server() -> AsyncIterator[DevOAuthServer]:
    oauth = DevOAuthServer(
        client_id=CLIENT["client_id"], client_secret=CLIENT["client_secret"], lifetime=60
    )
    await oauth.start()
    yield oauth
    await oauth.stop()


async def authorize(
    session: aiohttp.ClientSession, server: DevOAuthServer, **overrides: str
) -> dict[str, list[str]]:
    """GET /authorize; the query of the redirect (code and state, or error)."""
    verifier, challenge = pkce_pair()
    params = {
        "client_id": CLIENT["client_id"],
        "response_type": "code",
        "redirect_uri": server.redirect_uri,
        "state": "st-123",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "scope": "scim offline_access",
        **overrides,
    }
    async with session.get(
        f"{server.authorize_url}?{urlencode(params)}", allow_redirects=False
    ) as response:
        assert response.status == 302, await response.text()
        location = response.headers["Location"]
    assert location.startswith(server.redirect_uri + "?")
    query = parse_qs(urlsplit(location).query)
    query["verifier"] = [verifier]
    return query


async def token(session: aiohttp.ClientSession, server: DevOAuthServer, **form: str) -> Any:
    async with session.post(server.token_url, data={**CLIENT, **form}) as response:
        return response.status, await response.json()


async def exchange(
    session: aiohttp.ClientSession, server: DevOAuthServer, query: dict[str, list[str]]
) -> Any:
    return await token(
        session,
        server,
        grant_type="authorization_code",
        code=query["code"][0],
        redirect_uri=server.redirect_uri,
        code_verifier=query["verifier"][0],
    )


class TestAuthorizationCode:
    async def test_code_then_rotated_refresh_tokens(self, server: DevOAuthServer) -> None:
        """The code carries the state back and buys a token set; each refresh rotates."""
        async with aiohttp.ClientSession() as session:
            query = await authorize(session, server)
            assert query["state"] == ["st-123"]
            status, first = await exchange(session, server, query)
            assert status == 200 and first["refresh_token"] and first["scope"]
            status, second = await token(
                session, server, grant_type="refresh_token", refresh_token=first["refresh_token"]
            )
            assert status == 200
            assert second["refresh_token"] != first["refresh_token"]
            assert second["access_token"] != first["access_token"]

    async def test_a_code_is_single_use(self, server: DevOAuthServer) -> None:
        """A second exchange of the same code is invalid_grant."""
        async with aiohttp.ClientSession() as session:
            query = await authorize(session, server)
            assert (await exchange(session, server, query))[0] == 200
            status, body = await exchange(session, server, query)
            assert (status, body["error"]) == (400, "invalid_grant")

    async def test_a_wrong_verifier_is_refused(self, server: DevOAuthServer) -> None:
        """PKCE: the code is useless without its verifier."""
        async with aiohttp.ClientSession() as session:
            query = await authorize(session, server)
            query["verifier"] = [pkce_pair()[0]]
            status, body = await exchange(session, server, query)
            assert (status, body["error"]) == (400, "invalid_grant")

    @pytest.mark.parametrize(
        "overrides",
        [{"code_challenge_method": "plain"}, {"code_challenge": ""}, {"state": ""}],
    )
    async def test_pkce_s256_and_state_are_required(
        self, server: DevOAuthServer, overrides: dict[str, str]
    ) -> None:
        """Without an S256 challenge or a state the redirect carries an error, no code."""
        async with aiohttp.ClientSession() as session:
            query = await authorize(session, server, **overrides)
            assert query["error"] == ["invalid_request"] and "code" not in query

    async def test_an_unregistered_redirect_uri_is_shown_not_followed(
        self, server: DevOAuthServer
    ) -> None:
        """A foreign redirect_uri gets a 400 page: the server never redirects there."""
        async with aiohttp.ClientSession() as session:
            params = {
                "client_id": CLIENT["client_id"],
                "response_type": "code",
                "redirect_uri": "http://evil.example/cb",
                "state": "s",
            }
            async with session.get(
                f"{server.authorize_url}?{urlencode(params)}", allow_redirects=False
            ) as response:
                assert response.status == 400


class TestReuseDetection:
    async def test_a_spent_refresh_token_revokes_the_grant(self, server: DevOAuthServer) -> None:
        """Presenting a rotated-out refresh token is invalid_grant, and kills its successor."""
        async with aiohttp.ClientSession() as session:
            _, first = await exchange(session, server, await authorize(session, server))
            old = first["refresh_token"]
            _, second = await token(session, server, grant_type="refresh_token", refresh_token=old)
            status, body = await token(
                session, server, grant_type="refresh_token", refresh_token=old
            )
            assert (status, body["error"]) == (400, "invalid_grant")
            assert server.reuse_detected == 1
            status, body = await token(
                session, server, grant_type="refresh_token", refresh_token=second["refresh_token"]
            )
            assert (status, body["error"]) == (400, "invalid_grant")

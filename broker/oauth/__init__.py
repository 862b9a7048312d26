"""The TokenSource protocol: something that can get a token set from an authorization server."""

from __future__ import annotations

from typing import Protocol

from broker.model import TokenSet


class TokenSource(Protocol):
    """Gets a new token set for one app.

    Raises `TransientTokenError` or `PermanentTokenError` (from broker.errors) on failure.
    """

    async def fetch(
        self, refresh_token: str | None = None, *, dpop_jkt: str | None = None
    ) -> TokenSet:
        """Ask the token endpoint: with `refresh_token`, the refresh_token grant; else the app's grant.

        `dpop_jkt`: the DPoP key the refreshed set is bound to (None: a bearer set).
        """
        ...

"""`httpx.Auth` with the broker as token source: `httpx.Client(auth=BrokerAuth("twilio"))`.

Every request carries `Authorization: Bearer <token>`; on a 401 the broker's refresh route is
asked once and the request sent once more with the new token (sync and async clients alike).
Needs the `httpx` extra.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any

import httpx

from token_broker_client.errors import RateLimited
from token_broker_client.source import TokenSource


class BrokerAuth(httpx.Auth):
    """Attach the app's token; on a 401, one refresh at the broker and one retry.

    `source` is a TokenSource or an app name (then `options` are TokenSource's). The retry is
    skipped when the broker hands back the rejected token (one younger than 5 s is not
    replaced) or refuses the refresh as rate-limited: the caller then sees the upstream's 401.
    """

    # The body is read before the first send, so the retry can send it again.
    requires_request_body = True

    def __init__(self, source: TokenSource | str, **options: Any) -> None:
        self.source = source if isinstance(source, TokenSource) else TokenSource(source, **options)

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        """The flow for `httpx.Client`."""
        token = self.source.get_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        try:
            new = self.source.refresh(rejected=token).access_token
        except RateLimited:
            return
        if new != token:
            request.headers["Authorization"] = f"Bearer {new}"
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """The flow for `httpx.AsyncClient` (the broker is asked off the event loop)."""
        token = await self.source.aget_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        try:
            new = (await self.source.arefresh(rejected=token)).access_token
        except RateLimited:
            return
        if new != token:
            request.headers["Authorization"] = f"Bearer {new}"
            yield request

"""A token source: asks the broker for an app's access token and keeps it while it is good.

`TokenSource("twilio").get_token()` is the whole use. The token is kept until `expires_in`
(as the broker answered it) minus `margin` seconds have passed, measured on the monotonic
clock from the moment the request was sent, so a wall-clock step cannot stretch it. A caller
whose upstream answered 401 calls `refresh(rejected=token)`: the broker's refresh route is
asked once, and callers that saw the same token rejected at the same time share one refresh.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from token_broker_client.errors import BrokerUnreachable, error_for
from token_broker_client.transport import Answer, BrokerEndpoint, BrokerTransport

DEFAULT_MARGIN = 30.0


@dataclass(frozen=True)
class Token:
    """A token as the broker served it; `fresh_until` is on the source's monotonic clock."""

    access_token: str = field(repr=False)
    token_type: str
    expires_at: float
    expires_in: float
    scope: str | None
    fresh_until: float


class TokenSource:
    """Tokens of one app from the broker, cached until `expires_in` minus `margin`.

    `url` is `http://host:port` or `unix:/path/to/api.sock`; it, `key` and `key_file` default
    to `TOKEN_BROKER_URL`, `TOKEN_BROKER_KEY_FILE` and `TOKEN_BROKER_KEY` (over a unix socket
    no key is needed when the caller's uid or gid is mapped to a client). `min_ttl` asks the
    broker for a token with at least that many seconds left (and keeps it no longer). Safe to
    share between threads; the `a`-prefixed methods are for asyncio code.
    """

    def __init__(
        self,
        app: str,
        *,
        url: str | None = None,
        key: str | None = None,
        key_file: str | os.PathLike[str] | None = None,
        margin: float = DEFAULT_MARGIN,
        min_ttl: int | None = None,
        timeout: float = 10.0,
        endpoint: BrokerEndpoint | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if margin < 0:
            raise ValueError("margin must not be negative")
        self.app = app
        self.endpoint = endpoint or BrokerEndpoint.resolve(
            url, key=key, key_file=key_file, timeout=timeout
        )
        self.margin = margin
        self.min_ttl = min_ttl
        self._clock = clock
        self._transport = BrokerTransport(self.endpoint)
        self._lock = threading.Lock()
        self._token: Token | None = None
        self._route = f"/v1/token/{quote(app, safe='')}"

    def __repr__(self) -> str:
        return f"TokenSource({self.app!r}, url={self.endpoint.url!r})"

    # ---- sync ------------------------------------------------------------------------------

    def get_token(self) -> str:
        """The access token: the kept one while it is fresh, else a new answer of the broker."""
        return self.get().access_token

    def get(self) -> Token:
        """The kept token while it is fresh, else the broker's (one request for all threads)."""
        token = self._fresh()
        if token is not None:
            return token
        with self._lock:
            token = self._fresh()
            if token is None:
                token = self._token = self._ask("GET", self._token_target())
            return token

    def refresh(self, rejected: str | None = None) -> Token:
        """Ask the broker's refresh route for a new token (for a caller whose upstream answered
        401 to `rejected`). When the kept token already differs from `rejected`, another caller
        refreshed it: that one is returned and the broker is not asked. The broker answers a
        token younger than 5 s with that same token, and raises RateLimited past ten forced
        refreshes a minute: compare the result with `rejected` before retrying."""
        with self._lock:
            kept = self._token
            if rejected is not None and kept is not None and kept.access_token != rejected:
                return kept
            token = self._token = self._ask("POST", f"{self._route}/refresh")
            return token

    def invalidate(self) -> None:
        """Forget the kept token: the next `get` asks the broker."""
        with self._lock:
            self._token = None

    def close(self) -> None:
        """Close this thread's kept-alive connection to the broker."""
        self._transport.close()

    # ---- asyncio ---------------------------------------------------------------------------

    async def aget_token(self) -> str:
        """`get_token` for asyncio: a fresh kept token without waiting; the broker is asked in
        a worker thread, so the event loop never blocks on it."""
        return (await self.aget()).access_token

    async def aget(self) -> Token:
        """`get` for asyncio."""
        token = self._fresh()
        if token is not None:
            return token
        return await asyncio.to_thread(self.get)

    async def arefresh(self, rejected: str | None = None) -> Token:
        """`refresh` for asyncio (in a worker thread)."""
        return await asyncio.to_thread(self.refresh, rejected)

    # ---- internals -------------------------------------------------------------------------

    def _fresh(self) -> Token | None:
        token = self._token
        if token is not None and self._clock() < token.fresh_until:
            return token
        return None

    def _token_target(self) -> str:
        return self._route if self.min_ttl is None else f"{self._route}?min_ttl={self.min_ttl}"

    def _ask(self, method: str, target: str) -> Token:
        sent = self._clock()
        answer = self._transport.request(method, target, headers={"Accept": "application/json"})
        if answer.status != 200:
            raise error_for(answer.status, answer.body, answer.headers.get("retry-after"))
        return self._parse(answer, sent)

    def _parse(self, answer: Answer, sent: float) -> Token:
        try:
            document = json.loads(answer.body)
            access_token = str(document["access_token"])
            expires_in = float(document["expires_in"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BrokerUnreachable(
                f"the broker's token answer is not the contract's JSON ({type(exc).__name__})",
                status=answer.status,
            ) from None
        # The kept token must still hold `min_ttl` seconds when handed out, as the broker's did.
        keep_back = max(self.margin, float(self.min_ttl or 0))
        return Token(
            access_token=access_token,
            token_type=str(document.get("token_type", "Bearer")),
            expires_at=float(document.get("expires_at", 0.0)),
            expires_in=expires_in,
            scope=document.get("scope"),
            fresh_until=sent + expires_in - keep_back,
        )

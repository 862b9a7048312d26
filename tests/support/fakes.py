"""Fakes at the refresher's seams: a scripted token source."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque

from broker.errors import TokenEndpointError
from broker.model import TokenSet
from tests.support.fake_clock import FakeClock


class FakeTokenSource:
    """Implements TokenSource: issues tokens of `lifetime` seconds, or scripted errors.

    `script` holds exceptions (or None for "issue a token") consumed one per call; when it is
    empty, `failure` (if set) is raised on every call, else a token is issued.
    """

    def __init__(self, clock: FakeClock, lifetime: float = 60.0, *, rotate: bool = False) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.rotate = rotate
        self.script: deque[TokenEndpointError | None] = deque()
        self.failure: TokenEndpointError | None = None
        self.calls: list[str | None] = []
        # The DPoP key each call was asked to prove with (None: no key named).
        self.dpop_jkts: list[str | None] = []
        self.delay = 0.0
        self._serial = itertools.count(1)

    async def fetch(
        self, refresh_token: str | None = None, *, dpop_jkt: str | None = None
    ) -> TokenSet:
        """Issue the next token (or raise the next scripted error)."""
        self.calls.append(refresh_token)
        self.dpop_jkts.append(dpop_jkt)
        sent_at = self.clock.time()
        if self.delay:
            await self.clock.sleep(self.delay)
        else:
            await asyncio.sleep(0)
        step = self.script.popleft() if self.script else self.failure
        if step is not None:
            raise step
        n = next(self._serial)
        return TokenSet(
            access_token=f"access-{n:04d}-{'x' * 24}",
            token_type="Bearer",
            issued_at=sent_at,
            expires_at=sent_at + self.lifetime,
            scope="read",
            refresh_token=f"refresh-{n:04d}-{'y' * 24}" if self.rotate else None,
        )

"""Fakes at the core's seams: a scripted token source (the refresher's), a token service (the
API's), and the refresher's side of the fleet protocol."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Collection, Mapping

from broker.errors import TokenEndpointError, TokenUnavailable
from broker.fleet import FleetProtocol, Timing
from broker.model import AppState, TokenSet
from broker.service import AppStatus
from broker.store import TokenStore
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


# The wall time the API fakes start at (FakeClock's default start too).
NOW = 1_700_000_000.0


class FakeTokenService:
    """Implements broker.service.TokenService: tokens per app, scripted errors, a settable clock.

    - `errors[app]`: raised by get_token; the app's token is then not servable from memory.
    - `refresh_errors[app]` / `successors[app]`: what force_refresh raises, or the token it
      installs (see `script_refresh`).
    - `reuse=False`: nothing is ever answered from memory (`cached_token` and `current_token` are
      None), so every request reaches get_token and is recorded in `calls`.
    - With a FakeClock, `now()` follows it and the token stops being servable at the monotonic
      `deadline`; without one, `now()` is the settable `wall`.
    """

    def __init__(
        self,
        tokens: Mapping[str, TokenSet],
        *,
        clock: FakeClock | None = None,
        refreshed_at: float = NOW,
        reuse: bool = True,
        lifetime: float = 3600.0,
    ) -> None:
        self.tokens = dict(tokens)
        self.clock = clock
        self.wall = NOW
        self.refreshed_at = refreshed_at
        self.reuse = reuse
        self.lifetime = lifetime
        self.errors: dict[str, Exception] = {}
        self.refresh_errors: dict[str, Exception] = {}
        self.successors: dict[str, TokenSet] = {}
        self.last_errors: dict[str, str] = {}
        self.unready: list[str] = []
        self.calls: list[tuple[str, str, float]] = []
        self.refused: list[TokenSet] = []
        self.forced = 0
        self.full_checks = 0
        self.deadline = float("inf")  # monotonic: the tokens are servable before it
        # Seconds another clock takes off the token's life (the pod's own, ahead of the store's).
        self.shortened_by = 0.0

    def script_refresh(self, app: str, result: TokenSet | Exception) -> None:
        """force_refresh of `app` installs `result`, or raises it."""
        if isinstance(result, Exception):
            self.successors.pop(app, None)
            self.refresh_errors[app] = result
        else:
            self.refresh_errors.pop(app, None)
            self.successors[app] = result

    def _servable(self, app: str) -> bool:
        in_time = self.clock is None or self.clock.monotonic() < self.deadline
        return self.reuse and app not in self.errors and in_time

    def app_names(self) -> Collection[str]:
        """Every app with a token."""
        return self.tokens.keys()

    def now(self) -> float:
        """The clock's wall time, or the test-set `wall`."""
        return self.clock.time() if self.clock is not None else self.wall

    def cached_token(self, app: str, min_ttl: float = 0.0) -> TokenSet | None:
        """The token while servable; None with a min_ttl (so get_token checks it), counted."""
        self.full_checks += 1
        return self.tokens[app] if self._servable(app) and not min_ttl else None

    def current_token(self, app: str) -> TokenSet | None:
        """The token in memory (None when nothing is reused)."""
        return self.tokens[app] if self.reuse else None

    def remaining(self, app: str) -> float:
        """The token's seconds left by `now()`, less `shortened_by`."""
        return self.tokens[app].expires_at - self.now() - self.shortened_by

    def servable_until(self, app: str) -> float:
        """The `deadline`, or -inf when the token is not servable from memory."""
        if not self.reuse or app in self.errors:
            return float("-inf")
        return self.deadline

    async def get_token(self, app: str, min_ttl: float = 0.0) -> TokenSet:
        """The app's token, or its scripted error; ValueError for a min_ttl beyond `lifetime`."""
        self.calls.append(("get", app, min_ttl))
        if app in self.errors:
            raise self.errors[app]
        if self.clock is not None and self.clock.monotonic() >= self.deadline:
            raise TokenUnavailable("no valid token", retry_after=5.0)
        if min_ttl > self.lifetime:
            raise ValueError(
                f"min_ttl {min_ttl:g} exceeds the token lifetime of {self.lifetime:g} seconds"
            )
        return self.tokens[app]

    async def force_refresh(self, app: str) -> TokenSet:
        """The scripted refresh: raise its error or install its successor, then get_token."""
        self.calls.append(("refresh", app, 0.0))
        self.forced += 1
        if app in self.refresh_errors:
            raise self.refresh_errors[app]
        if app in self.successors:
            self.tokens[app] = self.successors[app]
        return await self.get_token(app)

    async def token_refused(self, app: str, token: TokenSet) -> TokenSet:
        """Recorded in `refused`, then answered as a forced refresh."""
        self.refused.append(token)
        return await self.force_refresh(app)

    def status(self, app: str) -> AppStatus:
        """A fresh app with the token's expiry and its scripted last error."""
        return AppStatus(
            app,
            AppState.FRESH,
            self.tokens[app].expires_at,
            self.refreshed_at,
            self.last_errors.get(app),
        )

    def unready_apps(self) -> list[str]:
        """The scripted unready apps."""
        return self.unready

    def app_ready(self, app: str) -> bool:
        """Ready unless scripted unready."""
        return app not in self.unready


# ---- the fleet protocol's seams (unit tests of broker/fleet/) --------------------------------

FLEET_APP = "scim"


class CurrentSet:
    """The refresher's side of the fleet protocol (broker.fleet.KnownSet): the set it serves,
    replaced by adoption unless `adopts` is False (a replica that never takes another's set)."""

    def __init__(self, token: TokenSet | None, *, adopts: bool = True) -> None:
        self.token = token
        self.adopts = adopts

    def newest_known(self) -> TokenSet | None:
        """The set served now."""
        return self.token

    def adopt_from_store(self, token: TokenSet) -> None:
        """Take a newer set (ignored when `adopts` is False)."""
        if self.adopts:
            self.token = token

    def take_lowered_expiry(self, stored: TokenSet) -> None:
        """The store holds the set served now: take an earlier expiry (as `adopts` says)."""
        token = self.token
        if self.adopts and token is not None and stored.expires_at < token.expires_at:
            self.token = token.expiring_at(stored.expires_at)


def spendable_grant(
    clock: FakeClock,
    access: str,
    refresh: str,
    *,
    issued_ago: float = 100.0,
    expires_in: float = 20.0,
) -> TokenSet:
    """A stored set with a refresh token to spend: lineage 1, generation 2, by the clock's time."""
    now = clock.time()
    return TokenSet(
        access_token=access,
        token_type="Bearer",
        issued_at=now - issued_ago,
        expires_at=now + expires_in,
        refresh_token=refresh,
        lineage=1,
        generation=2,
    )


def fleet_protocol(
    store: TokenStore,
    clock: FakeClock,
    holder: CurrentSet,
    *,
    owner: str = "r0",
    timing: Timing | None = None,
) -> FleetProtocol:
    """The fleet protocol of app FLEET_APP spending refresh tokens, for `holder`'s set."""
    return FleetProtocol(
        FLEET_APP,
        store,
        clock,
        owner=owner,
        spends_refresh_tokens=True,
        known=holder,
        timing=timing,
    )

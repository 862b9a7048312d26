"""The callers' side of an app's refresher: what may be served, and asking for a refresh.

A part of `AppRefresher` (broker/refresher.py), kept apart so that each reads in one sitting:
the refresher's loop schedules, this serves. The `TYPE_CHECKING` block names what it uses of
the rest of the refresher.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TYPE_CHECKING

from broker import events, policy
from broker.clock import Clock, Wake, wait_within
from broker.errors import NeedsAuthorization, RateLimited, StoreUnavailable, TokenUnavailable
from broker.events import EventHook
from broker.fleet import FleetProtocol
from broker.model import AppSpec, AppState, TokenSet
from broker.schedule import Schedule, purged
from broker.service import AppStatus
from broker.store import Refusal

if TYPE_CHECKING:
    from broker.refresher import RefresherStore

# A forced refresh of a token younger than this is answered with the current token.
FORCE_MIN_AGE = 5.0
# At most this many forced refreshes per app per FORCE_WINDOW seconds.
FORCE_LIMIT = 10
FORCE_WINDOW = 60.0
# At most one fleet-wide purge of a refused access token per app in this many seconds (the
# store's clock): an upstream that refuses every token costs the fleet one refresh per interval.
PURGE_INTERVAL = 10.0
# How long a caller without a servable token waits for a refresh in flight.
CALLER_WAIT = 5.0


class Serving:
    """Serving callers from memory: `get`, `force`, `refused` (a part of AppRefresher)."""

    if TYPE_CHECKING:
        spec: AppSpec
        token: TokenSet | None
        last_error: str | None
        last_refresh_at: float | None
        schedule: Schedule
        fleet: FleetProtocol
        _store: RefresherStore
        _clock: Clock
        _host: Clock
        _emit: EventHook
        _mono_expiry: float
        _stopping: bool
        _attempting: bool
        _attempt_started: float
        _listeners: list[Callable[[TokenSet], None]]
        _inflight: asyncio.Task[None] | None
        _wake: Wake
        _forced: collections.deque[float]
        _refused_fp: str | None
        _successor_waiters: dict[asyncio.Future[None], None]

        @property
        def name(self) -> str: ...
        @property
        def state(self) -> AppState: ...
        @property
        def store_name(self) -> str: ...
        def notify_store_changed(self, *, reconnected: bool = False) -> None: ...
        def _start_refresh(self) -> asyncio.Task[None]: ...

    def _init_serving(self) -> None:
        """The serving part's state (called once by AppRefresher.__init__)."""
        self._forced = collections.deque()  # the times of forced refreshes (rate limit)
        # The access token an upstream refused (its fingerprint): due now while still held.
        self._refused_fp = None
        self._successor_waiters = {}
        self._listeners = []

    def add_listener(self, callback: Callable[[TokenSet], None]) -> None:
        """Call `callback(token)` (synchronously, so it must be quick) after each token adopted."""
        self._listeners.append(callback)

    def status(self) -> AppStatus:
        """The app's state as the API shows it."""
        return AppStatus(
            name=self.name,
            state=self.state,
            expires_at=self.token.expires_at if self.token else None,
            last_refresh_at=self.last_refresh_at,
            last_error=self.last_error,
        )

    def next_refresh_at(self) -> float | None:
        """Wall time (the fleet's clock) of the next refresh attempt; None while none is
        scheduled (the app waits for token-broker authorize, or the loop is stopping).

        While an attempt is in flight, the time it started: an attempt that hangs shows as
        an ever older time, which the alert on a stalled refresh looks for.
        """
        if self.schedule.needs_authorization is not None or self._stopping:
            return None
        mono = self._clock.monotonic()
        if self._attempting:
            return self._clock.time() - (mono - self._attempt_started)
        return self._clock.time() + max(0.0, self.schedule.at - mono)

    def remaining(self) -> float:
        """Seconds the current token has left: the least of every reckoning (issue 20, M3).

        The fleet's clock (the store's), this pod's own wall clock and the monotonic guard
        counted from adoption must all agree: a step of the store's clock (a restarted pod
        measuring a Redis whose clock went back) or of the pod's clock cannot make a token
        live longer than the other clock says. A JWT's `exp` is already folded into
        `expires_at` (the earlier of the two, broker/oauth/parse.py), so it is held against
        both clocks too. Any reckoning that comes out shorter lowers the monotonic guard for
        good: after a clock steps back, the token's serving deadline stays where it was.
        """
        token = self.token
        if token is None:
            return 0.0
        mono = self._clock.monotonic()
        by_wall = token.expires_at - max(self._clock.time(), self._host.time())
        self._mono_expiry = min(self._mono_expiry, mono + by_wall)
        return self._mono_expiry - mono

    def servable(self, min_ttl: float = 0.0) -> TokenSet | None:
        """The current token if it may be served with `min_ttl` seconds left, else None."""
        token = self.token
        if token is None:
            return None
        if policy.is_servable(self.remaining(), token.lifetime, self.spec.refresh, min_ttl):
            return token
        return None

    def servable_until(self) -> float:
        """The monotonic time after which the current token stops being servable (`servable()`
        turns None), as the clocks stand now; -inf without a token."""
        if self.token is None:
            return float("-inf")
        return self._clock.monotonic() + self._servable_left()

    def _servable_left(self) -> float:
        token = self.token
        if token is None:
            return 0.0
        return self.remaining() - policy.safety_margin(self.spec.refresh, token.lifetime)

    async def get(self, min_ttl: float = 0.0) -> TokenSet:
        """A servable token, refreshing first when none is (and no backoff is running)."""
        token = self.servable(min_ttl)
        if token is not None:
            return token
        self._check_min_ttl(min_ttl)
        self._raise_if_needs_authorization()
        schedule = self.schedule
        if self._inflight is None and (schedule.backoff or schedule.blocked or self._stopping):
            # During a backoff callers do not trigger extra requests (min_ttl included).
            raise TokenUnavailable(self._unavailable_message(), retry_after=self._retry_in())
        if self._inflight is None and min_ttl > 0 and self.servable() is not None:
            # Only min_ttl wants a new token: limited like a forced refresh, so a caller asking
            # for a long-lived token in a loop cannot storm the token endpoint.
            self._take_forced_slot(on_limit=TokenUnavailable)
        await self._wait_for_refresh()
        return self._servable_or_raise(min_ttl)

    async def force(self) -> TokenSet:
        """Refresh now for a caller whose upstream rejected the token (coalesced, rate-limited)."""
        self._raise_if_needs_authorization()
        token = self.token
        now = self._clock.time()
        if token is not None and now - token.issued_at < FORCE_MIN_AGE and self.servable():
            return token
        if self._inflight is None:
            self._take_forced_slot(on_limit=RateLimited)
        await self._wait_for_refresh()
        return self._servable_or_raise(0.0)

    async def refused(self, token: TokenSet) -> TokenSet:
        """The upstream refused `token` (a proxied request answered a `refresh_on_status`
        status): purge it fleet-wide and return the token to retry with.

        The refusal is recorded in the store by fingerprint, a compare-and-set on the stored
        set, so a refusal of a token already replaced purges nothing. The replicas still
        holding it treat it as due now: one refreshes under the lease (a rotating grant spends
        its refresh token by the fleet protocol, as always), the others adopt its set from the
        notice. Waits up to CALLER_WAIT for the successor; the token returned is the refused
        one when none came. Raises RateLimited when another token of the app was purged less
        than PURGE_INTERVAL ago, and NeedsAuthorization / TokenUnavailable as `get` does.
        """
        self._raise_if_needs_authorization()
        refused_fp = token.fingerprint
        current = self.token
        if current is not None and current.fingerprint != refused_fp:
            return self._servable_or_raise(0.0)  # replaced here already: retry with ours
        try:
            answer = await self._store.refuse_token(
                self.store_name, refused_fp, interval=PURGE_INTERVAL
            )
        except StoreUnavailable:
            # No fleet to tell: refresh alone, as a store outage makes every refresh.
            self._emit(events.TokenRefused(self.name, "unrecorded", refused_fp))
            return await self.force()
        # (A recorded refusal is also an audit line: token.refused.)
        self._emit(events.TokenRefused(self.name, answer.value, refused_fp))
        if answer is Refusal.LIMITED:
            raise RateLimited(
                f"an access token of {self.name} was purged less than "
                f"{PURGE_INTERVAL:.0f} seconds ago",
                retry_after=PURGE_INTERVAL,
            )
        if answer is Refusal.STALE:
            self.notify_store_changed()  # the store holds another set: adopt it
        else:
            self.purge(refused_fp)
        await self._wait_for_successor(refused_fp)
        return self._servable_or_raise(0.0)

    def purge(self, refused_fp: str) -> None:
        """The access token `refused_fp` was refused upstream: while it is ours, it is due now.

        A refusal of another token (an older one: ours replaced it) changes nothing. During a
        backoff the backoff stands: the purge asks for no request the fleet holds back.
        """
        token = self.token
        if token is None or token.fingerprint != refused_fp:
            return
        self._refused_fp = refused_fp
        if not self.schedule.backoff:
            self.schedule = purged(self.schedule, self._clock.monotonic())
            self._wake.set()

    async def _wait_for_successor(self, refused_fp: str) -> None:
        """Wait (up to CALLER_WAIT, on the injected clock) until the token held is not the
        refused one, or a refresh ended without one (a backoff, a block, authorization)."""
        deadline = self._clock.monotonic() + CALLER_WAIT
        loop = asyncio.get_running_loop()
        while (
            self.token is not None
            and self.token.fingerprint == refused_fp
            and not self._stopping
            and self.schedule.needs_authorization is None
            and not self.schedule.backoff
        ):
            left = deadline - self._clock.monotonic()
            if left <= 0:
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._successor_waiters[waiter] = None
            try:
                await wait_within(self._clock, waiter, left)
            finally:
                waiter.cancel()
                self._successor_waiters.pop(waiter, None)

    def _wake_successor_waiters(self) -> None:
        # In the order they began to wait (a dict): a set's order follows memory addresses,
        # which differ from run to run, and a simulation's seed must replay alike.
        for waiter in self._successor_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _take_forced_slot(self, *, on_limit: type[RateLimited] | type[TokenUnavailable]) -> None:
        """Count a caller-triggered refresh; over FORCE_LIMIT per FORCE_WINDOW, refuse it."""
        mono = self._clock.monotonic()
        while self._forced and mono - self._forced[0] >= FORCE_WINDOW:
            self._forced.popleft()
        if len(self._forced) >= FORCE_LIMIT:
            retry = FORCE_WINDOW - (mono - self._forced[0])
            raise on_limit(f"too many caller-triggered refreshes of {self.name}", retry_after=retry)
        self._forced.append(mono)

    def _check_min_ttl(self, min_ttl: float) -> None:
        token = self.token
        if token is not None and min_ttl > token.lifetime:
            raise ValueError(
                f"min_ttl {min_ttl:.0f} exceeds the token lifetime of {token.lifetime:.0f} seconds"
            )

    def _raise_if_needs_authorization(self) -> None:
        reason = self.schedule.needs_authorization
        if reason is not None:
            raise NeedsAuthorization(f"app {self.name} needs authorization: {reason}")
        if self.fleet.outcome_unknown(self.token) and self.servable() is None:
            raise NeedsAuthorization(
                f"app {self.name} needs authorization: {self.last_error or 'grant outcome unknown'}"
            )

    def _servable_or_raise(self, min_ttl: float) -> TokenSet:
        token = self.servable(min_ttl)
        if token is not None:
            return token
        self._raise_if_needs_authorization()
        self._check_min_ttl(min_ttl)
        raise TokenUnavailable(self._unavailable_message(), retry_after=self._retry_in())

    def _unavailable_message(self) -> str:
        if self.last_error:
            return f"no valid token for {self.name}: {self.last_error}"
        return f"no valid token for {self.name}"

    def _retry_in(self) -> float:
        return max(1.0, self.schedule.at - self._clock.monotonic())

    async def _wait_for_refresh(self) -> None:
        if self._stopping:
            return
        # Waits for the refresh (never cancels it: it is shared) or the clock, whichever first.
        await wait_within(self._clock, self._start_refresh(), CALLER_WAIT)

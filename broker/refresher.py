"""One refresher per app: keeps a servable token in memory, refreshes on time, shares via the store.

The refresher depends only on protocols (TokenSource, TokenStore, Clock); it never imports
aiohttp or redis. Serving answers from memory; the store is for sharing and surviving restarts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from dataclasses import replace
from typing import Literal

from broker import policy
from broker.clock import Clock
from broker.errors import (
    NeedsAuthorization,
    PermanentTokenError,
    RateLimited,
    StoreUnavailable,
    TokenEndpointError,
    TokenUnavailable,
    TransientTokenError,
)
from broker.logs import SECRETS, audit, get_logger
from broker.metrics import Metrics
from broker.model import AppSpec, AppState, GrantType, TokenSet
from broker.oauth import TokenSource
from broker.service import AppStatus
from broker.store import TokenStore

log = get_logger(__name__)

# A forced refresh of a token younger than this is answered with the current token.
FORCE_MIN_AGE = 5.0
# At most this many forced refreshes per app per FORCE_WINDOW seconds.
FORCE_LIMIT = 10
FORCE_WINDOW = 60.0
# How long a caller without a servable token waits for a refresh in flight.
CALLER_WAIT = 5.0
# The loop re-reads the wall clock at least this often, so a clock step is noticed.
MAX_SLEEP = 30.0
# How often a replica that lost the lease race looks at the store for the winner's token.
LEASE_POLL = 0.25

LeaseResult = Literal["held", "busy", "alone", "adopted"]


class AppRefresher:
    """Keeps one app's token fresh. `run()` is its loop; `get()` and `force()` serve callers."""

    def __init__(
        self,
        spec: AppSpec,
        source: TokenSource,
        store: TokenStore,
        clock: Clock,
        metrics: Metrics,
        *,
        owner: str,
        rng: random.Random | None = None,
        max_lease_ttl: float = 15.0,
    ) -> None:
        self.spec = spec
        self.source = source
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._owner = owner
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not crypto
        self._max_lease_ttl = max_lease_ttl
        self.token: TokenSet | None = None
        self.state = AppState.REFRESHING
        self.last_refresh_at: float | None = None
        self.last_error: str | None = None
        self.failures = 0
        self._needs_authorization = False
        self._unsynced = False  # our token is newer than what the store has (store was down)
        # Monotonic times: the loop's next attempt, and when the current token stops being
        # valid as measured on this host's monotonic clock (a wall-clock step changes neither).
        self._next_attempt_at = 0.0
        self._mono_expiry = 0.0
        self._in_backoff = False
        self._inflight: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._store_changed = asyncio.Event()
        self._forced: collections.deque[float] = collections.deque()
        self._set_state(AppState.REFRESHING)

    # ---- serving -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The app's configured name."""
        return self.spec.name

    def servable(self, min_ttl: float = 0.0) -> TokenSet | None:
        """The current token if it may be served with `min_ttl` seconds left, else None."""
        token = self.token
        if token is None:
            return None
        # The wall clock may have been stepped since the token arrived; trust the smaller
        # of the two remaining times.
        remaining = min(
            token.expires_at - self._clock.time(), self._mono_expiry - self._clock.monotonic()
        )
        if policy.is_servable(remaining, token.lifetime, self.spec.refresh, min_ttl):
            return token
        return None

    async def get(self, min_ttl: float = 0.0) -> TokenSet:
        """A servable token, refreshing first when none is (and no backoff is running)."""
        token = self.servable(min_ttl)
        if token is not None:
            return token
        self._check_min_ttl(min_ttl)
        if self._needs_authorization:
            raise NeedsAuthorization(f"app {self.name} needs authorization")
        if self._inflight is None and self._in_backoff:
            # During a backoff callers do not trigger extra requests (min_ttl included).
            raise TokenUnavailable(f"no valid token for {self.name}", retry_after=self._retry_in())
        await self._wait_for_refresh()
        return self._servable_or_raise(min_ttl)

    async def force(self) -> TokenSet:
        """Refresh now for a caller whose upstream rejected the token (coalesced, rate-limited)."""
        if self._needs_authorization:
            raise NeedsAuthorization(f"app {self.name} needs authorization")
        token = self.token
        now = self._clock.time()
        if token is not None and now - token.issued_at < FORCE_MIN_AGE and self.servable():
            return token
        if self._inflight is None:
            mono = self._clock.monotonic()
            while self._forced and mono - self._forced[0] >= FORCE_WINDOW:
                self._forced.popleft()
            if len(self._forced) >= FORCE_LIMIT:
                retry = FORCE_WINDOW - (mono - self._forced[0])
                raise RateLimited(f"too many forced refreshes of {self.name}", retry_after=retry)
            self._forced.append(mono)
        await self._wait_for_refresh()
        return self._servable_or_raise(0.0)

    def status(self) -> AppStatus:
        """The app's state as the API shows it."""
        return AppStatus(
            name=self.name,
            state=self.state,
            expires_at=self.token.expires_at if self.token else None,
            last_refresh_at=self.last_refresh_at,
            last_error=self.last_error,
        )

    def _check_min_ttl(self, min_ttl: float) -> None:
        token = self.token
        if token is not None and min_ttl > token.lifetime:
            raise ValueError(
                f"min_ttl {min_ttl:.0f} exceeds the token lifetime of {token.lifetime:.0f} seconds"
            )

    def _servable_or_raise(self, min_ttl: float) -> TokenSet:
        token = self.servable(min_ttl)
        if token is not None:
            return token
        if self._needs_authorization:
            raise NeedsAuthorization(f"app {self.name} needs authorization")
        self._check_min_ttl(min_ttl)
        raise TokenUnavailable(f"no valid token for {self.name}", retry_after=self._retry_in())

    def _retry_in(self) -> float:
        return max(1.0, self._next_attempt_at - self._clock.monotonic())

    async def _wait_for_refresh(self) -> None:
        task = self._start_refresh()
        timer = asyncio.ensure_future(self._clock.sleep(CALLER_WAIT))
        try:
            # Waits for the refresh (never cancels it) or the injected clock, whichever first.
            await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()

    # ---- the loop ------------------------------------------------------------------------

    async def run(self, *, fresh: bool = False) -> None:
        """Warm start from the store (unless `fresh`), then refresh whenever due until cancelled.

        `fresh` is for an app whose credentials or scopes just changed: a stored token was got
        with the old settings, so a new one is fetched at once (after any stored one is known,
        so compare-and-set has the right version).
        """
        await self._load_from_store()
        if fresh and self.spec.grant_type is GrantType.CLIENT_CREDENTIALS:
            self._next_attempt_at = 0.0
        if self.token is None and self.spec.grant_type is GrantType.AUTHORIZATION_CODE:
            self._enter_needs_authorization("no token set stored; run token-broker authorize")
        try:
            while True:
                if self._store_changed.is_set():
                    self._store_changed.clear()
                    await self._load_from_store()
                if self._unsynced:
                    await self._sync_to_store()
                delay = self._next_attempt_at - self._clock.monotonic()
                if self._needs_authorization:
                    await self._sleep_or_wake(MAX_SLEEP)
                elif delay > 0:
                    await self._sleep_or_wake(min(delay, MAX_SLEEP))
                else:
                    await asyncio.shield(self._start_refresh())
        finally:
            if self._inflight is not None:
                self._inflight.cancel()

    def notify_store_changed(self) -> None:
        """Another replica (or `authorize`) wrote a token set: pick it up on the next turn."""
        self._store_changed.set()
        self._wake.set()

    def wake(self) -> None:
        """Re-evaluate now (e.g. the store came back and we have a token to write back)."""
        self._wake.set()

    async def _sleep_or_wake(self, seconds: float) -> None:
        self._wake.clear()
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._refresh(), name=f"refresh-{self.name}")
            self._inflight.add_done_callback(self._refresh_done)
        return self._inflight

    def _refresh_done(self, _: asyncio.Task[None]) -> None:
        self._inflight = None
        self._wake.set()

    # ---- one refresh ---------------------------------------------------------------------

    async def _refresh(self) -> None:
        """One refresh attempt; records the outcome and schedules the next attempt."""
        self._set_state(AppState.REFRESHING)
        started = self._clock.monotonic()
        try:
            fetched = await self._refresh_or_adopt()
        except TokenEndpointError as exc:
            self._record_failure(exc, started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not kill the loop: count it as transient
            log.exception("refresh.unexpected_error", app=self.name)
            self._record_failure(TransientTokenError(f"unexpected {type(exc).__name__}"), started)
        else:
            if fetched:
                self._record_success(started)
        finally:
            self._set_state(self._steady_state())

    async def _refresh_or_adopt(self) -> bool:
        """Adopt a newer stored token, or take the lease, fetch, store. True when we fetched."""
        if await self._adopt_fresher_from_store():
            return False
        lease = await self._acquire_lease()
        if lease == "busy":
            lease = await self._await_other_replica()
            if lease == "adopted":
                return False
            if lease == "busy":
                self._schedule_retry_soon()
                return False
        keeper = asyncio.create_task(self._keep_lease()) if lease == "held" else None
        try:
            if lease == "held" and await self._adopt_fresher_from_store():
                # Double-checked: another replica stored a token between our look and our lease.
                return False
            token = await self._fetch()
            await self._persist(token)
        finally:
            if keeper is not None:
                keeper.cancel()
            if lease == "held":
                await self._release_lease()
        return True

    async def _keep_lease(self) -> None:
        """Renew our lease while our request is in flight, so a slow (but live) holder keeps it.

        Only a dead holder stops renewing: then its lease lapses and another replica takes over.
        A refresh token must never be spent by two replicas, so a live holder is never overtaken.
        """
        while True:
            ttl = self.lease_ttl()
            await self._clock.sleep(ttl / 3)
            try:
                if not await self._store.renew_lease(self.name, self._owner, ttl):
                    self._metrics.lease_total.labels(app=self.name, outcome="lost").inc()
                    log.warning("lease.lost", app=self.name)
                    return
            except StoreUnavailable:
                return

    async def _fetch(self) -> TokenSet:
        if self.spec.grant_type is GrantType.AUTHORIZATION_CODE:
            current = self.token
            if current is None or not current.refresh_token:
                raise _NoGrant("no refresh token; run token-broker authorize")
            try:
                fresh = await self.source.fetch(refresh_token=current.refresh_token)
            except PermanentTokenError as exc:
                if exc.is_invalid_grant and await self._adopt_fresher_from_store(any_newer=True):
                    # Another replica rotated the refresh token first: not a dead grant.
                    raise _AdoptedInstead("adopted the token another replica stored") from exc
                raise
            if not fresh.refresh_token:
                fresh = replace(fresh, refresh_token=current.refresh_token)
            return fresh
        return await self.source.fetch()

    async def _persist(self, token: TokenSet) -> None:
        """Store `token` (compare-and-set) before serving it: a rotated refresh token survives."""
        base = self.token.version if self.token is not None else 0
        try:
            stored = await self._save_cas(token, base)
        except StoreUnavailable:
            self._unsynced = True
            self._adopt(token, source="refresh")
            return
        self._unsynced = False
        self._adopt(stored, source="refresh")

    async def _save_cas(self, token: TokenSet, base: int) -> TokenSet:
        """Save over version `base`; when someone wrote since, keep whichever token is newer."""
        for _ in range(5):
            version = await self._store.save(self.name, token, base)
            if version is not None:
                return replace(token, version=version)
            current = await self._store.load(self.name)
            if current is not None and current.expires_at >= token.expires_at:
                return current
            base = current.version if current is not None else 0
        raise StoreUnavailable("compare-and-set kept conflicting")

    def lease_ttl(self) -> float:
        """How long our lease lasts: half the time our token stays servable, within [1 s, max].

        A replica that dies holding the lease must leave the others time to take over before
        the current token stops being served.
        """
        token = self.token
        if token is None:
            return min(self._max_lease_ttl, 5.0)
        left = policy.serve_deadline(token, self.spec.refresh) - self._clock.time()
        return max(1.0, min(self._max_lease_ttl, left / 2))

    async def _acquire_lease(self) -> LeaseResult:
        try:
            held = await self._store.acquire_lease(self.name, self._owner, self.lease_ttl())
        except StoreUnavailable:
            return "alone"
        self._metrics.lease_total.labels(
            app=self.name, outcome="acquired" if held else "busy"
        ).inc()
        return "held" if held else "busy"

    async def _release_lease(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._store.release_lease(self.name, self._owner)

    async def _await_other_replica(self) -> LeaseResult:
        """Another replica holds the lease: adopt its token, or take over when its lease lapses."""
        deadline = self._clock.monotonic() + self._max_lease_ttl
        while self._clock.monotonic() < deadline:
            await self._clock.sleep(LEASE_POLL)
            if await self._adopt_fresher_from_store():
                return "adopted"
            lease = await self._acquire_lease()
            if lease != "busy":
                if lease == "held":
                    log.info("lease.taken_over", app=self.name)
                return lease
        return "busy"

    async def _adopt_fresher_from_store(self, *, any_newer: bool = False) -> bool:
        """Adopt the stored token if it is newer than ours and (unless `any_newer`) not yet due."""
        try:
            stored = await self._store.load(self.name)
        except StoreUnavailable:
            return False
        if stored is None or not self._is_newer(stored):
            return False
        if not any_newer and self._clock.time() >= self._due(stored):
            return False
        self._adopt(stored, source="store")
        return True

    async def _load_from_store(self) -> None:
        try:
            stored = await self._store.load(self.name)
        except StoreUnavailable:
            return
        if stored is not None and self._is_newer(stored):
            self._adopt(stored, source="store")
            self._set_state(self._steady_state())
        elif stored is not None and self.token is not None and stored.version > self.token.version:
            # Same or older token under a newer version (a write-back); track the version for CAS.
            self.token = replace(self.token, version=stored.version)

    async def _sync_to_store(self) -> None:
        """Write our newest token back after a store outage, never over a newer one."""
        token = self.token
        if token is None:
            return
        try:
            current = await self._store.load(self.name)
            if current is not None and current.expires_at >= token.expires_at:
                self._unsynced = False
                if self._is_newer(current):
                    self._adopt(current, source="store")
                return
            stored = await self._save_cas(token, current.version if current else 0)
        except StoreUnavailable:
            return
        self._unsynced = False
        if stored.access_token == token.access_token:
            self.token = stored
        elif self._is_newer(stored):
            self._adopt(stored, source="store")
        log.info("store.caught_up", app=self.name)

    def _is_newer(self, candidate: TokenSet) -> bool:
        current = self.token
        if current is None:
            return candidate.expires_at > self._clock.time()
        return candidate.expires_at > current.expires_at or (
            candidate.expires_at == current.expires_at
            and candidate.access_token != current.access_token
            and candidate.issued_at > current.issued_at
        )

    def _due(self, token: TokenSet) -> float:
        return policy.fleet_refresh_due(token, self.spec.refresh, self._rng.random())

    def _adopt(self, token: TokenSet, *, source: str) -> None:
        previous = self.token
        self.token = token
        SECRETS.add(token.access_token, token.refresh_token)
        if previous is not None and previous.access_token != token.access_token:
            SECRETS.discard([previous.access_token])
            if previous.refresh_token != token.refresh_token:
                SECRETS.discard([previous.refresh_token])
        wall, mono = self._clock.time(), self._clock.monotonic()
        self._mono_expiry = mono + (token.expires_at - wall)
        self._next_attempt_at = mono + (self._due(token) - wall)
        self._in_backoff = False
        self._metrics.token_expiry.labels(app=self.name).set(token.expires_at)
        if self._needs_authorization and token.refresh_token:
            self._needs_authorization = False
        if source == "store":
            log.info(
                "token.loaded",
                app=self.name,
                token_fingerprint=token.fingerprint,
                expires_at=round(token.expires_at, 3),
            )

    # ---- outcomes ------------------------------------------------------------------------

    def _record_success(self, started: float) -> None:
        token = self.token
        assert token is not None  # _persist adopted it
        self.failures = 0
        self.last_error = None
        self.last_refresh_at = self._clock.time()
        self._metrics.refresh_total.labels(app=self.name, outcome="success").inc()
        self._metrics.refresh_duration.labels(app=self.name).observe(
            self._clock.monotonic() - started
        )
        self._metrics.refresh_failures_consecutive.labels(app=self.name).set(0)
        audit(
            log,
            "token.refreshed",
            app=self.name,
            token_fingerprint=token.fingerprint,
            expires_at=round(token.expires_at, 3),
            lifetime=round(token.lifetime, 3),
        )

    def _record_failure(self, exc: TokenEndpointError, started: float) -> None:
        if isinstance(exc, _AdoptedInstead):
            return
        permanent = isinstance(exc, PermanentTokenError | _NoGrant)
        self.failures += 1
        self.last_error = _describe(exc)
        outcome = "permanent_error" if permanent else "transient_error"
        self._metrics.refresh_total.labels(app=self.name, outcome=outcome).inc()
        self._metrics.refresh_duration.labels(app=self.name).observe(
            self._clock.monotonic() - started
        )
        self._metrics.refresh_failures_consecutive.labels(app=self.name).set(self.failures)
        retry_after = exc.retry_after if isinstance(exc, TransientTokenError) else None
        now = self._clock.time()
        delay = policy.retry_delay(
            attempt=self.failures,
            permanent=permanent,
            retry_after=retry_after,
            token=self.token,
            now=now,
            policy=self.spec.refresh,
            jitter_sample=self._rng.random(),
        )
        self._next_attempt_at = self._clock.monotonic() + delay
        self._in_backoff = True
        if self.spec.grant_type is GrantType.AUTHORIZATION_CODE and (
            isinstance(exc, _NoGrant)
            or (isinstance(exc, PermanentTokenError) and exc.is_invalid_grant)
        ):
            self._enter_needs_authorization(self.last_error)
        audit(
            log,
            "token.refresh_failed",
            app=self.name,
            error=self.last_error,
            permanent=permanent,
            status=exc.status,
            consecutive_failures=self.failures,
            retry_in=round(delay, 3),
        )

    def _schedule_retry_soon(self) -> None:
        self._next_attempt_at = self._clock.monotonic() + LEASE_POLL

    def _enter_needs_authorization(self, reason: str | None) -> None:
        if not self._needs_authorization:
            self._needs_authorization = True
            audit(log, "app.needs_authorization", app=self.name, reason=reason)
        self._set_state(AppState.NEEDS_AUTHORIZATION)

    def _steady_state(self) -> AppState:
        if self._needs_authorization:
            return AppState.NEEDS_AUTHORIZATION
        if self.failures:
            return AppState.FAILING
        return AppState.FRESH if self.token is not None else AppState.REFRESHING

    def _set_state(self, state: AppState) -> None:
        if state is not self.state or state is AppState.REFRESHING:
            self.state = state
            self._metrics.set_app_state(self.name, state)


class _NoGrant(TokenEndpointError):
    """Internal: there is nothing to refresh with (authorization_code app without refresh token)."""


class _AdoptedInstead(TokenEndpointError):
    """Internal: invalid_grant because another replica rotated first; its token was adopted."""


def _describe(exc: TokenEndpointError) -> str:
    """A short, secret-free description for `last_error` and logs."""
    kind = "permanent" if isinstance(exc, PermanentTokenError | _NoGrant) else "transient"
    return f"{kind}: {SECRETS.scrub(str(exc))[:200]}"

"""One refresher per app: keeps a servable token in memory, refreshes on time, serves callers.

The refresher schedules and serves; what may be done with the store and the token endpoint is
the fleet protocol's (broker/fleet.py). It depends only on protocols (TokenSource, TokenStore,
Clock) and never imports aiohttp or redis.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from broker import policy, tracing
from broker.clock import Clock, Wake, wait_within
from broker.errors import (
    NeedsAuthorization,
    PermanentTokenError,
    RateLimited,
    StoreUnavailable,
    TokenEndpointError,
    TokenUnavailable,
    TransientTokenError,
)
from broker.fleet import (
    Adopted,
    Blocked,
    Busy,
    Deferred,
    Fetched,
    FleetProtocol,
    NoGrant,
    Outcome,
    OutcomeUnknown,
    OverBudget,
    ReuseDetected,
    Timing,
)
from broker.fleetclock import FleetClock
from broker.logs import SECRETS, audit, get_logger
from broker.metrics import Metrics
from broker.model import AppSpec, AppState, GrantType, TokenSet
from broker.oauth import TokenSource
from broker.service import AppStatus
from broker.store import (
    LEASE,
    REFUSED,
    RELEASE,
    Notice,
    Refusal,
    TokenStore,
    bound_name,
    client_binding,
)

log = get_logger(__name__)

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
# The loop wakes at least this often: it re-reads the wall clock and checks the store.
MAX_SLEEP = 30.0


# How long a read of the store waits to measure the fleet clock first, while it never was (the
# store did not answer at start): the store that answers the read answers `TIME` too.
CLOCK_FIRST_WAIT = 3.0

# Shortest wait before trying again after the lease was busy or lost.
LEASE_RETRY = 0.25
# How often a refresh blocked on the store is tried again (a reconnect also wakes it).
BLOCKED_RETRY = 5.0
# While another replica holds the lease (which covers a whole spend, about 12 s), the store is
# looked at again at least this often: the holder's notice usually comes first, but a
# subscription still reconnecting after an outage misses it.
BUSY_POLL = 1.0


def drain_bound(timing: Timing, *, spends: bool) -> float:
    """How long stopping waits at most for one app's refresh in flight: its longest lease
    (the long objection window, one request, a commit and the margin), plus, for a grant that
    spends refresh tokens, the read timeout to which a sent request is awaited past its lease.

    With the defaults: 6 + 10 + 1 + 0.5 + 120 = 137.5 s. Stopping sends nothing new, so in
    practice it is the read timeout of a request already sent, and its commit.
    """
    lease = (timing.objection_idle if spends else 0.0) + timing.max_attempt
    lease += timing.persist + timing.margin
    return lease + (timing.read_timeout if spends else 0.0)


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
        timing: Timing | None = None,
        client_id: str | None = None,
        host_clock: Clock | None = None,
    ) -> None:
        self.spec = spec
        # The store knows the app's set by its name and client binding (issue 20, M6): a set
        # of another client, server, grant or scopes is never adopted, blocked on or written
        # over. `client_id` is the value in use (from client_id_file, when the app uses one).
        self.binding = client_binding(spec, client_id if client_id is not None else spec.client_id)
        # Set by a config reload that changed the binding: what changed, for the 409.
        self.binding_changed: str | None = None
        self.source = source
        self._store = store
        self._clock = clock
        # This pod's own clock, when `clock` keeps another frame (the fleet's, the store's
        # clock): a token is served only while both say it may be (issue 20, M3).
        self._host = host_clock if host_clock is not None else clock
        self._metrics = metrics
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not crypto
        self.fleet = FleetProtocol(
            spec.name,
            store,
            clock,
            owner=owner,
            spends_refresh_tokens=spec.grant_type is GrantType.AUTHORIZATION_CODE,
            current=lambda: self.token,
            adopt=lambda token: self._adopt(token, source="store"),
            reuse_grace=spec.refresh.reuse_grace,
            timing=replace(
                timing if timing is not None else Timing(),
                read_timeout=spec.refresh.read_timeout,
            ),
            on_lease=lambda outcome: metrics.lease_total.labels(
                app=spec.name, outcome=outcome
            ).inc(),
            budget_per_minute=spec.max_token_requests_per_minute,
            store_name=bound_name(spec.name, self.binding),
        )
        self.token: TokenSet | None = None
        self.state = AppState.REFRESHING
        self.last_refresh_at: float | None = None
        self.last_error: str | None = None
        self.failures = 0
        self._needs_authorization: str | None = None
        self._blocked: str | None = None
        self._unsynced = False  # our set may be newer than the store's: write it back
        self._dirty = True  # the store may have changed: look before the next decision
        # The store held our set when we last read it, committed it, or heard a `token` notice
        # carrying it, and no notice since says otherwise: the next attempt asks for the lease
        # without reading first (the holder reads under the lease anyway). Every replica read
        # before each attempt, most of them only to be told the lease was busy.
        self._view_known = False
        self._last_sync = float("-inf")
        # Monotonic times: the next attempt, and when the current token stops being valid as
        # measured on this host's monotonic clock (a wall-clock step changes neither; a step
        # that shortens the token's life lowers the latter, see `remaining`).
        self._next_attempt_at = 0.0
        self._attempting = False
        self._attempt_started = 0.0  # the monotonic start of the attempt in flight
        # Another replica was granted the lease (we heard its `lease` notice): no attempt of
        # ours before this, unless its commit or its release is heard first. Without it every
        # replica due at the fleet's due time asked for the lease, and lost it, one by one.
        self._lease_wait_until = float("-inf")
        self._mono_expiry = 0.0
        self._stagger = 0.0
        self._in_backoff = False
        self._permanent = False
        self._stopping = False
        self._announced_unknown: set[str] = set()
        # The lineage whose refresh token the server refused as reused: its sets are dead, and
        # adopting one (the other presentation's commit) does not clear needs_authorization.
        self._reused_lineage = 0
        self._blocked_logged: str | None = None
        self._over_budget = False
        self._ignore_shared_failure = False
        self._inflight: asyncio.Task[None] | None = None
        self._wake = Wake()
        self._forced: collections.deque[float] = collections.deque()
        # The access token an upstream refused (its fingerprint): due now while still held.
        self._refused_fp: str | None = None
        self._successor_waiters: set[asyncio.Future[None]] = set()
        self._listeners: list[Callable[[TokenSet], None]] = []
        self._vetoes: set[asyncio.Future[None]] = set()
        self._set_state(AppState.REFRESHING)

    # ---- serving -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The app's configured name."""
        return self.spec.name

    @property
    def grant_spends(self) -> bool:
        """True for a grant whose refresh token is spent by a refresh."""
        return self.spec.grant_type is GrantType.AUTHORIZATION_CODE

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
        if self._inflight is None and (self._in_backoff or self._blocked or self._stopping):
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
            self._metrics.token_refused_total.labels(app=self.name, outcome="unrecorded").inc()
            return await self.force()
        self._metrics.token_refused_total.labels(app=self.name, outcome=answer.value).inc()
        if answer is Refusal.LIMITED:
            raise RateLimited(
                f"an access token of {self.name} was purged less than "
                f"{PURGE_INTERVAL:.0f} seconds ago",
                retry_after=PURGE_INTERVAL,
            )
        if answer is Refusal.RECORDED:
            audit(
                log, "token.refused", level="warning", app=self.name, token_fingerprint=refused_fp
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
        if not self._in_backoff:
            self._next_attempt_at = min(self._next_attempt_at, self._clock.monotonic())
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
            and self._needs_authorization is None
            and not self._in_backoff
        ):
            left = deadline - self._clock.monotonic()
            if left <= 0:
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._successor_waiters.add(waiter)
            timer = asyncio.ensure_future(self._clock.sleep(left))
            try:
                await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
                waiter.cancel()
                self._successor_waiters.discard(waiter)

    def _wake_successor_waiters(self) -> None:
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
        if self._needs_authorization is not None or self._stopping:
            return None
        mono = self._clock.monotonic()
        if self._attempting:
            return self._clock.time() - (mono - self._attempt_started)
        return self._clock.time() + max(0.0, self._next_attempt_at - mono)

    def _check_min_ttl(self, min_ttl: float) -> None:
        token = self.token
        if token is not None and min_ttl > token.lifetime:
            raise ValueError(
                f"min_ttl {min_ttl:.0f} exceeds the token lifetime of {token.lifetime:.0f} seconds"
            )

    def _raise_if_needs_authorization(self) -> None:
        if self._needs_authorization is not None:
            raise NeedsAuthorization(
                f"app {self.name} needs authorization: {self._needs_authorization}"
            )
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
        return max(1.0, self._next_attempt_at - self._clock.monotonic())

    async def _wait_for_refresh(self) -> None:
        if self._stopping:
            return
        # Waits for the refresh (never cancels it: it is shared) or the clock, whichever first.
        await wait_within(self._clock, self._start_refresh(), CALLER_WAIT)

    # ---- the loop ------------------------------------------------------------------------

    async def run(self, *, fresh: bool = False) -> None:
        """Warm start from the store, then refresh whenever due until stopped or cancelled.

        `fresh` is for an app whose credentials or scopes just changed: a stored token was got
        with the old settings, so a client-credentials app fetches a new one at once.
        """
        read = await self._sync() if self._dirty else True
        if fresh and not self.grant_spends:
            self._next_attempt_at = 0.0
        if self.token is None and self.grant_spends and read:
            # Only when the store says so: a store that is down, or a set under a key this
            # replica lacks, blocks refreshing instead (503), and asks no one to authorize.
            self._enter_needs_authorization(self._no_stored_set())
        while not self._stopping:
            if self._dirty or self._unsynced or self._sync_overdue():
                await self._sync()
            delay = max(self._next_attempt_at, self._lease_wait_until) - self._clock.monotonic()
            if self._needs_authorization is not None:
                await self._sleep_or_wake(MAX_SLEEP)
            elif delay > 0:
                await self._sleep_or_wake(min(delay, MAX_SLEEP))
            elif not self._stopping:
                # Shielded: cancelling the loop must not cancel a spend in flight.
                await asyncio.shield(self._start_refresh())

    def _no_stored_set(self) -> str:
        """Why there is nothing to serve for an authorization-code app, and what to do."""
        if self.binding_changed:
            return (
                f"the app's client binding changed ({self.binding_changed}); the stored token "
                "set belongs to the old binding and is not used: run token-broker authorize"
            )
        return (
            "no token set stored for this client binding (token URL, client id, grant, "
            "scopes, audience); run token-broker authorize"
        )

    @property
    def store_name(self) -> str:
        """The name the store knows this app's set by (`app@binding`)."""
        return self.fleet.key

    async def stop(self, *, write_back: bool = False) -> None:
        """Stop scheduling refreshes and let the one in flight finish and persist.

        A refresh token not yet marked sent is not sent any more: its announced spend ends as
        aborted. One already sent is awaited to its answer (at most the read timeout) and the
        answer committed (H5). `write_back` (the process exits: SIGTERM): a set the store could
        not take is written back, trying again until it is stored (a config reload needs no
        wait: the new refresher takes the set over). The caller bounds the wait
        (`drain_bound()`).
        """
        self._stopping = True
        self.fleet.stop()
        self._wake.set()
        inflight = self._inflight
        if inflight is not None:
            await asyncio.wait({inflight})
        if write_back:
            await self._write_back_before_exit()

    async def _write_back_before_exit(self) -> None:
        """Store the set this replica holds when the store may be older, retrying until it
        is stored (the caller bounds the wait: the drain's bound).

        The answer to our last refresh may be the only copy of a rotated set (its commit
        failed: the store was unreachable). Exiting with it loses the grant, so a drain waits
        to write it back as it waits for the answer itself. So with an abort the store did not
        take (a spend marked sent but never sent, its `mark_sent` answer lost): only this
        process can end that record, and a restarted one has another owner name (swarm seed
        3349: SIGTERM in an outage left the `sent` record for good).
        """
        while self.grant_spends and (
            (self._unsynced and self.token is not None) or self.fleet.abort_unwritten
        ):
            if await self._sync():
                return
            await self._clock.sleep(BLOCKED_RETRY / 5)

    def drain_bound(self) -> float:
        """The longest `stop()` may wait for the refresh in flight (see `drain_bound`)."""
        return drain_bound(self.fleet.timing, spends=self.grant_spends)

    def prime(self, stored: TokenSet) -> None:
        """Start from `stored`, read for many apps at once: the loop's first look is done."""
        self.fleet.note_rank(stored.rank)
        if self.token is None or stored.rank > self.token.rank:
            self._adopt(stored, source="store")
        self._dirty = False
        self._last_sync = self._clock.monotonic()

    def carry_over(self, previous: AppRefresher, *, same_grant: bool) -> None:
        """After a config reload replaced `previous` (stopped): keep what it knew of spends
        (see FleetProtocol.carry_over) and, for the same grant, that its lineage is dead."""
        self.fleet.carry_over(previous.fleet, same_grant=same_grant)
        self._announced_unknown |= previous._announced_unknown
        if same_grant:
            self._reused_lineage = max(self._reused_lineage, previous._reused_lineage)

    def take_over(self, retired: AppRefresher) -> None:
        """Keep the set the refresher this one replaces held (a config reload): it may be the
        only copy of a rotated set that the store could not take yet, so write it back.
        (A client-credentials app spends nothing: a new token is as good.)"""
        token = retired.token
        if (
            self.grant_spends
            and token is not None
            and (self.token is None or token.rank > self.token.rank)
        ):
            self.prime(token)
            self._dirty = True
            self._unsynced = True
        if (
            token is not None
            and self.token is not None
            and self.token.access_token == token.access_token
        ):
            # The same token: keep the serving deadline the retired refresher counted on the
            # monotonic clock. Re-derived from the wall clocks now, it would stretch by any
            # step back of both since its adoption (M3; swarm seed 6678: a pod 93 s behind, a
            # Redis stepped back, a reload, and a token served 20 s past its expiry).
            self._mono_expiry = min(self._mono_expiry, retired._mono_expiry)

    def notify_store_lost(self) -> None:
        """The store connection dropped: the store may have forgotten (see the fleet's
        `note_connection_lost`)."""
        self.fleet.note_connection_lost()

    def notify_store_changed(self, *, reconnected: bool = False) -> None:
        """The store may hold something new (a reconnect): look on the next turn.

        With a refresh token of ours on the wire, also veto at once any spend of it that was
        announced while we were away (the loop itself waits for the answer). After a
        reconnect (`reconnected`: maybe to another primary) the next look also ends again our
        spends that ended without effect.
        """
        if reconnected:
            self.fleet.resend_aborts()
        self._dirty = True
        self._view_known = False
        self._wake.set()
        if self.fleet.in_flight is not None:
            self._spawn_veto(self.fleet.veto_in_flight())

    def _spawn_veto(self, veto: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(veto)
        self._vetoes.add(task)
        task.add_done_callback(self._vetoes.discard)

    def on_notice(self, notice: Notice) -> None:
        """A change published by a replica: act only when it tells us something new."""
        if self.fleet.must_veto(notice):
            self._spawn_veto(self.fleet.veto(notice))
        self.fleet.on_notice(notice)
        if notice.kind == REFUSED:
            if notice.access_fp is not None:
                self.purge(notice.access_fp)
            return
        if notice.kind == LEASE and notice.owner != self.fleet.owner:
            # Another replica refreshes now: wait for its notice (or its lease's end) rather
            # than ask for the lease too, but not past what our own token can still serve (a
            # lost notice then costs one look at the store, as a busy lease did).
            wait = min(notice.ttl, max(BUSY_POLL, self._servable_left() / 2))
            self._lease_wait_until = self._clock.monotonic() + wait
            self._view_known = False  # its outcome may be missed: read before our attempt
            return
        if notice.kind in (RELEASE, "token") and self._lease_wait_until > float("-inf"):
            # The holder is done: whatever is due now is due.
            self._lease_wait_until = float("-inf")
            self._wake.set()
        if notice.kind == RELEASE:
            return
        token = self.token
        if notice.kind == "token":
            carried = notice.token
            if (
                carried is not None
                and self._inflight is None
                and (token is None or carried.rank > token.rank)
                and not self._clock_unmeasured()  # (else read it, measuring the clock first)
            ):
                # The notice carries the committed set: adopt it as a read would, without one.
                # (With a refresh in flight the loop reads the store after it, as before.)
                self._adopt(carried, source="store")
                self._view_known = True
                # It also says what the store held just now, as the periodic look would: that
                # look is due MAX_SLEEP after it (one read per replica per 30 s was, on short
                # tokens, most of what a refresh cost the fleet).
                self._last_sync = self._clock.monotonic()
            elif token is None or notice.rank != token.rank:
                self.notify_store_changed()
        elif notice.kind == "spend" and token is not None and token.rank > notice.rank:
            # Someone is about to spend an older set than ours: write ours back now.
            self.notify_store_changed()

    def credentials_changed(self) -> None:
        """A secret or key file changed: a permanent failure may be fixed, so try again now.

        This replica then also ignores the fleet's shared backoff once: the fix is new here.
        """
        if self._permanent or self.failures:
            self._next_attempt_at = 0.0
            self._in_backoff = False
            self._ignore_shared_failure = True
            self._wake.set()

    def wake(self) -> None:
        """Re-evaluate now."""
        self._wake.set()

    def _sync_overdue(self) -> bool:
        return self._clock.monotonic() - self._last_sync >= MAX_SLEEP

    async def _sync(self) -> bool:
        """Adopt what the store has that is newer; write ours back where the store is older.

        False when the store could not be read (or its set not decrypted).
        """
        self._dirty = False
        self._last_sync = self._clock.monotonic()
        await self._measure_clock_first()
        self._view_known = True  # (before the read: a notice heard meanwhile may undo it)
        try:
            await self.fleet.sync()
        except StoreUnavailable:
            self._view_known = False
            return False
        self._unsynced = False
        return True

    def _clock_unmeasured(self) -> bool:
        """True while the fleet clock never measured its offset to the store's."""
        return isinstance(self._clock, FleetClock) and not self._clock.measured

    async def _measure_clock_first(self) -> None:
        """Measure the fleet clock before reading a set from the store, while it never was.

        A pod that started while the store was down keeps time on its own clock, and an
        expiry read from the store is in the store's frame: a pod whose clock is behind would
        serve the set past its true expiry (swarm seed 516: 26 s behind, served 18 s late)
        until its next measuring round, up to 5 s after the store came back.
        """
        if self._clock_unmeasured():
            assert isinstance(self._clock, FleetClock)
            await self._clock.measure_within(self._store, CLOCK_FIRST_WAIT)

    async def _sleep_or_wake(self, seconds: float) -> None:
        self._wake.clear()
        if self._dirty or self._stopping:
            return
        await self._wake.sleep(self._clock, seconds)

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._refresh(), name=f"refresh-{self.name}")
            self._inflight.add_done_callback(self._refresh_done)
        return self._inflight

    def _refresh_done(self, _: asyncio.Task[None]) -> None:
        self._inflight = None
        self._wake.set()
        self._wake_successor_waiters()

    # ---- one refresh ---------------------------------------------------------------------

    async def _refresh(self) -> None:
        """One refresh attempt; records the outcome and schedules the next attempt."""
        started = self._attempt_started = self._clock.monotonic()
        self._attempting = True
        self._set_state(AppState.REFRESHING)
        ignore_shared_failure, self._ignore_shared_failure = self._ignore_shared_failure, False
        await self._measure_clock_first()
        with tracing.span(
            "token_broker.refresh", app=self.name, grant_type=str(self.spec.grant_type)
        ) as span:
            try:
                read_first, self._view_known = not self._view_known, False
                outcome = await self.fleet.refresh(
                    self._fetch,
                    is_due=self._is_due,
                    servable_left=self._servable_left(),
                    ignore_shared_failure=ignore_shared_failure,
                    read_first=read_first,
                )
            except TokenEndpointError as exc:
                permanent = isinstance(exc, PermanentTokenError | NoGrant)
                span.set("outcome", "permanent_error" if permanent else "transient_error")
                span.fail(type(exc).__name__)
                await self._record_failure(exc, started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not kill the loop: count it as transient
                span.fail(type(exc).__name__)
                log.exception("refresh.unexpected_error", app=self.name)
                await self._record_failure(
                    TransientTokenError(f"unexpected {type(exc).__name__}"), started
                )
            else:
                span.set("outcome", type(outcome).__name__)
                self._record_outcome(outcome, started)
            finally:
                self._attempting = False
                self._set_state(self._steady_state())
                span.set("state", str(self.state))

    async def _fetch(self, refresh_token: str | None) -> TokenSet:
        if refresh_token is not None:
            # A DPoP-bound refresh token is proved with the key its set is bound to.
            token = self.token
            bound = token.dpop_jkt if token and token.refresh_token == refresh_token else None
            return await self.source.fetch(refresh_token=refresh_token, dpop_jkt=bound)
        return await self.source.fetch()

    def _is_due(self, token: TokenSet) -> bool:
        if token.fingerprint == self._refused_fp:
            return True  # refused upstream: due now, whatever its expiry says
        stagger = self._stagger if self.token is token else self._rng.random()
        return self._clock.time() >= policy.fleet_refresh_due(token, self.spec.refresh, stagger)

    def _adopt(self, token: TokenSet, *, source: str, sent_mono: float | None = None) -> None:
        previous = self.token
        self.token = token
        SECRETS.add(token.access_token, token.refresh_token)
        if previous is not None and previous.access_token != token.access_token:
            SECRETS.discard([previous.access_token])
            if previous.refresh_token != token.refresh_token:
                SECRETS.discard([previous.refresh_token])
        wall, mono = self._clock.time(), self._clock.monotonic()
        # The later of the fleet's and this pod's clocks: the shorter life (M3).
        self._mono_expiry = mono + (token.expires_at - max(wall, self._host.time()))
        if sent_mono is not None:
            # Our own request: its lifetime is also counted on our monotonic clock from sending.
            self._mono_expiry = min(self._mono_expiry, sent_mono + token.lifetime)
        # The due time is the fleet's (derived from the token); the stagger is this replica's.
        self._stagger = self._rng.random()
        due = policy.fleet_refresh_due(token, self.spec.refresh, self._stagger)
        self._next_attempt_at = mono + (due - wall)
        if token.fingerprint == self._refused_fp:
            self._next_attempt_at = mono  # a refused token (read back from the store)
        self._in_backoff = False
        self._permanent = False
        self._blocked = None
        self.fleet.forget_spent(token)
        self._metrics.token_expiry.labels(app=self.name).set(token.expires_at)
        if (
            token.refresh_token
            and (previous is None or token.rank > previous.rank)
            and token.lineage > self._reused_lineage
        ):
            self._needs_authorization = None
        if source == "store":
            self.failures = 0
            self.last_error = None
            self._metrics.refresh_blocked.labels(app=self.name).set(0)
            log.info(
                "token.loaded",
                app=self.name,
                token_fingerprint=token.fingerprint,
                generation=token.generation,
                expires_at=round(token.expires_at, 3),
            )
        self._metrics.set_next_refresh(self.name, self.next_refresh_at())
        for listener in self._listeners:
            listener(token)
        self._wake_successor_waiters()

    # ---- outcomes ------------------------------------------------------------------------

    def _record_outcome(self, outcome: Outcome, started: float) -> None:
        mono = self._clock.monotonic()
        if isinstance(outcome, Fetched):
            self._adopt(outcome.token, source="refresh", sent_mono=outcome.sent_mono)
            self._unsynced = not outcome.persisted
            self._view_known = outcome.persisted
            self._record_success(started)
        elif isinstance(outcome, Adopted):
            pass  # adopted by the protocol already
        elif isinstance(outcome, Busy):
            # Another replica is refreshing: its notice wakes us; else look again soon.
            self._next_attempt_at = mono + max(LEASE_RETRY, min(outcome.wait, BUSY_POLL))
        elif isinstance(outcome, Deferred):
            self._defer(outcome)
        elif isinstance(outcome, OverBudget):
            self._next_attempt_at = mono + max(LEASE_RETRY, outcome.retry_after)
            self._in_backoff = True
            self._metrics.budget_refusals.labels(app=self.name).inc()
            if not self._over_budget:
                self._over_budget = True
                log.warning(
                    "refresh.over_budget",
                    app=self.name,
                    limit_per_minute=self.spec.max_token_requests_per_minute,
                    retry_in=round(outcome.retry_after, 3),
                )
        elif isinstance(outcome, ReuseDetected):
            self._record_reuse(outcome, started)
        elif isinstance(outcome, Blocked):
            self._blocked = outcome.reason
            self.last_error = f"refresh blocked: {outcome.reason}"
            # Soon once nothing is servable, to serve again as soon as the store is back; an
            # unreadable set is not fixed by retrying (its replacement's notice wakes us).
            retry = max(LEASE_RETRY, self._servable_left())
            if outcome.unreadable:
                retry = BLOCKED_RETRY
            self._next_attempt_at = mono + min(BLOCKED_RETRY, retry)
            self._metrics.refresh_blocked.labels(app=self.name).set(1)
            if self._blocked_logged != outcome.reason:
                log.warning("refresh.blocked", app=self.name, reason=outcome.reason)
        else:
            self._record_unknown(outcome, started)
        if not isinstance(outcome, Blocked):
            self._metrics.refresh_blocked.labels(app=self.name).set(0)
        self._blocked_logged = outcome.reason if isinstance(outcome, Blocked) else None

    def _defer(self, outcome: Deferred) -> None:
        """Back off with the fleet: wait for the shared `not_before`, capped like Retry-After."""
        now = self._clock.time()
        wait = outcome.not_before - now
        token = self.token
        if token is not None and token.expires_at > now:
            # Never wait so long that the current token falls inside the safety margin.
            wait = min(wait, policy.serve_deadline(token, self.spec.refresh) - now)
        self._next_attempt_at = self._clock.monotonic() + max(policy.MIN_RETRY, wait)
        self._in_backoff = True
        self._permanent = outcome.permanent
        self.failures = max(self.failures, outcome.failures)
        self.last_error = outcome.error

    def _record_unknown(self, outcome: OutcomeUnknown, started: float) -> None:
        """The grant is at risk: say so at once, keep serving, and keep watching the store."""
        self.last_error = (
            f"grant at risk: {outcome.reason}; if no replica stored a newer set, "
            "run token-broker authorize"
        )
        if outcome.error is not None:
            self.failures += 1
            self._metrics.refresh_total.labels(app=self.name, outcome="transient_error").inc()
            self._metrics.refresh_duration.observe(self._clock.monotonic() - started)
            self._metrics.refresh_failures_consecutive.labels(app=self.name).set(self.failures)
        if outcome.refresh_fp not in self._announced_unknown:
            self._announced_unknown.add(outcome.refresh_fp)
            self._metrics.grant_outcome_unknown.labels(app=self.name).inc()
            audit(
                log,
                "grant.outcome_unknown",
                level="error",
                app=self.name,
                reason=outcome.reason,
                grace=self.spec.refresh.reuse_grace,
            )
        # Nothing to request: look at the store again on the next turn, and no later than when
        # the token stops being servable, so that the state turns to needs_authorization then.
        # A grace retry that is still allowed is tried at once: the window is short (H2).
        servable_left = self._servable_left()
        wait = min(MAX_SLEEP, max(LEASE_RETRY, servable_left)) if servable_left > 0 else MAX_SLEEP
        if self.fleet.may_retry(outcome.refresh_fp):
            wait = LEASE_RETRY
        self._next_attempt_at = self._clock.monotonic() + wait

    def _record_reuse(self, outcome: ReuseDetected, started: float) -> None:
        """Our own sent refresh token was refused as spent: the grant is lost; say so loudly.

        Not swallowed by adopting a newer stored set: that set came from the other
        presentation of the same token, and a reuse-detecting server revoked it with the grant.
        """
        self.failures += 1
        self.last_error = f"permanent: {outcome.reason}"
        self._metrics.refresh_total.labels(app=self.name, outcome="permanent_error").inc()
        self._metrics.refresh_duration.observe(self._clock.monotonic() - started)
        self._metrics.refresh_failures_consecutive.labels(app=self.name).set(self.failures)
        audit(log, "grant.reuse_detected", level="error", app=self.name, reason=outcome.reason)
        self._permanent = True
        self._in_backoff = True
        self._next_attempt_at = self._clock.monotonic() + MAX_SLEEP
        if self.token is not None:
            self._reused_lineage = max(self._reused_lineage, self.token.lineage)
        self._enter_needs_authorization(self.last_error)

    def _record_success(self, started: float) -> None:
        token = self.token
        assert token is not None  # just adopted
        self._over_budget = False
        self.failures = 0
        self.last_error = None
        self.last_refresh_at = self._clock.time()
        self._metrics.refresh_total.labels(app=self.name, outcome="success").inc()
        self._metrics.refresh_duration.observe(self._clock.monotonic() - started)
        self._metrics.refresh_failures_consecutive.labels(app=self.name).set(0)
        audit(
            log,
            "token.refreshed",
            app=self.name,
            token_fingerprint=token.fingerprint,
            generation=token.generation,
            expires_at=round(token.expires_at, 3),
            lifetime=round(token.lifetime, 3),
        )

    async def _record_failure(self, exc: TokenEndpointError, started: float) -> None:
        permanent = isinstance(exc, PermanentTokenError | NoGrant)
        if (
            isinstance(exc, PermanentTokenError)
            and exc.is_invalid_grant
            and await self._newer_after_invalid_grant()
        ):
            return  # another replica rotated the refresh token first; its set is ours now
        # Consecutive failures of the fleet: the shared record's count carries on here.
        self.failures = max(self.failures, self.fleet.shared_failures) + 1
        self.last_error = _describe(exc)
        outcome = "permanent_error" if permanent else "transient_error"
        self._metrics.refresh_total.labels(app=self.name, outcome=outcome).inc()
        self._metrics.refresh_duration.observe(self._clock.monotonic() - started)
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
        self._permanent = permanent
        if not isinstance(exc, NoGrant):
            await self.fleet.share_failure(
                failures=self.failures,
                not_before=now + delay,
                error=self.last_error,
                permanent=permanent,
            )
        if self.grant_spends and (
            isinstance(exc, NoGrant)
            or (isinstance(exc, PermanentTokenError) and exc.is_invalid_grant)
        ):
            self._enter_needs_authorization(self.last_error)
        audit(
            log,
            "token.refresh_failed",
            level="error" if permanent else "warning",
            app=self.name,
            error=self.last_error,
            permanent=permanent,
            status=exc.status,
            consecutive_failures=self.failures,
            retry_in=round(delay, 3),
        )

    async def _newer_after_invalid_grant(self) -> bool:
        """After invalid_grant, re-read the store: another replica may have rotated first."""
        before = self.token.rank if self.token is not None else (0, 0)
        try:
            await self.fleet.sync()
        except StoreUnavailable:
            return False
        return self.token is not None and self.token.rank > before

    def _enter_needs_authorization(self, reason: str | None) -> None:
        if self._needs_authorization is None:
            self._needs_authorization = reason or "needs authorization"
            audit(log, "app.needs_authorization", level="error", app=self.name, reason=reason)
        self._set_state(AppState.NEEDS_AUTHORIZATION)

    def _steady_state(self) -> AppState:
        if self._needs_authorization is not None:
            return AppState.NEEDS_AUTHORIZATION
        if self.fleet.outcome_unknown(self.token):
            if self.servable() is None:
                return AppState.NEEDS_AUTHORIZATION
            return AppState.FAILING
        if self.failures or self._blocked:
            return AppState.FAILING
        return AppState.FRESH if self.token is not None else AppState.REFRESHING

    def _set_state(self, state: AppState) -> None:
        if state is not self.state or state is AppState.REFRESHING:
            self.state = state
            self._metrics.set_app_state(self.name, state)
        # Every attempt starts and ends here: the schedule the metric shows follows it.
        self._metrics.set_next_refresh(self.name, self.next_refresh_at())


def _describe(exc: TokenEndpointError) -> str:
    """A short, secret-free description for `last_error` and logs."""
    kind = "permanent" if isinstance(exc, PermanentTokenError | NoGrant) else "transient"
    return f"{kind}: {SECRETS.scrub(str(exc))[:200]}"

"""One refresher per app: keeps a servable token in memory, refreshes on time, serves callers.

The refresher schedules and serves; what may be done with the store and the token endpoint is
the fleet protocol's (broker/fleet/). It depends only on protocols (TokenSource, the store's roles,
Clock) and never imports aiohttp or redis. It keeps the token, the schedule (the pure
broker/schedule.py decides it, and its state is the schedule's), the failure count and the last
error; what happens goes to its event hook (broker/events.py), never to the metrics or the audit
log directly.

Its parts, each a mixin of `AppRefresher`: serving callers and the status (broker/serving.py),
adopting sets from the store and its notices (broker/adoption.py), and accounting for each
attempt's outcome (broker/outcomes.py). This module is the loop: when to attempt, one attempt, and stopping.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from typing import Protocol

from broker import events, policy, tracing
from broker.adoption import Adoption
from broker.clock import Clock, Wake
from broker.errors import PermanentTokenError, TokenEndpointError, TransientTokenError
from broker.events import EventHook
from broker.fleet import FleetProtocol, FleetStore, NoGrant, Timing
from broker.fleetclock import ServerClock
from broker.logs import get_logger
from broker.model import AppSpec, AppState, GrantType, TokenSet
from broker.oauth import TokenSource
from broker.outcomes import Outcomes
from broker.schedule import MAX_SLEEP, Schedule, Why, credentials_changed
from broker.serving import Serving
from broker.store import bound_name, client_binding

log = get_logger(__name__)


class RefresherStore(FleetStore, ServerClock, Protocol):
    """The store's roles a refresher uses: the fleet protocol's, and the server clock it first
    measures the fleet's time against."""


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


class AppRefresher(Serving, Adoption, Outcomes):
    """Keeps one app's token fresh. `run()` is its loop; `get()` and `force()` serve callers."""

    def __init__(
        self,
        spec: AppSpec,
        source: TokenSource,
        store: RefresherStore,
        clock: Clock,
        on_event: EventHook,
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
        # Every metric and audit line goes out as an event (broker/observe.py counts them).
        self._emit = on_event
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not crypto
        self.fleet = FleetProtocol(
            spec.name,
            store,
            clock,
            owner=owner,
            spends_refresh_tokens=spec.grant_type is GrantType.AUTHORIZATION_CODE,
            known=self,
            reuse_grace=spec.refresh.reuse_grace,
            timing=replace(
                timing if timing is not None else Timing(),
                read_timeout=spec.refresh.read_timeout,
            ),
            on_lease=lambda outcome: self._emit(events.LeaseAsked(spec.name, outcome)),
            budget_per_minute=spec.max_token_requests_per_minute,
            store_name=bound_name(spec.name, self.binding),
        )
        self.token: TokenSet | None = None
        self.last_refresh_at: float | None = None
        self.last_error: str | None = None
        self.failures = 0
        # When the next attempt is and why, with what holds until a new set (broker/schedule).
        self.schedule = Schedule()
        self._attempting = False
        self._attempt_started = 0.0  # the monotonic start of the attempt in flight
        self._stagger = 0.0
        self._stopping = False
        self._inflight: asyncio.Task[None] | None = None
        self._wake = Wake()
        # Each part's own state, documented where it is used.
        self._init_serving()
        self._init_adoption(clock)
        self._init_outcomes()
        self._set_state(AppState.REFRESHING)

    # ---- what it is ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The app's configured name."""
        return self.spec.name

    @property
    def grant_spends(self) -> bool:
        """True for a grant whose refresh token is spent by a refresh."""
        return self.spec.grant_type is GrantType.AUTHORIZATION_CODE

    @property
    def state(self) -> AppState:
        """The app's state as the API shows it: the schedule's (`Schedule.shown`)."""
        return self.schedule.shown

    # ---- the loop ------------------------------------------------------------------------

    async def run(self, *, fresh: bool = False) -> None:
        """Warm start from the store, then refresh whenever due until stopped or cancelled.

        `fresh` is for an app whose credentials or scopes just changed: a stored token was got
        with the old settings, so a client-credentials app fetches a new one at once.
        """
        read = await self._sync() if self._dirty else True
        if fresh and not self.grant_spends:
            self.schedule = replace(self.schedule, at=0.0, why=Why.DUE)
        if self.token is None and self.grant_spends and read:
            # Only when the store says so: a store that is down, or a set under a key this
            # replica lacks, blocks refreshing instead (503), and asks no one to authorize.
            self._enter_needs_authorization(self._no_stored_set())
        while not self._stopping:
            if self._dirty or self._unsynced or self._sync_overdue():
                await self._sync()
            delay = max(self.schedule.at, self._lease_wait_until) - self._clock.monotonic()
            if self.schedule.needs_authorization is not None:
                await self._sleep_or_wake(MAX_SLEEP)
            elif delay > 0:
                await self._sleep_or_wake(min(delay, MAX_SLEEP))
            elif not self._stopping:
                # Shielded: cancelling the loop must not cancel a spend in flight.
                await asyncio.shield(self._start_refresh())

    @property
    def store_name(self) -> str:
        """The name the store knows this app's set by (`app@binding`)."""
        return self.fleet.key

    async def stop(self, *, write_back: bool = False) -> None:
        """Stop scheduling refreshes and let the one in flight finish and persist.

        A refresh token not yet marked sent is not sent any more: its announced spend ends as
        aborted. One already sent is awaited to its answer (at most the read timeout) and the
        answer committed (H5), and so is a lowering of the stored expiry (`lower_stored_expiry`)
        under way. `write_back` (the process exits: SIGTERM): a set the store could
        not take is written back, trying again until it is stored (a config reload needs no
        wait: the new refresher takes the set over). The caller bounds the wait
        (`drain_bound()`).
        """
        self._stopping = True
        self._unlisten_clock()
        self.fleet.stop()
        self._wake.set()
        inflight = self._inflight
        if inflight is not None:
            await asyncio.wait({inflight})
        lowering = self._lowering  # (none starts once stopping)
        if lowering is not None:
            # Lowering the stored expiry keeps other pods from serving our set past its true
            # expiry; it is one store command, and the caller's bound covers it.
            await asyncio.wait({lowering})
        if write_back:
            await self._write_back_before_exit()

    def drain_bound(self) -> float:
        """The longest `stop()` may wait for the refresh in flight (see `drain_bound`)."""
        return drain_bound(self.fleet.timing, spends=self.grant_spends)

    def credentials_changed(self) -> None:
        """A secret or key file changed: a permanent failure may be fixed, so try again now.

        This replica then also ignores the fleet's shared backoff once: the fix is new here.
        """
        if self.schedule.permanent or self.failures:
            self.schedule = credentials_changed(self.schedule)
            self._wake.set()

    def wake(self) -> None:
        """Re-evaluate now."""
        self._wake.set()

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
        ignore_shared_failure = self.schedule.fresh_credentials
        self.schedule = replace(self.schedule, fresh_credentials=False)
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
                self._settle()
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

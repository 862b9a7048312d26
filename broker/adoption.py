"""How an app's refresher takes a set: from a read of the store, a notice, or a reload.

A part of `AppRefresher` (broker/refresher.py). The `TYPE_CHECKING` block names what it uses
of the rest of the refresher.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from broker import events, policy
from broker.clock import Clock, Wake
from broker.errors import StoreUnavailable
from broker.events import EventHook
from broker.fleet import FleetProtocol
from broker.fleetclock import STEP_TOLERANCE, FleetClock
from broker.logs import SECRETS, get_logger
from broker.model import AppSpec, TokenSet
from broker.schedule import BLOCKED_RETRY, BUSY_POLL, MAX_SLEEP, Schedule, adopted
from broker.store import LEASE, LOWERED, REFUSED, RELEASE, Notice

if TYPE_CHECKING:
    from broker.refresher import AppRefresher, RefresherStore

log = get_logger("broker.refresher")

# How long a read of the store waits to measure the fleet clock first, while it never was (the
# store did not answer at start): the store that answers the read answers `TIME` too.
CLOCK_FIRST_WAIT = 3.0


class Adoption:
    """Adopting sets and following the fleet's notices (a part of AppRefresher)."""

    if TYPE_CHECKING:
        spec: AppSpec
        token: TokenSet | None
        failures: int
        last_error: str | None
        schedule: Schedule
        fleet: FleetProtocol
        _store: RefresherStore
        _clock: Clock
        _host: Clock
        _rng: random.Random
        _emit: EventHook
        _mono_expiry: float
        _fleet_expiry: float
        _lower_pending: bool
        _lowering: asyncio.Task[None] | None
        _taking_lowered: asyncio.Task[None] | None
        _bound_taken: float
        _stopping: bool
        _attempting: bool
        _stagger: float
        _refused_fp: str | None
        _reused_lineage: int
        _announced_unknown: set[str]
        _dirty: bool
        _unsynced: bool
        _view_known: bool
        _last_sync: float
        _lease_wait_until: float
        _inflight: asyncio.Task[None] | None
        _wake: Wake
        _listeners: list[Callable[[TokenSet], None]]
        _vetoes: dict[asyncio.Future[None], None]

        @property
        def name(self) -> str: ...
        @property
        def grant_spends(self) -> bool: ...
        @property
        def store_name(self) -> str: ...
        def next_refresh_at(self) -> float | None: ...
        def purge(self, refused_fp: str) -> None: ...
        def _servable_left(self) -> float: ...
        def _wake_successor_waiters(self) -> None: ...
        def _settle(self) -> None: ...

    def _init_adoption(self, clock: Clock) -> None:
        """The adoption part's state (called once by AppRefresher.__init__)."""
        self._unsynced = False  # our set may be newer than the store's: write it back
        self._dirty = True  # the store may have changed: look before the next decision
        # The store held our set when we last read it, committed it, or heard a `token` notice
        # carrying it, and no notice since says otherwise: the next attempt asks for the lease
        # without reading first (the holder reads under the lease anyway). Every replica read
        # before each attempt, most of them only to be told the lease was busy.
        self._view_known = False
        self._last_sync = float("-inf")
        # Another replica was granted the lease (we heard its `lease` notice): no attempt of
        # ours before this, unless its commit or its release is heard first. Without it every
        # replica due at the fleet's due time asked for the lease, and lost it, one by one.
        self._lease_wait_until = float("-inf")
        # When the current token stops being valid as measured on this host's monotonic
        # clock (a wall-clock step does not change it; a step that shortens the token's life
        # lowers it, see `remaining`).
        self._mono_expiry = 0.0
        # The same deadline on the fleet's clock alone (no pod's own wall clock): what this
        # replica writes back as the stored set's expiry after the store's clock stepped back
        # (`lower_stored_expiry`), so one pod's skew never shortens the fleet's token.
        self._fleet_expiry = 0.0
        self._lower_pending = False
        self._lowering = None
        self._taking_lowered = None
        # The lowest expiry this replica asked the store to keep for the set it holds
        # (`lower_stored_expiry`), kept whether or not the store held the set then: a set that
        # comes back above it (written back after an eviction lost it with the bound) is
        # lowered again (`_lower_again_if_above`).
        self._bound_asked = float("inf")
        # The lowest stored expiry of the set served now that was counted (on the store's
        # clock): a look that finds it again asks nothing more.
        self._bound_taken = float("inf")
        self._vetoes = {}
        self._unlisten_clock: Callable[[], None] = (
            clock.add_round_listener(self._on_clock_round)
            if isinstance(clock, FleetClock)
            else lambda: None
        )

    def _adopt(self, token: TokenSet, *, source: str, sent_mono: float | None = None) -> None:
        previous = self.token
        self.token = token
        SECRETS.add(token.access_token, token.refresh_token)
        if previous is not None and previous.access_token != token.access_token:
            SECRETS.discard([previous.access_token])
            if previous.refresh_token != token.refresh_token:
                SECRETS.discard([previous.refresh_token])
        wall, mono = self._clock.time(), self._clock.monotonic()
        self._mono_expiry, self._fleet_expiry = self._deadlines(token, token.expires_at, wall, mono)
        self._bound_taken = float("inf")
        self._bound_asked = float("inf")
        if sent_mono is not None:
            # Our own request: its lifetime is also counted on our monotonic clock from sending.
            self._mono_expiry = min(self._mono_expiry, sent_mono + token.lifetime)
            self._fleet_expiry = min(self._fleet_expiry, sent_mono + token.lifetime)
        elif source == "store" and self._issued_ahead(token, wall):
            # Its writer's fleet clock was ahead of Redis's (Redis went back before the
            # writer's next round), so the stamp is late; the bound above covers us, not a pod
            # that reads the set once it no longer looks issued in the future, and the writer
            # may exit before its round sees the step (swarm seeds 2691, 5792). Lower the
            # stored expiry to our bound now, as a replica whose round sees a jump back does.
            self._lower_pending = True
            self._lower_if_pending()
        # The due time is the fleet's (derived from the token); the stagger is this replica's.
        self._stagger = self._rng.random()
        due = policy.fleet_refresh_due(token, self.spec.refresh, self._stagger)
        # A refused token (read back from the store) is due now.
        at = mono if token.fingerprint == self._refused_fp else mono + (due - wall)
        new_grant = bool(
            token.refresh_token
            and (previous is None or token.rank > previous.rank)
            and token.lineage > self._reused_lineage
        )
        self.schedule = adopted(self.schedule, at, new_grant=new_grant)
        self.fleet.forget_spent(token)
        self._emit(events.TokenAdopted(self.name, token.expires_at))
        settled = False
        if source == "store":
            self.failures = 0
            self.last_error = None
            self._emit(events.Unblocked(self.name))
            if not self._attempting:
                # Between attempts, a set from the store (a warm start, another replica's
                # refresh) settles the state shown: `fresh`, not the `refreshing` or `failing`
                # of before it, for the whole wait until this replica's next attempt.
                self._settle()  # (which also says that the schedule changed)
                settled = True
            log.info(
                "token.loaded",
                app=self.name,
                token_fingerprint=token.fingerprint,
                generation=token.generation,
                expires_at=round(token.expires_at, 3),
            )
        if not settled:
            self._emit(events.ScheduleChanged(self.name, self.next_refresh_at()))
        for listener in self._listeners:
            listener(token)
        self._wake_successor_waiters()

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
            self._fleet_expiry = min(self._fleet_expiry, retired._fleet_expiry)
            self._bound_asked = min(self._bound_asked, retired._bound_asked)

    def _on_clock_round(self, back: bool) -> None:
        """A round of the fleet clock came back (FleetClock.add_round_listener): after a jump
        back, lower the stored expiry (again at each later round while the store was down)."""
        self._lower_pending = self._lower_pending or back
        self._lower_if_pending()

    def _lower_if_pending(self) -> None:
        if self._lower_pending and self._lowering is None and not self._stopping:
            self._lowering = asyncio.ensure_future(self.lower_stored_expiry())
            self._lowering.add_done_callback(self._lowered)

    def _lowered(self, _: asyncio.Task[None]) -> None:
        self._lowering = None

    def _issued_ahead(self, token: TokenSet, now: float) -> bool:
        """`token` looks issued in the future by more than a jump of the fleet clock, read on a
        settled fleet clock (a clock that still holds a jump forward would blame the stamp)."""
        clock = self._clock
        return (
            isinstance(clock, FleetClock)
            and clock.settled
            and token.issued_at - now > STEP_TOLERANCE
        )

    async def lower_stored_expiry(self) -> None:
        """Lower the stored expiry of the set this replica holds to its own deadline in the
        store's frame as it is now (or will be: a jump back that waits for confirmation), never
        raising it (issue 20, M3).

        A stored `expires_at` is in the frame of the clock that stamped it. When the store's
        clock steps back, a pod that reads the set later (one restarted, or scaled up) takes
        the stamp at face value in the new frame and serves the token that much past its true
        expiry; every clock it can read agrees with the new frame (swarm seeds 4575, 8286,
        13488, 16961, 19018, 24067, 27232). This replica counts the set's deadline on its
        monotonic clock from its adoption, in the frame of then, and re-expresses it in the
        earliest frame its fleet clock allows. The fleet clock's deadline only, never the pod's
        own wall clock (one pod's skew would shorten the fleet's token). Best-effort: a store
        that does not answer is asked again after the next round of the fleet clock.

        Never above a bound asked before for the same set (`_bound_asked`), even when the jump
        that made it was not confirmed, or the store did not hold the set then: the bound
        stands for every pod that measured Redis's clock while it was back.
        """
        token, clock = self.token, self._clock
        if token is None or not isinstance(clock, FleetClock):
            self._lower_pending = False
            return
        expires_at = min(
            self._fleet_expiry + (clock.earliest_time() - clock.monotonic()), self._bound_asked
        )
        if expires_at >= token.expires_at:
            # Adopted in the new frame already (or nothing moved): nothing to lower.
            self._lower_pending = False
            return
        self._bound_asked = expires_at
        try:
            lowered = await self._store.lower_expiry(
                self.store_name, token, expires_at, owner=self.fleet.owner
            )
        except StoreUnavailable:
            return  # (still pending: the next round tries again)
        self._lower_pending = False
        if lowered:
            self._emit(events.ExpiryLowered(self.name, token.expires_at - expires_at))

    def _lower_again_if_above(self, stored: TokenSet) -> None:
        """The store holds our set (`stored`, as a look or a `token` notice shows it) with an
        expiry above the bound we asked it to keep: an eviction (or a failover) lost the bound
        with the set, and a replica that never saw the step wrote the set back, its stamp in
        the frame before the step. Ask for the bound again (swarm seed 120513: Redis's clock
        went back 13.5 s for 4 s and the set was evicted; a pod restarted inside the step, its
        own clock 25.6 s behind, measured the stepped clock; the one round that saw the step
        found no set to lower, and the set written back 8 s later was served by that pod past
        its true expiry)."""
        token = self.token
        if (
            token is not None
            and stored.expires_at > self._bound_asked
            and stored.rank == token.rank
            and stored.fingerprint == token.fingerprint
        ):
            self._lower_pending = True
            self._lower_if_pending()

    def newest_known(self) -> TokenSet | None:
        """The set served now: what the fleet protocol reads (broker.fleet.KnownSet)."""
        return self.token

    def adopt_from_store(self, token: TokenSet) -> None:
        """A newer set the fleet protocol found in the store (broker.fleet.KnownSet)."""
        self._adopt(token, source="store")

    def take_lowered_expiry(self, stored: TokenSet) -> None:
        """The store holds our set (broker.fleet.KnownSet); with an earlier expiry, a replica
        that saw Redis's clock step back, or read the set issued in the future, lowered it
        (`lower_stored_expiry`). Serve it no longer than that: a replica that had taken the
        step before it adopted the set, stamped in the frame before it, could not tell (swarm
        seed 4340: a spender frozen 33 s while Redis's clock went back 37 s). Counted on the
        store's clock (`_take_lowered_on_store_clock`), as a LOWERED notice is."""
        self._lower_again_if_above(stored)
        token = self.token
        if (
            token is None
            # (first: the fingerprints hash twice)
            or stored.expires_at >= min(token.expires_at, self._bound_taken)
            or token.rank != stored.rank
            or token.fingerprint != stored.fingerprint
        ):
            return
        self._take_lowered_soon()

    def _deadlines(
        self, token: TokenSet, expires_at: float, wall: float, mono: float
    ) -> tuple[float, float]:
        """The monotonic deadlines of `token` stamped to expire at `expires_at`, read at `wall`
        (the fleet clock) and `mono`: the serving deadline, on the later of the fleet's and
        this pod's clocks (the shorter life, M3), and the same on the fleet's clock alone
        (`lower_stored_expiry`). Neither is longer than its lifetime from now, on no clock: it
        was issued before we read it (a set stamped by a replica whose fleet clock ran ahead of
        Redis's looks issued in the future to a replica whose clock is right: swarm seeds
        2668, 8952)."""
        lifetime = token.lifetime
        serving = mono + min(expires_at - max(wall, self._host.time()), lifetime)
        return serving, mono + min(expires_at - wall, lifetime)

    @property
    def must_reach_store(self) -> bool:
        """True while this app holds what a store that forgot may lack and no other replica
        may know: a refresh token on the wire (its veto of another spend of it) or a set its
        write-back could not store (the answer to our refresh, whose commit failed). The store
        watcher then retries its reconnect at its shortest delay (broker/core.py)."""
        return self.fleet.in_flight is not None or (self._unsynced and self.token is not None)

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
        self._vetoes[task] = None
        task.add_done_callback(lambda done: self._vetoes.pop(done, None))

    def on_notice(self, notice: Notice) -> None:
        """A change published by a replica: act only when it tells us something new."""
        if self.fleet.must_veto(notice):
            self._spawn_veto(self.fleet.veto(notice))
        self.fleet.on_notice(notice)
        if notice.kind == REFUSED:
            if notice.access_fp is not None:
                self.purge(notice.access_fp)
            return
        if notice.kind == LOWERED:
            self._on_lowered(notice)
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
            elif carried is not None:
                self._lower_again_if_above(carried)
        elif notice.kind == "spend" and token is not None and token.rank > notice.rank:
            # Someone is about to spend an older set than ours: write ours back now.
            self.notify_store_changed()

    def _on_lowered(self, notice: Notice) -> None:
        """Another replica lowered the stored expiry of a set (`lower_stored_expiry`): when it
        is the set we hold, take the lower expiry now (`_take_lowered_on_store_clock`).

        The periodic look took it within MAX_SLEEP (30 s), too late for a pod that adopted the
        set at face value just before: one started while Redis's clock was stepped back, before
        any replica's round saw the step, with its own clock behind too. It served the set
        until its look came, past the true expiry (swarm seeds 68595: 44 s back, a pod 49 s
        behind, 9 s past; 80253: 11 s back, a pod 8 s behind, 2 s past), while the lowering
        came 14 s and 1.5 s before that expiry.
        """
        token = self.token
        if (
            token is not None
            and notice.owner != self.fleet.owner  # (our own: we hold that deadline already)
            and notice.rank == token.rank
            and notice.access_fp == token.fingerprint
        ):
            self._take_lowered_soon()

    def _take_lowered_soon(self) -> None:
        if self._taking_lowered is None and not self._stopping:
            self._taking_lowered = asyncio.ensure_future(self._take_lowered_on_store_clock())
            self._taking_lowered.add_done_callback(self._took_lowered)

    def _took_lowered(self, _: asyncio.Task[None]) -> None:
        self._taking_lowered = None

    async def _take_lowered_on_store_clock(self) -> None:
        """Serve the set we hold no longer than the lowered expiry the store keeps, counted on
        the store's own clock (`TIME`), not on our fleet clock.

        The bound is in the frame of Redis's clock as the lowering replica measured it, after
        a step back. A replica whose round has not seen that step yet keeps time in the frame
        before it: read on its fleet clock, the bound looked that much earlier, and its own
        lowering at its next round wrote that back, the step once more below; each replica
        that looked at the store before its round saw the step cut the fleet's token by the
        step again (door step_seen_after_a_restarted_pod_read_the_stamp: 60 s before its true
        expiry, after a step of 30 s). Counted against `TIME`, the bound gives the same
        deadline to every replica, whatever the frame of its clock: one that holds the right
        deadline (it adopted the set before the step) changes nothing. The deadline is
        counted from before `TIME` was asked (never later). Best-effort: a store that does not
        answer leaves it to the next look.
        """
        token = self.token
        if token is None:
            return
        try:
            stored = await self._store.load(self.store_name)
            asked = self._clock.monotonic()
            server_now = await self._store.server_time()
        except StoreUnavailable:  # (UnreadableTokenSet too)
            return
        if (
            stored is None
            or self.token is not token
            or stored.rank != token.rank
            or stored.fingerprint != token.fingerprint
            or stored.expires_at >= min(token.expires_at, self._bound_taken)
        ):
            return
        deadline = asked + min(stored.expires_at - server_now, token.lifetime)
        self._mono_expiry = min(self._mono_expiry, deadline)
        self._fleet_expiry = min(self._fleet_expiry, deadline)
        self._bound_taken = stored.expires_at
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

    async def _write_back_before_exit(self) -> None:
        """Store the set this replica holds when the store may be older, retrying until it
        is stored (the caller bounds the wait: the drain's bound).

        The answer to our last refresh may be the only copy of a rotated set (its commit
        failed: the store was unreachable). Exiting with it loses the grant, so a drain waits
        to write it back as it waits for the answer itself. So with an abort the store did not
        take (a spend marked sent but never sent, its `mark_sent` answer lost): only this
        process can end that record, and a restarted one has another owner name (swarm seed
        3349: SIGTERM in an outage left the `sent` record for good). So, with
        `store.require_replica_ack`, with a commit or an abort no store replica acknowledged:
        only the primary holds it, and a failover after this process exits would lose it
        (swarm seeds 21255, 23291); each sync asks again (`WAIT`) until one does.
        """
        while self.grant_spends and (
            (self._unsynced and self.token is not None)
            or self.fleet.abort_unwritten
            or self.fleet.commit_unacknowledged
        ):
            # `sync` answers True with an abort that no replica acknowledged (NotDurable: it
            # writes it again next time), so ask for both flags, not only the commit's (swarm
            # seed 25279: a split brain's old primary took the abort, the drain ended at once,
            # and the heal discarded it).
            if (
                await self._sync()
                and not self.fleet.commit_unacknowledged
                and not self.fleet.abort_unwritten
            ):
                return
            await self._clock.sleep(BLOCKED_RETRY / 5)

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

    async def _newer_after_invalid_grant(self) -> bool:
        """After invalid_grant, re-read the store: another replica may have rotated first."""
        before = self.token.rank if self.token is not None else (0, 0)
        try:
            await self.fleet.sync()
        except StoreUnavailable:
            return False
        return self.token is not None and self.token.rank > before

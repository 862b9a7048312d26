"""The fleet protocol's sequence for one app on one replica: lease, objection window, mark sent,
fetch, commit (the promises are in broker/fleet/__init__.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol

from broker.clock import Clock, wait_within
from broker.errors import (
    NotDurable,
    PermanentTokenError,
    StoreUnavailable,
    TransientTokenError,
    UnreadableTokenSet,
)
from broker.fleet.memory import SpendMemory
from broker.fleet.outcomes import (
    Adopted,
    Blocked,
    Busy,
    Deferred,
    Fetched,
    NoGrant,
    Outcome,
    OutcomeUnknown,
    OverBudget,
    ReuseDetected,
)
from broker.fleetclock import stamped
from broker.logs import get_logger
from broker.model import PROTOCOL_VERSION, TokenSet
from broker.store import (
    Commit,
    FleetSignals,
    Notice,
    SpendEnd,
    SpendLedger,
    SpendStart,
    TokenSets,
)

# The name the module had before it became a package: log lines keep their logger.
log = get_logger("broker.fleet")


class FleetStore(TokenSets, SpendLedger, FleetSignals, Protocol):
    """The store's roles the fleet protocol uses: the sets, the spend ledger (lease and spend
    record) and the fleet's shared backoff and budget."""


@dataclass(frozen=True, slots=True)
class Timing:
    """The protocol's time budgets, in seconds."""

    # Bounds of one token request; within them, half the time the current token stays servable.
    min_attempt: float = 1.0
    max_attempt: float = 10.0
    # What a commit may take after the answer arrives.
    persist: float = 1.0
    # Lease time kept in hand beyond the request and the commit (round trips, clock rates).
    margin: float = 0.5
    # After recording a spend, how long replicas that know a newer set get to write it back.
    objection: float = 0.5
    # The same with no servable token (a start, or the end of an outage): there is no hurry,
    # and every replica must have re-subscribed (the store watcher retries within 5 s).
    objection_idle: float = 6.0
    # How long the answer to a sent refresh token is awaited (the app's refresh.read_timeout):
    # a sent request is never cancelled sooner, whatever the lease (issue 20, H1).
    read_timeout: float = 120.0
    # After evidence that the store forgot (our write-back stored a set), every spend waits
    # the long objection window for this long: replicas cut off by the same event (a restart,
    # a failover) must be back to object, the spender of a token in flight among them (C1).
    forgetful_for: float = 60.0
    # After the last sign of a replica of a newer protocol version (a notice, a lease), this
    # replica spends nothing for this long: a rolling upgrade is under way (M5).
    newer_protocol_for: float = 300.0


class _RecordGone(Exception):
    """The spend record just read is gone: resolved meanwhile (`_record_owner`)."""


def _blocked(exc: StoreUnavailable) -> Blocked:
    """Why a refresh token is not spent when the store cannot be read or written."""
    return Blocked(
        f"store unavailable, not spending the refresh token: {exc}",
        unreadable=isinstance(exc, UnreadableTokenSet),
    )


Fetch = Callable[[str | None], Awaitable[TokenSet]]


class KnownSet(Protocol):
    """The newest set this replica knows, the one its refresher serves from memory: the fleet
    protocol reads it before each step and hands it any newer set it finds in the store."""

    def newest_known(self) -> TokenSet | None:
        """The set served now (None before the first)."""
        ...

    def adopt_from_store(self, token: TokenSet) -> None:
        """Take `token`, newer than `newest_known()`, found in the store."""
        ...

    def take_lowered_expiry(self, stored: TokenSet) -> None:
        """The store holds the set served now: take its expiry when it is earlier (a replica
        lowered it, `lower_expiry`); a later one changes nothing."""
        ...


class FleetProtocol:
    """One app's side of the fleet protocol, for one replica.

    `known` is the refresher's in-memory set (KnownSet): read before each step, and handed any
    newer set found in the store. The refresher decides when to call `refresh()` and `sync()`; this class decides
    what may be done with the store and the token endpoint.
    """

    def __init__(
        self,
        app: str,
        store: FleetStore,
        clock: Clock,
        *,
        owner: str,
        spends_refresh_tokens: bool,
        known: KnownSet,
        reuse_grace: float = 0.0,
        timing: Timing | None = None,
        on_lease: Callable[[str], None] = lambda outcome: None,
        budget_per_minute: int | None = None,
        store_name: str | None = None,
    ) -> None:
        self.app = app
        # The name the store knows this app's set by: the app and its client binding (M6).
        self.key = store_name if store_name is not None else app
        # The fleet protocol version this replica speaks, and the newest other version it saw
        # in the fleet, and when (monotonic): while a newer one is around it spends nothing.
        self.protocol = PROTOCOL_VERSION
        self._newer_protocol = 0
        self._newer_protocol_at = float("-inf")
        self._store = store
        self._clock = clock
        self._owner = owner
        self._spends = spends_refresh_tokens
        self._current = known.newest_known
        self._adopt = known.adopt_from_store
        self._take_lowered = known.take_lowered_expiry
        self._grace = reuse_grace
        self.timing = timing if timing is not None else Timing()
        self._on_lease = on_lease  # "acquired", "busy", "lost": for the lease metric
        self._budget = budget_per_minute
        # Consecutive failures of the fleet, as the last shared failure record counted them.
        self.shared_failures = 0
        self._shared_failure_seen = False
        # What this replica knows of spends, its own and the others' (SpendMemory).
        self.memory = SpendMemory()
        # The highest rank this replica knows exists, read or not: an older set is never spent.
        self._seen_rank = (0, 0)
        # The refresh token this replica has on the wire (marked sent, no answer yet): it
        # vetoes any other spend of it, whatever the store says (C1).
        self.in_flight: str | None = None
        self._in_flight_fence = 0  # the fence of that spend
        # When this replica last saw evidence that the store forgot (monotonic), and the rank
        # it then wrote back: only a refresh token of that rank or older can have been in
        # flight when the store forgot; a newer one was issued after it.
        self._forgot_at = float("-inf")
        self._forgot_rank = (0, 0)
        # Set on SIGTERM (or an app's removal): no refresh token is sent from then on (H5).
        self._stopping = asyncio.Event()
        # The rank of a set this replica stored that no store replica acknowledged (WAIT
        # answered 0): only the primary holds it, a failover may lose it, and if this process
        # exits it may be the fleet's only copy. The SIGTERM drain asks again (issue 20).
        self._unacknowledged: tuple[int, int] | None = None

    @property
    def owner(self) -> str:
        """The name this replica's leases, spends and notices carry."""
        return self._owner

    # ---- stopping ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Send no refresh token from now on: a spend announced but not yet marked sent ends as
        aborted (its objection window is cut short); one already sent is still awaited."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called."""
        return self._stopping.is_set()

    async def _objection_wait(self, seconds: float) -> None:
        """Sleep `seconds` on the clock, or until `stop()`."""
        sleeper = asyncio.create_task(self._clock.sleep(seconds))
        stopper = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()

    async def _abort_for_stop(self, fence: int) -> Outcome:
        """Stopping before sending: end the announced spend without effect (nobody waits on
        it) and step aside; the caller releases the lease."""
        await self._end_spend(fence, SpendEnd.ABORTED)
        log.info("refresh.abandoned_for_shutdown", app=self.app, fence=fence)
        return Busy(0.0)

    # ---- what other replicas tell us -------------------------------------------------------

    def _note_written_back(self, rank: tuple[int, int], version: int) -> None:
        """A set of a generation past the first is its key's first write (`version` 1): it
        was written back into a store that had lost it (an empty restart, a failover, an
        eviction) or moved from a release before the binding. Evidence that the store forgot,
        as our own write-back that stored something is: a pod that started after the loss saw
        neither the drop nor the write-back, and spent the set's refresh token within the short
        objection window (swarm seed 46315: a pod restarted inside an empty restart adopted the
        set a replica without the newest one wrote back, and spent it 1.3 s before the replica
        holding the newest set wrote that back; the grant was revoked)."""
        if version == 1 and rank[1] > 1:
            self._forgot_at = self._clock.monotonic()
            self._forgot_rank = max(self._forgot_rank, rank)

    def note_rank(self, rank: tuple[int, int]) -> None:
        """A set of `rank` exists (we heard of it, or saw it without being able to read it)."""
        self._seen_rank = max(self._seen_rank, rank)

    def note_protocol(self, version: int) -> None:
        """A notice or lease of fleet protocol `version`: remember a newer one (M5).

        Its rules are unknown here: while such a replica is in the fleet (a rolling upgrade),
        this one spends nothing and leaves the refreshing to it.
        """
        if version <= self.protocol:
            return
        now = self._clock.monotonic()
        if now - self._newer_protocol_at >= self.timing.newer_protocol_for:
            log.warning(
                "fleet.newer_protocol_seen",
                app=self.app,
                protocol=version,
                ours=self.protocol,
                spends=self._spends,
            )
        self._newer_protocol = max(self._newer_protocol, version)
        self._newer_protocol_at = now

    def _protocol_blocked(self, current: TokenSet | None) -> Blocked | None:
        """Why this replica may not spend because of another protocol version, if so (M5)."""
        if current is not None and current.protocol > self.protocol:
            return Blocked(
                f"the token set was stored by a replica of fleet protocol version "
                f"{current.protocol}; this replica speaks version {self.protocol} and does not "
                "spend it (a rolling upgrade: the newer replicas refresh)"
            )
        seen = self._clock.monotonic() - self._newer_protocol_at
        if seen < self.timing.newer_protocol_for:
            return Blocked(
                f"a replica of fleet protocol version {self._newer_protocol} was in the fleet "
                f"{seen:.0f} s ago; this replica speaks version {self.protocol} and spends "
                "nothing while one is (a rolling upgrade: the newer replicas refresh)"
            )
        return None

    def on_notice(self, notice: Notice) -> None:
        """Track newer sets and the spends of other replicas (a store that forgets must not fool us)."""
        self.note_protocol(notice.protocol)
        if notice.kind == "token":
            self.note_rank(notice.rank)
            self._note_written_back(notice.rank, notice.version)
        if notice.refresh_fp is None or notice.owner == self._owner:
            return
        fp = notice.refresh_fp
        if notice.kind == "sent":
            self.memory.heard_sent(fp, notice.owner, self._clock.monotonic())
            if notice.owner is not None and notice.fence > 0:
                # A veto for this spend names it exactly, and the store refuses one for a
                # spend its spender ended as aborted (even after it forgot the record; swarm
                # seeds 12554, 27015, 28726: the spender had exited, nobody could lift it).
                self.memory.foreign_fences[fp] = (notice.owner, notice.fence)
        elif (
            notice.kind == "abort" and not notice.retry_aborted and not self._stale_abort(notice)
        ) or self._respends_own(notice):
            # Ended without effect; or its spender spends it again, which it does only when it
            # knows its last spend ended without effect (a restart gets a new owner name): the
            # abort notice was lost, e.g. its record was gone after a store rollback.
            self.memory.resolved_foreign(fp)
        elif notice.kind == "abort" and notice.retried is not None:
            self._retry_ended(fp, notice.owner, notice.retried)

    def _retry_ended(self, refresh_fp: str, retrier: str | None, retried: tuple[str, int]) -> None:
        """A grace retry of `refresh_fp` ended without effect, and the spend it retried is
        unknown again (its record restored). Remembered as the retrier's spend (from its `sent`
        notice), it is that spend's now: a veto for it names that spend, whose spender's abort
        lifts it (swarm seed 30624: a bystander on a split brain's old primary heard only the
        retry's notices, and after the heal its veto named the retry, whose abort said nothing
        of the spend retried, and the fleet waited for a person). So it is when this replica
        heard both `sent` notices, the spend's and the retry's, and no other (door
        `retry_aborted_after_both_sends_heard`: it remembered the spend as nobody's, and its
        veto named none)."""
        remembered = self.memory.foreign.get(refresh_fp)
        if remembered is None or retrier is None:
            return
        owner, fence = retried
        if remembered[1] is None:
            if self.memory.senders.get(refresh_fp) != {retrier, owner}:
                return
        elif remembered[1] != retrier:
            return
        if owner == self._owner or (owner, fence) in self.memory.aborts:
            # The spend retried is ours (or one the refresher a config reload replaced
            # aborted): we know what became of it (unknown: `memory.unknown`; on the wire:
            # `in_flight`; aborted: nothing), and the retry had no effect. Kept as another
            # replica's spend under our own name, we vetoed the next spend of the token in our
            # own name, and our own OutcomeUnknown stopped us before the `begin_spend` that
            # would have lifted that veto (swarm seed 55914, after a split brain). A spender
            # that reads the retry's notices only after it aborted its own spend (it was frozen
            # as the token was marked sent) did the same, and after a config reload its new
            # refresher vetoed naming that name alone, for good (swarm seeds 62442, 72135; door
            # `own_spend_retried_then_aborted`).
            self.memory.resolved_foreign(refresh_fp)
            return
        self.memory.found_foreign(refresh_fp, owner, remembered[0])
        if fence > 0:
            self.memory.foreign_fences[refresh_fp] = (owner, fence)
        else:
            self.memory.foreign_fences.pop(refresh_fp, None)

    def _stale_abort(self, notice: Notice) -> bool:
        """`notice` ends a spend (it names the fence: its record was gone) of a spender whose
        later spend of the token we know: an abort that landed late, after the store forgot
        that later spend's record, says nothing about it."""
        known = self.memory.foreign_fences.get(notice.refresh_fp or "")
        return (
            notice.fence > 0
            and known is not None
            and known[0] == notice.owner
            and known[1] > notice.fence
        )

    def _respends_own(self, notice: Notice) -> bool:
        """`notice` announces a spend by the one replica that sent this token before."""
        spend = self.memory.foreign.get(notice.refresh_fp or "")
        return notice.kind == "spend" and spend is not None and spend[1] == notice.owner

    def must_veto(self, notice: Notice) -> bool:
        """True when `notice` announces a spend of a refresh token whose earlier spend this
        replica knows had no known outcome (the store must have forgotten it)."""
        if notice.kind != "spend" or notice.owner == self._owner or notice.refresh_fp is None:
            return False
        if notice.retry:
            # The one grace retry the store granted from its own record, timed by its own
            # clock: vetoed only when this replica knows better (see `_refuses_retry`).
            return self._refuses_retry(notice.refresh_fp)
        return (
            notice.refresh_fp in self.memory.unknown
            or notice.refresh_fp == self.in_flight
            or (notice.refresh_fp in self.memory.foreign and not self._respends_own(notice))
        )

    def _refuses_retry(self, refresh_fp: str) -> bool:
        """This replica knows that a grace retry of `refresh_fp`, which the store granted from
        its record, must not be made: the server answered our own spend of it `invalid_grant`
        (the token is dead, a retry only presents it again: swarm seed 4379), or this replica
        sent it, or heard its `sent` notice, longer ago than a retry may follow, on its own
        monotonic clock, which no NTP step moves.

        The store grants the retry by the age of its record on its own clock: stepped forward
        while the spend was marked sent and back after, that clock makes an old spend look
        young (swarm seed 4202: a retry 35 s after the send, past a 30 s window, revoked the
        grant). A replica's first notice comes after the send, so its age never overstates
        the spend's: it vetoes no retry that is inside the window.
        """
        if refresh_fp in self.memory.rejected:
            return True
        sent = self.memory.sent_time(refresh_fp)
        return sent is not None and self._clock.monotonic() - sent >= self._retry_window()

    async def veto(self, notice: Notice) -> None:
        """Stop another replica's spend of a refresh token we know was already sent."""
        assert notice.refresh_fp is not None
        fp = notice.refresh_fp
        if not self._remembers(fp):
            # Resolved since the notice was judged (its spender's abort notice came in
            # between): a veto now would stand for nothing that any abort could lift.
            return
        with contextlib.suppress(StoreUnavailable):
            if await self._store.veto_spend(self.key, refresh_fp=fp, protects=self._protects(fp)):
                log.warning("grant.spend_vetoed", app=self.app, spender=notice.owner)

    def _remembers(self, refresh_fp: str) -> bool:
        """This replica knows a spend of `refresh_fp` with no known outcome, or has it on the
        wire."""
        return (
            refresh_fp in self.memory.unknown
            or refresh_fp in self.memory.foreign
            or refresh_fp == self.in_flight
        )

    def _protects(self, refresh_fp: str) -> tuple[str, int] | None:
        """The one spend (owner, fence) a veto of `refresh_fp` stands for, when that is all
        this replica knows of it: its spender's abort of that fence may then lift the veto."""
        if refresh_fp in self.memory.unknown:
            return None
        if refresh_fp == self.in_flight:
            # Our own spend on the wire: if it ends without effect (a 429, a refused
            # connection), our abort of it lifts the veto, which stood for nothing else
            # (swarm seed 19564: an empty restart erased the record of a spend on the wire;
            # the spender vetoed a new pod's spend of it, then got 429, and the veto, naming no
            # spend, kept the fleet waiting for a person).
            return (self._owner, self._in_flight_fence)
        foreign = self.memory.foreign.get(refresh_fp)
        if foreign is None or foreign[1] is None:
            return None
        known = self.memory.foreign_fences.get(refresh_fp)
        if known is not None and known[0] == foreign[1]:
            return known
        return (foreign[1], 0)  # known from its `sent` notice, which names no fence

    async def veto_in_flight(self) -> None:
        """After a reconnect: veto an announced spend of the token we have on the wire.

        The spend notice may have gone out while our subscription was down (a store restart
        drops every connection); the long objection window that follows evidence of a
        forgetful store outlasts our reconnect.
        """
        refresh_fp = self.in_flight
        if refresh_fp is None:
            return
        with contextlib.suppress(StoreUnavailable):
            if await self._store.veto_spend(
                self.key, refresh_fp=refresh_fp, protects=self._protects(refresh_fp)
            ):
                log.warning("grant.spend_vetoed", app=self.app, spender=None, in_flight=True)

    def carry_over(self, previous: FleetProtocol, *, same_grant: bool) -> None:
        """Take over what this app's protocol before a config reload knew about spends.

        The reload gives the new protocol another owner name (broker/app.py): the old object
        may still be seeing a sent request through, and a store record under the old name
        must not pass for this one's (`begin_spend` lets an owner replace a record it ended
        itself). The memory is still true, so it is kept: spends with an unknown outcome are
        never presented, other replicas' sent tokens are still vetoed, and a token the old
        object still has on the wire is another owner's spend now. Ranks and the evidence of
        a forgetful store are kept only for the same grant (`same_grant`: token URL, client,
        grant and scopes unchanged).
        """
        self.memory.take_over(
            previous.memory,
            owner=previous._owner,
            in_flight=previous.in_flight,
            now=self._clock.monotonic(),
        )
        if same_grant:
            self.note_rank(previous._seen_rank)
            if previous._forgot_at > self._forgot_at:
                self._forgot_at, self._forgot_rank = previous._forgot_at, previous._forgot_rank

    def forget_spent(self, token: TokenSet) -> None:
        """A set of `token`'s rank or newer is ours now: older spends no longer matter."""
        self.memory.keep_only(token.refresh_fingerprint)

    def outcome_unknown(self, token: TokenSet | None) -> bool:
        """True when `token`'s refresh token must not be presented: its last spend is unknown."""
        fp = token.refresh_fingerprint if token is not None else None
        return fp is not None and self.memory.is_unknown(fp)

    # ---- budgets -----------------------------------------------------------------------------

    def attempt_timeout(self, servable_left: float) -> float:
        """How long one token request may take, as the lease counts it.

        Spending a refresh token always gets the full budget in its lease, so that a usual
        answer comes while the lease holds; a slower one is still awaited, to the read timeout
        (a sent request is never cancelled: that would lose its answer, and with it the grant).
        Otherwise half the servable time left, within bounds.
        """
        t = self.timing
        if servable_left <= 0 or self._spends:
            return t.max_attempt
        return max(t.min_attempt, min(t.max_attempt, servable_left / 2))

    def lease_ttl(self, servable_left: float) -> float:
        """A lease long enough for the objection window, one request, a commit and a margin."""
        t = self.timing
        objection = self.objection_window(servable_left) if self._spends else 0.0
        return objection + self.attempt_timeout(servable_left) + t.persist + t.margin

    # ---- keeping the store in step -----------------------------------------------------------

    async def sync(self) -> bool:
        """Adopt a newer stored set, or write ours back over an older one. True when in step.

        Raises StoreUnavailable when the store cannot be read or written, and also (as
        UnreadableTokenSet) when a grant that spends refresh tokens has no set in memory and
        the stored one is under a key this replica lacks.
        """
        # An abort applied on the primary that no replica acknowledged yet (NotDurable) stays
        # unwritten and is written again at the next sync (the drain waits for it); the store
        # answers, so read it on.
        with contextlib.suppress(NotDurable):
            await self._resolve_aborted()
        try:
            stored = await self._store.load(self.key)
        except UnreadableTokenSet as exc:
            self.note_rank(exc.rank)
            current = self._current()
            if current is None and self._spends:
                raise  # unreadable is not missing: the app must not look unauthorized
            if current is not None and current.rank == exc.rank:
                # Our set, stored under a key we lack (another replica wrote it back): a spend
                # of its refresh token may be announced while we were away, and what we know
                # of that token is no less true for the blob we cannot open (swarm seed 88902:
                # the spender, whose spend was unknown, returned here without its veto).
                await self._veto_remembered(current)
                return True
            if current is None or current.rank < exc.rank:
                return True  # the newer set is there, only not for us: nothing to repair
            stored = None
        # Read after the load: a notice may have brought a newer set meanwhile.
        current = self._current()
        if stored is not None and (current is None or stored.rank > current.rank):
            self._note_written_back(stored.rank, stored.version)
            self._adopt(stored)
            return True
        if current is None:
            return True
        if stored is not None and stored.rank == current.rank:
            self._take_lowered(stored)
            await self._confirm_commit(current)
            await self._veto_remembered(current)
            return True
        commit = await self._store.commit(self.key, current)
        self.note_rank(commit.rank)
        self._note_durable(current, commit)
        if commit.stored:
            # The store held an older set or none: it forgot (an empty restart, a failover that
            # lost writes, a restore). Spends wait the long objection window for a while.
            self._forgot_at = self._clock.monotonic()
            self._forgot_rank = max(self._forgot_rank, current.rank)
            log.info(
                "store.written_back",
                app=self.app,
                generation=current.generation,
                stored_generation=stored.generation if stored is not None else None,
            )
            await self._veto_remembered(current)
        return True

    @property
    def commit_unacknowledged(self) -> bool:
        """A set this replica stored, still the newest it holds, has no replica's
        acknowledgement yet (`store.require_replica_ack`): the next `sync` asks again."""
        current = self._current()
        return (
            self._unacknowledged is not None
            and current is not None
            and (current.rank == self._unacknowledged)
        )

    def _note_durable(self, token: TokenSet, commit: Commit) -> None:
        """Remember whether a replica acknowledged the commit of `token` (issue 20).

        Without an acknowledgement the set is kept and served as usual: it is stored, on the
        primary, and a spend of its refresh token waits for an acknowledgement of its own
        (`mark_sent`), so in doubt the fleet waits rather than spends. Only exiting with it
        unacknowledged risks it: a failover then loses the only copy (swarm seeds 21255,
        27519), so the drain asks again until a replica holds it or the bound runs out.
        """
        if not self._spends:
            return  # a client-credentials set lost costs one request, never a grant
        if commit.stored and not commit.durable:
            if self._unacknowledged != token.rank:
                log.warning("commit.not_durable", app=self.app, generation=token.generation)
            self._unacknowledged = token.rank
        else:
            self._unacknowledged = None

    async def _confirm_commit(self, current: TokenSet) -> None:
        """Ask again for a replica's acknowledgement of our unacknowledged set, now stored
        with the same rank: a repeat of the commit, answered as stored, waits again."""
        if not self.commit_unacknowledged:
            self._unacknowledged = None
            return
        commit = await self._store.commit(self.key, current)
        self.note_rank(commit.rank)
        self._note_durable(current, commit)

    async def _resolve_aborted(self) -> None:
        """Clear the record of our own spend that ended without effect, now that the store
        answers again (raises StoreUnavailable while it does not).

        Its abort could not be written: typically `mark_sent` was applied but its answer lost
        (an outage or partition starting inside that round trip), so the token was never
        handed to the HTTP client, or the server answered that it did not act. Until the
        record goes, every other replica that meets it takes the token as unknown and the
        fleet waits for a person. `end_spend` removes it only under our owner name and that
        fence (a compare-and-set), and publishes the abort that clears the others' memory of
        it. A restarted process has a new owner name and remembers nothing to resolve; a
        config reload hands the old refresher's unresolved abort to the new one (the same
        process, which knows it never sent), under the old owner name.
        """
        memory = self.memory
        while memory.carried_aborts:
            owner, fence = memory.carried_aborts[-1]
            await self._store.end_spend(
                self.key, owner=owner, fence=fence, outcome=SpendEnd.ABORTED
            )
            log.info("spend.abort_resolved", app=self.app, fence=fence, carried=True)
            memory.carried_aborts.pop()
        if memory.resend:
            # Reconnected: this may be another primary (a failover, a split brain's heal) that
            # kept a record of a spend we aborted elsewhere, or restored one under a grace
            # retry that names it. Say again that each ended without effect.
            for owner, fence in memory.aborts_in_fence_order():
                if not self._settled(self.memory.aborts[owner, fence]):
                    continue  # a later spend of that token is unknown: nothing to lift
                await self._store.end_spend(
                    self.key, owner=owner, fence=fence, outcome=SpendEnd.ABORTED
                )
            memory.resend = False
        fence = memory.aborted_fence
        if fence == 0:
            return
        await self._store.end_spend(
            self.key,
            owner=self._owner,
            fence=fence,
            outcome=SpendEnd.ABORTED,
            refresh_fp=self._ordinary(memory.aborts.get((self._owner, fence))),
        )
        log.info("spend.abort_resolved", app=self.app, fence=fence)
        self.memory.abort_written(fence)

    @property
    def abort_unwritten(self) -> bool:
        """An abort of ours (or carried over in a reload) may not be in the store yet: the
        next `sync` writes it."""
        return self.memory.abort_unwritten

    def note_connection_lost(self) -> None:
        """The store connection (the subscription) dropped: evidence that the store may have
        forgotten, as a write-back that stored something is.

        A restart, a failover or a restore drops every connection, and may lose a `sent`
        record while the set it was spent from survives (nothing to write back, nothing to
        show it). The spender of that token, cut off by the same drop, re-subscribes within
        the watcher's backoff: until then nobody can veto a second spend of it, so for a while
        every spend waits the long objection window (swarm seed 5310: a rollback erased the
        record of a token sent 5 ms before, and another replica, whose command connection
        worked while its subscription was down, spent it again after a 40 ms window).
        """
        self._forgot_at = self._clock.monotonic()
        current = self._current()
        if current is not None:
            self._forgot_rank = max(self._forgot_rank, current.rank)

    def resend_aborts(self) -> None:
        """The store connection was (re)made: on the next sync, end again every spend of ours
        that ended without effect (`memory.aborts`), in case this primary kept its record."""
        self.memory.resend = bool(self.memory.aborts)

    async def _record_owner(self, refresh_fp: str) -> str | None:
        """Who made the store's spend record of `refresh_fp` (None: unknown, or ourselves);
        its fence too, when it is that owner's spend (not a veto's or a restored record).
        Raises _RecordGone when the store holds no record of `refresh_fp` (any more), and
        StoreUnavailable when it cannot be read."""
        record = await self._store.load_spend(self.key)
        if record is None or record.refresh_fp != refresh_fp:
            raise _RecordGone
        if record.restored:
            # An aborted grace retry restored it: it stands for the first spender's spend,
            # whose abort may still remove it, not for the retrier's (swarm seed 10135: the
            # retrier remembered it as nobody's spend and vetoed the next spend for good).
            assert record.orig_owner is not None
            if record.orig_owner == self._owner:
                return None
            if record.orig_fence > 0:
                self.memory.foreign_fences[refresh_fp] = (record.orig_owner, record.orig_fence)
            return record.orig_owner
        if record.owner == self._owner:
            return None
        if record.fence > 0 and not record.retry:
            self.memory.foreign_fences[refresh_fp] = (record.owner, record.fence)
        return record.owner

    def _settled(self, refresh_fp: str) -> bool:
        """No spend of ours of `refresh_fp` has an unknown outcome or is on the wire."""
        return refresh_fp not in self.memory.unknown and refresh_fp != self.in_flight

    async def _lift_vetoes_of_our_aborts(self, refresh_fp: str) -> bool:
        """The store answered UNKNOWN for `refresh_fp`: its record may stand for a spend of
        ours that ended without effect (a veto naming it, or a stale copy a split brain kept).
        End each such spend again; True when the record is gone."""
        spends = self.memory.aborts_of(refresh_fp)
        if not spends or not self._settled(refresh_fp):
            return False
        try:
            for owner, fence in spends:
                await self._store.end_spend(
                    self.key, owner=owner, fence=fence, outcome=SpendEnd.ABORTED
                )
            record = await self._store.load_spend(self.key)
        except StoreUnavailable:
            return False
        return record is None or record.refresh_fp != refresh_fp

    async def _owner_respends(self, refresh_fp: str) -> bool:
        """The announced spend of `refresh_fp` in the store is not to be vetoed: the one grace
        retry the store granted from its own record (H2), or its earlier spender's own next
        spend (the one replica that knows whether its last spend had an effect)."""
        foreign = self.memory.foreign.get(refresh_fp)
        record = await self._store.load_spend(self.key)
        if record is None or record.refresh_fp != refresh_fp or record.state != "announced":
            return False
        if record.retry:
            # The store checked the window on its own clock; we may know better.
            return not self._refuses_retry(refresh_fp)
        if (
            foreign is None
            or foreign[1] is None
            or refresh_fp in self.memory.unknown
            or record.owner != foreign[1]
        ):
            return False
        self.memory.resolved_foreign(refresh_fp)
        return True

    async def _veto_remembered(self, current: TokenSet) -> None:
        """Veto a spend of `current`'s refresh token that this replica knows was already sent.

        The spend notice is missed while this replica is cut off from the store; a replica
        that restarted meanwhile (and forgot) may be announcing the spend right now. The
        objection window outlasts the reconnect, so the veto lands before the token leaves.
        """
        refresh_fp = current.refresh_fingerprint
        remembered = refresh_fp is not None and self._remembers(refresh_fp)
        if (
            refresh_fp is not None
            and remembered
            and refresh_fp != self.in_flight
            and await self._owner_respends(refresh_fp)
        ):
            return  # its spender spends it again: it knows its last spend had no effect
        if (
            refresh_fp is not None
            # Judged again after the read above: an abort notice that came meanwhile resolved
            # the spend, and a veto would then stand for nothing, never to be lifted (swarm
            # seed 11103: a fresh spend announced right after the abort was vetoed for good).
            and self._remembers(refresh_fp)
            and await self._store.veto_spend(
                self.key, refresh_fp=refresh_fp, protects=self._protects(refresh_fp)
            )
        ):
            log.warning("grant.spend_vetoed", app=self.app, spender=None)

    # ---- one refresh -------------------------------------------------------------------------

    async def refresh(
        self,
        fetch: Fetch,
        *,
        is_due: Callable[[TokenSet], bool],
        servable_left: float,
        ignore_shared_failure: bool = False,
        read_first: bool = True,
    ) -> Outcome:
        """One refresh attempt under the protocol's rules (see the module docstring).

        Raises TokenEndpointError for a failed request whose outcome is known (the token, if
        one was presented, was not spent), and NoGrant when there is no refresh token.
        `read_first=False` skips the read before asking for the lease, for a caller that knows
        what the store holds (it just read it, or adopted the set a `token` notice carried):
        the holder reads again under the lease in any case, so it only saves a read.
        """
        if read_first:
            try:
                adopted = await self._adopt_newer(is_due)
            except StoreUnavailable as exc:
                if self._spends:
                    return _blocked(exc)
                return await self._fetch_alone(fetch, servable_left)
            if adopted is not None:
                return Adopted(adopted)
        if self._spends:
            blocked = self._spend_blocked(self._current())
            if blocked is not None:
                return blocked
        ttl = self.lease_ttl(servable_left)
        started = self._clock.monotonic()
        try:
            lease = await self._store.acquire_lease(self.key, self._owner, ttl)
        except StoreUnavailable as exc:
            if self._spends:
                return Blocked(f"store unavailable, not spending the refresh token: {exc}")
            return await self._fetch_alone(fetch, servable_left)
        if not lease.held:
            self._on_lease("busy")
            self.note_protocol(lease.protocol)
            return Busy(lease.busy_for)
        self._on_lease("acquired")
        try:
            return await self._under_lease(
                fetch,
                lease.fence,
                started + ttl,
                is_due=is_due,
                servable_left=servable_left,
                ignore_shared_failure=ignore_shared_failure,
            )
        finally:
            with contextlib.suppress(StoreUnavailable):
                await self._store.release_lease(self.key, self._owner, lease.fence)

    async def _adopt_newer(self, is_due: Callable[[TokenSet], bool]) -> TokenSet | None:
        """Adopt a stored set that outranks ours; return it when it is not yet due."""
        try:
            stored = await self._store.load(self.key)
        except UnreadableTokenSet as exc:
            self.note_rank(exc.rank)
            if self._spends:
                raise
            return None
        current = self._current()
        if stored is not None and (current is None or stored.rank > current.rank):
            self._note_written_back(stored.rank, stored.version)
            self._adopt(stored)
            if not is_due(stored):
                return stored
        return None

    async def _held_back(self, ignore_shared_failure: bool) -> Outcome | None:
        """The fleet's shared backoff, then its request budget: may we send a request now?"""
        record = await self._store.load_failure(self.key)
        self._shared_failure_seen = record is not None
        self.shared_failures = record.failures if record is not None else 0
        now = self._clock.time()
        if record is not None and record.not_before > now and not ignore_shared_failure:
            return Deferred(record.not_before, record.failures, record.error, record.permanent)
        if self._budget is not None:
            allowed, retry_after = await self._store.take_budget(self.key, self._budget, now)
            if not allowed:
                return OverBudget(retry_after)
        return None

    async def share_failure(
        self, *, failures: int, not_before: float, error: str, permanent: bool
    ) -> None:
        """Tell the fleet about our failed attempt, so every replica backs off with us."""
        with contextlib.suppress(StoreUnavailable):
            await self._store.record_failure(
                self.key, failures=failures, not_before=not_before, error=error, permanent=permanent
            )

    async def _clear_shared_failure(self) -> None:
        if self._shared_failure_seen:
            with contextlib.suppress(StoreUnavailable):
                await self._store.clear_failure(self.key)
            self._shared_failure_seen = False
            self.shared_failures = 0

    def _spend_blocked(self, current: TokenSet | None) -> Outcome | None:
        """Why the current refresh token may not be presented now, if it may not."""
        if current is None or not current.refresh_token:
            raise NoGrant("no refresh token; run token-broker authorize")
        protocol_blocked = self._protocol_blocked(current)
        if protocol_blocked is not None:
            return protocol_blocked
        if current.rank < self._seen_rank:
            return Blocked(
                f"a newer token set (generation {self._seen_rank[1]}) exists that this replica "
                "has not been able to read; not spending an older refresh token"
            )
        refresh_fp = current.refresh_fingerprint or ""
        if self.memory.is_unknown(refresh_fp) and not self._may_retry(refresh_fp):
            return OutcomeUnknown(
                "the last spend of this refresh token has no known outcome", refresh_fp
            )
        return None

    def _retry_window(self) -> float:
        """How long after a spend one retry is still inside the server's grace window: the
        window net of the longest objection window, the request budget and the round trips."""
        t = self.timing
        return max(0.0, self._grace - t.objection_idle - t.max_attempt - t.margin)

    def may_retry(self, refresh_fp: str) -> bool:
        """True when one grace retry of this unknown spend may still be started now."""
        return self._may_retry(refresh_fp)

    def _may_retry(self, refresh_fp: str) -> bool:
        """Inside a declared reuse grace window, one retry of an unknown spend is allowed.

        The window is counted from when the spend was sent (our own) or announced to us
        (another replica's), less the longest the retry itself may take.
        """
        if self._retry_window() <= 0 or refresh_fp in self.memory.retried:
            return False
        sent = self.memory.sent_time(refresh_fp)
        if sent is None:
            return True  # known only from the store's record, which carries its own time
        return self._clock.monotonic() - sent < self._retry_window()

    async def _under_lease(
        self,
        fetch: Fetch,
        fence: int,
        deadline: float,
        *,
        is_due: Callable[[TokenSet], bool],
        servable_left: float,
        ignore_shared_failure: bool,
    ) -> Outcome:
        """Holding the lease: re-read, repair, heed the fleet's backoff and budget, spend, commit."""
        try:
            adopted = await self._adopt_newer(is_due)
            if adopted is not None:
                return Adopted(adopted)
            if self._spends:
                await self.sync()  # the store must hold our set before we spend from it
            held_back = await self._held_back(ignore_shared_failure)
        except StoreUnavailable as exc:
            if self._spends:
                return _blocked(exc)
            return await self._fetch_alone(fetch, servable_left)
        if held_back is not None:
            return held_back
        current = self._current()
        if not self._spends:
            return await self._fetch_and_commit(fetch, current, fence, deadline)
        blocked = self._spend_blocked(current)
        if blocked is not None:
            return blocked
        assert current is not None
        return await self._spend(fetch, current, fence, deadline, servable_left)

    def objection_window(self, servable_left: float) -> float:
        """The objection window, shortened for a token with little servable time left.

        With nothing servable there is no hurry: the long window lets every replica that was
        cut off with the spender re-subscribe and object. The long window is also used for a
        while after evidence that the store forgot: the replicas that remember what it forgot
        (a spend in flight above all) were cut off by the same event.
        """
        if servable_left <= 0 or self.store_forgot_recently():
            return self.timing.objection_idle
        return min(self.timing.objection, servable_left / 4)

    def store_forgot_recently(self) -> bool:
        """True within `forgetful_for` seconds of evidence that the store forgot something,
        while the refresh token to spend is one that may have been in flight then.

        Once a newer set is held, the long window has done its work: that set's refresh token
        was issued after the forgetting, so no replica cut off by it can have it on the wire.
        Without this a fleet whose tokens live less than the long window would stop serving
        for `forgetful_for` after a store restart (every spend waiting past the expiry).
        """
        if self._clock.monotonic() - self._forgot_at >= self.timing.forgetful_for:
            return False
        current = self._current()
        return current is None or current.rank <= self._forgot_rank

    async def _spend(
        self, fetch: Fetch, current: TokenSet, fence: int, deadline: float, servable_left: float
    ) -> Outcome:
        refresh_fp = current.refresh_fingerprint or ""
        foreign = refresh_fp in self.memory.foreign
        if foreign and not self._may_retry(refresh_fp):
            # Another replica announced this spend and nothing resolved it: its outcome is
            # unknown to us even if the store has forgotten the record. It stays the spender's
            # to resolve (its abort, its next spend, or a newer set), so it is not added to
            # our own unknown spends: those are never forgiven.
            self.memory.unknown_foreign.add(refresh_fp)
            return OutcomeUnknown(
                "another replica spent this refresh token with no known outcome", refresh_fp
            )
        if self.stopping:
            return Busy(0.0)  # stopping: announce nothing
        objection = self.objection_window(servable_left)
        pre_send_left = (
            deadline - self.timing.persist - self.timing.margin - self._clock.monotonic()
        )
        if pre_send_left - objection < self.timing.min_attempt:
            # The window grew under this lease (our write-back just showed a forgetful store):
            # take a new lease sized for it rather than announce a spend that cannot be sent.
            return Busy(0.0)
        try:
            start = await self._store.begin_spend(
                self.key,
                owner=self._owner,
                fence=fence,
                token=current,
                retry_within=self._retry_window(),
                resolved_fence=self.memory.aborted_fence,
            )
        except StoreUnavailable as exc:
            return Blocked(f"store unavailable, spend not recorded: {exc}")
        if start is SpendStart.LOST:
            self._on_lease("lost")
            log.warning("lease.lost", app=self.app, fence=fence)
            return Busy(0.0)
        if start is SpendStart.STALE:
            return Busy(0.0)
        if start is SpendStart.UNKNOWN and await self._lift_vetoes_of_our_aborts(refresh_fp):
            log.info("spend.abort_resolved", app=self.app, lifted=True)
            return Busy(0.0)
        if start is SpendStart.UNKNOWN:
            # Another attempt's record (we reach begin_spend only for a token we remember no
            # unknown spend of): its spender may still resolve it, e.g. a spend whose
            # `mark_sent` answer was lost and that it never sent (its abort comes when the
            # store is back). Not our own unknown spend, which is never forgiven: remember it
            # as its owner's, whose abort, own next spend or a newer set clears it; we veto
            # any other replica's spend of it.
            if refresh_fp not in self.memory.foreign:
                try:
                    owner = await self._record_owner(refresh_fp)
                except _RecordGone:
                    # Resolved since our begin_spend read it (its spender's abort, whose
                    # notice we may miss while our subscription is not back, or a newer set):
                    # nothing unknown stands, and remembered without an owner it would be
                    # vetoed for good by us (swarm seeds 7116, 2038). Try again.
                    return Busy(0.0)
                except StoreUnavailable as exc:
                    # Whose it is is unknown, and remembered as nobody's it would be vetoed
                    # for good by us once its spender resolved it while we were cut off
                    # (door `record_owner_unread_in_a_flapping_store`). Look again later.
                    return Blocked(f"store unavailable, spend record not read: {exc}")
                self.memory.found_foreign(refresh_fp, owner, self._clock.monotonic())
            self.memory.unknown_foreign.add(refresh_fp)
            return OutcomeUnknown(
                "the store records a spend of this refresh token with no known outcome", refresh_fp
            )
        self.memory.began(self._owner, fence, refresh_fp, retry=start is SpendStart.RETRY)
        if start is SpendStart.RETRY:
            log.warning("grant.retrying_in_grace_window", app=self.app)
        # Objection window: a replica that knows a newer set writes it back now.
        if objection > 0:
            await self._objection_wait(objection)
            if self.stopping:
                return await self._abort_for_stop(fence)
            try:
                stored = await self._store.load(self.key)
            except StoreUnavailable as exc:
                await self._end_spend(fence, SpendEnd.ABORTED)
                return Blocked(f"store unavailable before sending, not spending: {exc}")
            if stored is None or stored.rank != current.rank:
                await self._end_spend(fence, SpendEnd.ABORTED)
                if stored is not None and stored.rank > current.rank:
                    self._adopt(stored)
                return Busy(0.0)
        lease_left = deadline - self.timing.persist - self.timing.margin - self._clock.monotonic()
        if lease_left < self.timing.min_attempt:
            await self._end_spend(fence, SpendEnd.ABORTED)
            return Busy(0.0)
        if self.stopping:
            return await self._abort_for_stop(fence)
        protocol_blocked = self._protocol_blocked(current)
        if protocol_blocked is not None:
            # A replica of a newer version announced itself during the objection window.
            await self._end_spend(fence, SpendEnd.ABORTED)
            return protocol_blocked
        try:
            # The fence is checked once more, atomically, right before the token leaves.
            sent = await self._store.mark_sent(self.key, owner=self._owner, fence=fence)
        except NotDurable as exc:
            # Only this primary holds the `sent` record: a failover may lose it, or this may be
            # the old primary of a split brain whose other side spends the same token (H4).
            await self._end_spend(fence, SpendEnd.ABORTED)
            log.warning("spend.not_durable", app=self.app, fence=fence, reason=str(exc))
            return Blocked(
                "no store replica acknowledged the spend record, not spending the refresh "
                f"token (a failover could lose the record): {exc}"
            )
        except StoreUnavailable as exc:
            await self._end_spend(fence, SpendEnd.ABORTED)
            return Blocked(f"store unavailable before sending, not spending: {exc}")
        if not sent:
            self._on_lease("lost")
            log.warning("lease.lost", app=self.app, fence=fence)
            return Busy(0.0)
        if self.lease_ran_out(deadline):
            # The answer came after the lease's time before sending ran out (a GC pause, a
            # stalled loop): the lease may be another's by now, and a store that forgot the
            # record meanwhile lets it spend this token. Not sent: end it without effect.
            await self._end_spend(fence, SpendEnd.ABORTED)
            self._on_lease("lost")
            log.warning("lease.lost", app=self.app, fence=fence, after="mark_sent")
            return Busy(0.0)
        sent_mono = self._clock.monotonic()
        self.in_flight, self._in_flight_fence = refresh_fp, fence
        try:
            # Once sent, never cancelled before the read timeout, even past the lease: the
            # server may act on it, and its answer is the only copy of the rotated token.
            # The commit is rank-based, so it is valid whenever the answer comes.
            fresh = await self._fetch_within(fetch, current.refresh_token, self.timing.read_timeout)
        except TransientTokenError as exc:
            if exc.outcome_unknown:
                self.memory.our_unknown(refresh_fp, sent_mono)
                await self._end_spend(fence, SpendEnd.UNKNOWN)
                return OutcomeUnknown(f"no answer to the refresh: {exc}", refresh_fp, exc)
            await self._end_spend(fence, SpendEnd.ABORTED)
            raise
        except PermanentTokenError as exc:
            if exc.is_invalid_grant:
                # We sent it and the server says it is spent or dead: a double spend (C1).
                self.memory.our_rejected(refresh_fp)
                await self._end_spend(fence, SpendEnd.UNKNOWN)
                return ReuseDetected(
                    "the server rejected a refresh token this replica sent (invalid_grant): "
                    "it was presented twice, or the grant was revoked",
                    refresh_fp,
                )
            await self._end_spend(fence, SpendEnd.ABORTED)
            raise
        finally:
            self.in_flight = None
        token = replace(
            fresh,
            lineage=current.lineage,
            generation=current.generation + 1,
            refresh_token=fresh.refresh_token or current.refresh_token,
        )
        return await self._commit(token, fence, sent_mono)

    def lease_ran_out(self, deadline: float) -> bool:
        """True when the lease ending at `deadline` (monotonic) no longer covers a send: its
        time before sending (all but the commit and the margin) is over."""
        return deadline - self.timing.persist - self.timing.margin - self._clock.monotonic() < 0

    async def _fetch_and_commit(
        self, fetch: Fetch, current: TokenSet | None, fence: int, deadline: float
    ) -> Outcome:
        timeout = max(
            self.timing.min_attempt,
            deadline - self.timing.persist - self.timing.margin - self._clock.monotonic(),
        )
        sent_mono = self._clock.monotonic()
        fresh = await self._fetch_within(fetch, None, timeout)
        return await self._commit(self._next_rank(fresh, current), fence, sent_mono)

    async def _fetch_alone(self, fetch: Fetch, servable_left: float) -> Outcome:
        """Client credentials with the store down: refresh without it, write back later."""
        sent_mono = self._clock.monotonic()
        fresh = await self._fetch_within(fetch, None, self.attempt_timeout(servable_left))
        return Fetched(self._next_rank(fresh, self._current()), False, sent_mono)

    @staticmethod
    def _next_rank(fresh: TokenSet, current: TokenSet | None) -> TokenSet:
        base = current.rank if current is not None else (0, 0)
        return replace(fresh, lineage=base[0], generation=base[1] + 1)

    async def _commit(self, token: TokenSet, fence: int, sent_mono: float) -> Outcome:
        token = stamped(token, self._clock)  # in the earliest frame the fleet clock allows (M3)
        try:
            commit = await self._store.commit(self.key, token, fence=fence)
        except StoreUnavailable:
            # Maybe applied, maybe not: keep it and write it back (a repeat is recognised).
            return Fetched(token, False, sent_mono)
        self.note_rank(commit.rank)
        self._note_durable(token, commit)
        if commit.stored:
            await self._clear_shared_failure()
            return Fetched(replace(token, version=commit.version), True, sent_mono)
        # A set of equal or higher rank is stored (a new authorization, or a client-credentials
        # replica that refreshed alone): ours is valid but not the newest; take the stored one.
        with contextlib.suppress(StoreUnavailable):
            stored = await self._store.load(self.key)
            if stored is not None and stored.rank >= token.rank:
                self._adopt(stored)
                return Adopted(stored)
        return Fetched(token, False, sent_mono)

    async def _end_spend(self, fence: int, outcome: SpendEnd) -> None:
        refresh_fp = None
        if outcome is SpendEnd.ABORTED:
            # Our next begin_spend may replace the record: the abort may not be stored, or a
            # failover may bring the record back (only `sent` is waited for, not the abort).
            current = self._current()
            refresh_fp = current.refresh_fingerprint if current is not None else None
            self.memory.aborted(self._owner, fence, refresh_fp)
        with contextlib.suppress(StoreUnavailable):
            await self._store.end_spend(
                self.key,
                owner=self._owner,
                fence=fence,
                outcome=outcome,
                refresh_fp=self._ordinary(refresh_fp),
            )

    def _ordinary(self, refresh_fp: str | None) -> str | None:
        """`refresh_fp`, when our aborted spend of it was an ordinary one (not a grace retry
        of an unknown spend): the store keeps and announces such an abort even when it forgot
        the record. The abort of a retry says nothing of the spend it retried."""
        if refresh_fp is None or refresh_fp in self.memory.retried:
            return None
        return None if self.memory.is_unknown(refresh_fp) else refresh_fp

    async def _fetch_within(
        self, fetch: Fetch, refresh_token: str | None, budget: float
    ) -> TokenSet:
        """`fetch`, bounded by `budget` seconds on the injected clock (no answer: outcome unknown)."""
        request = asyncio.ensure_future(fetch(refresh_token))
        await wait_within(self._clock, request, budget, cancel_late=True)
        if request.cancelled():
            raise TransientTokenError(
                f"no answer within {budget:.1f} s", outcome_unknown=refresh_token is not None
            )
        return request.result()

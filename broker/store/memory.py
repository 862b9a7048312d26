"""The in-process store: the `memory://` store for one broker, and the fake for tests.

It follows the same rules as the Redis store's Lua scripts (see broker/store/__init__.py), so
the simulation and the unit tests exercise the protocol the fleet really runs.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from broker.clock import Clock
from broker.errors import NotDurable, StoreUnavailable
from broker.model import PROTOCOL_VERSION, FailureRecord, TokenSet
from broker.policy import fleet_jitter_sample
from broker.store import (
    ABORTS_KEPT,
    BUDGET_WINDOW,
    FAILURE_RETENTION,
    HEARTBEAT,
    LEASE,
    LOWERED,
    REFUSED,
    RELEASE,
    Commit,
    Lease,
    Notice,
    Refusal,
    SpendEnd,
    SpendRecord,
    SpendStart,
)
from broker.store.facts import StoredFacts, StoredLease, StoredSet, StoredSpend

# Every heartbeat is the same notice (immutable): made once.
_HEARTBEAT_NOTICE = Notice(app="", kind=HEARTBEAT)


@dataclass(slots=True)
class _Spend:
    fence: int
    owner: str
    refresh_fp: str
    rank: tuple[int, int]
    state: str = "announced"  # then "sent", then (no answer) "unknown"; or "vetoed"
    retries: int = 0
    sent_at: float = 0.0
    # A grace retry's record: when the unknown spend it retries was sent (restored on abort).
    orig_sent_at: float | None = None
    # ...and whose spend, under which fence, it retries: that spender may still say it never
    # sent it (its `mark_sent` answer was lost), which makes the retry a first spend.
    orig_owner: str | None = None
    orig_fence: int = 0


@dataclass(slots=True)
class MemoryState:
    """Everything the store holds: what a snapshot captures and a rollback restores."""

    tokens: dict[str, TokenSet] = field(default_factory=dict)
    # app → (owner, fence, expiry on the monotonic clock, the holder's protocol version)
    leases: dict[str, tuple[str, int, float, int]] = field(default_factory=dict)
    fences: dict[str, int] = field(default_factory=dict)
    spends: dict[str, _Spend] = field(default_factory=dict)
    # app → (the refused access token's fingerprint, until when on the monotonic clock)
    refused: dict[str, tuple[str, float]] = field(default_factory=dict)
    # app → (owner, fence, refresh fingerprint) of the recent spends their spenders ended as
    # aborted (their records removed), the newest first, at most ABORTS_KEPT: a veto that
    # stands for one of them alone is refused (`veto_spend`), as RedisStore's `:aborts`.
    aborted: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)


def _copy(state: MemoryState) -> MemoryState:
    """A deep copy of `state`, as copy.deepcopy makes it, without its generic walk (the
    simulation snapshots the store at every acknowledged write): new dicts, lists and spend
    records; the token sets (immutable, see TokenSet.__deepcopy__), the strings, numbers and
    tuples of them are shared."""
    return MemoryState(
        tokens=dict(state.tokens),
        leases=dict(state.leases),
        fences=dict(state.fences),
        spends={app: replace(spend) for app, spend in state.spends.items()},
        refused=dict(state.refused),
        aborted={app: list(aborts) for app, aborts in state.aborted.items()},
    )


class MemoryStore:
    """Implements TokenStore in memory. Set `fail = True` to simulate an outage.

    `protocol` is the fleet protocol version its writes carry (stored sets, leases, notices),
    as the Redis store's scripts carry the version of the code that runs them; the simulation
    sets it while a replica of another version writes.

    `require_replica_ack` models a Redis store that WAITs for a replica after `mark_sent`;
    `replicas_acknowledge = False` then models a primary no replica acknowledges (its replicas
    down or cut off, as on the old primary of a split brain): `mark_sent` applies the record and
    raises NotDurable, as RedisStore does.
    """

    def __init__(self, clock: Clock, *, require_replica_ack: bool = False) -> None:
        self._clock = clock
        self.require_replica_ack = require_replica_ack
        self.replicas_acknowledge = True
        self.protocol = PROTOCOL_VERSION
        self.state = MemoryState()
        # Published to in the order they subscribed (a set's order follows memory addresses,
        # which differ from run to run: a simulated seed must replay alike).
        self._subscribers: dict[asyncio.Queue[Notice | None], None] = {}
        self._failures: dict[str, FailureRecord] = {}
        self._budgets: dict[str, collections.deque[float]] = {}
        self.fail = False

    def _check(self) -> None:
        if self.fail:
            raise StoreUnavailable("memory store: simulated outage")

    def _publish(self, notice: Notice) -> None:
        for queue in self._subscribers:
            queue.put_nowait(notice)

    # ---- snapshots, for tests that roll the store back or empty it ------------------------

    def snapshot(self) -> MemoryState:
        """A copy of everything stored."""
        return _copy(self.state)

    def restore(self, state: MemoryState) -> None:
        """Replace everything stored (a rollback to a snapshot, or an empty restart)."""
        self.state = _copy(state)

    # ---- TokenStore ----------------------------------------------------------------------

    async def load(self, app: str) -> TokenSet | None:
        """The stored token set, or None."""
        self._check()
        return self.state.tokens.get(app)

    async def load_many(self, apps: Sequence[str]) -> dict[str, TokenSet]:
        """The stored sets of `apps` that exist."""
        self._check()
        return {app: self.state.tokens[app] for app in apps if app in self.state.tokens}

    async def commit(self, app: str, token: TokenSet, *, fence: int = 0) -> Commit:
        """Store `token` if it outranks the stored set; resolve older spend records."""
        self._check()
        current = self.state.tokens.get(app)
        if current is not None:
            if current.rank == token.rank and current.access_token == token.access_token:
                return Commit(True, current.version, current.rank, self._wait_for_replica())
            if current.rank >= token.rank:
                return Commit(False, current.version, current.rank)
        version = (current.version if current is not None else 0) + 1
        self.state.tokens[app] = replace(token, version=version, protocol=self.protocol)
        spend = self.state.spends.get(app)
        if spend is not None and spend.rank < token.rank:
            del self.state.spends[app]
        self._publish(
            Notice(
                app,
                "token",
                version=version,
                rank=token.rank,
                protocol=self.protocol,
                token=self.state.tokens[app],
            )
        )
        return Commit(True, version, token.rank, self._wait_for_replica())

    async def acquire_lease(self, app: str, owner: str, ttl: float) -> Lease:
        """Take the lease unless another owner holds an unexpired one; announce a grant."""
        self._check()
        now = self._clock.monotonic()
        holder = self.state.leases.get(app)
        if holder is not None and holder[2] > now and holder[0] != owner:
            return Lease(0, busy_for=holder[2] - now, protocol=holder[3])
        fence = self.state.fences.get(app, 0) + 1
        self.state.fences[app] = fence
        self.state.leases[app] = (owner, fence, now + ttl, self.protocol)
        self._publish(Notice(app, LEASE, owner=owner, protocol=self.protocol, ttl=ttl))
        return Lease(fence)

    def _holds(self, app: str, owner: str, fence: int) -> bool:
        holder = self.state.leases.get(app)
        return (
            holder is not None
            and holder[0] == owner
            and holder[1] == fence
            and holder[2] > self._clock.monotonic()
        )

    async def release_lease(self, app: str, owner: str, fence: int) -> None:
        """Release the lease if `owner` holds it under `fence` (and announce that)."""
        self._check()
        if self._holds(app, owner, fence):
            del self.state.leases[app]
            self._publish(Notice(app, RELEASE, owner=owner, protocol=self.protocol))

    async def begin_spend(
        self,
        app: str,
        *,
        owner: str,
        fence: int,
        token: TokenSet,
        retry_within: float = 0.0,
        resolved_fence: int = 0,
    ) -> SpendStart:
        """Announce the spend if the lease and the stored set allow it (see TokenStore)."""
        self._check()
        if not self._holds(app, owner, fence):
            return SpendStart.LOST
        current = self.state.tokens.get(app)
        if current is None or current.rank != token.rank:
            return SpendStart.STALE
        refresh_fp = token.refresh_fingerprint or ""
        spend = self.state.spends.get(app)
        answer = SpendStart.OK
        retries = 0
        orig_sent_at: float | None = None
        orig: tuple[str | None, int] = (None, 0)
        # A spend is its owner and fence: fences repeat once the store loses its counter (an
        # eviction of it and the lease, a rollback), and another owner's record under our fence
        # is another spend (swarm seed 75139: an eviction took the counter and the lease right
        # after a send; the next holder got fence 1 again and replaced the `sent` record).
        ours = (spend.fence, spend.owner) == (fence, owner) if spend is not None else False
        if spend is not None and spend.refresh_fp == refresh_fp and not ours:
            if spend.state == "vetoed" or spend.orig_sent_at is not None:
                # Vetoed, or the one grace retry of an unknown spend is under way: whatever
                # fence the caller names, the token stays blocked.
                return SpendStart.UNKNOWN
            # Fence 0 names no spend (fences start at 1): a record under it (a restored grace
            # retry) is nobody's to resolve, its retrier's included (seed 177).
            if spend.state != "announced" and not (
                resolved_fence > 0 and spend.fence == resolved_fence and spend.owner == owner
            ):
                age = self._clock.monotonic() - spend.sent_at
                # A negative age is a clock that stepped back: not inside any window.
                if spend.retries > 0 or age < 0 or age >= retry_within:
                    return SpendStart.UNKNOWN
                answer, retries, orig_sent_at = SpendStart.RETRY, 1, spend.sent_at
                orig = (spend.owner, spend.fence)
        self.state.spends[app] = _Spend(
            fence,
            owner,
            refresh_fp,
            token.rank,
            retries=retries,
            orig_sent_at=orig_sent_at,
            orig_owner=orig[0],
            orig_fence=orig[1],
        )
        self._publish(
            Notice(
                app,
                "spend",
                rank=token.rank,
                refresh_fp=refresh_fp,
                owner=owner,
                retry=answer is SpendStart.RETRY,
                protocol=self.protocol,
            )
        )
        return answer

    async def mark_sent(self, app: str, *, owner: str, fence: int) -> bool:
        """Mark our announced spend sent, if the lease and the record are still ours."""
        self._check()
        spend = self.state.spends.get(app)
        if (
            not self._holds(app, owner, fence)
            or spend is None
            or (spend.fence, spend.owner) != (fence, owner)
        ):
            return False
        spend.state = "sent"
        spend.sent_at = self._clock.monotonic()
        self._publish(
            Notice(
                app,
                "sent",
                rank=spend.rank,
                refresh_fp=spend.refresh_fp,
                owner=owner,
                protocol=self.protocol,
                fence=fence,
            )
        )
        if self.require_replica_ack and not self._replica_acknowledged():
            raise NotDurable("memory store: no replica acknowledged the spend record")
        return True

    def _replica_acknowledged(self) -> bool:
        """Whether a replica acknowledged the last write (WAIT 1 answered 1)."""
        return self.replicas_acknowledge

    def _wait_for_replica(self) -> bool:
        """After a commit or an abort: True when no acknowledgement is required or a replica
        acknowledged the write (WAIT 1, as RedisStore does after those with
        `require_replica_ack`)."""
        return not self.require_replica_ack or self._replica_acknowledged()

    async def load_spend(self, app: str) -> SpendRecord | None:
        """The spend record, or None."""
        self._check()
        spend = self.state.spends.get(app)
        if spend is None:
            return None
        retry = spend.orig_sent_at is not None
        return SpendRecord(
            spend.owner,
            spend.refresh_fp,
            spend.state,
            retry,
            spend.fence,
            orig_owner=spend.orig_owner,
            orig_fence=spend.orig_fence,
        )

    async def veto_spend(
        self, app: str, *, refresh_fp: str, protects: tuple[str, int] | None = None
    ) -> bool:
        """Turn an announced spend of `refresh_fp` into an unknown one under no fence, while its
        spender holds the lease (without it the spend can never be sent: left alone), naming
        the spend it `protects` (a vetoed grace retry names the spend it retried)."""
        self._check()
        spend = self.state.spends.get(app)
        if spend is None or spend.refresh_fp != refresh_fp or spend.state != "announced":
            return False
        if not self._holds(app, spend.owner, spend.fence):
            return False
        if (
            protects is not None
            and protects[1] != 0
            and (*protects, refresh_fp) in self.state.aborted.get(app, ())
        ):
            return False  # the one spend it stands for ended without effect, says the store
        if protects is not None and spend.owner == protects[0]:
            return False  # that spend's own spender spends again: it knows it had no effect
        spend.fence, spend.state, spend.retries = 0, "vetoed", 1
        if spend.orig_sent_at is not None:
            spend.sent_at, spend.orig_sent_at = spend.orig_sent_at, None
        elif protects is not None:
            spend.orig_owner, spend.orig_fence = protects
        return True

    async def end_spend(
        self,
        app: str,
        *,
        owner: str,
        fence: int,
        outcome: SpendEnd,
        refresh_fp: str | None = None,
    ) -> None:
        """Remove (aborted) or mark (unknown) our spend record under `fence`.

        With `require_replica_ack` every abort waits for a replica, whatever it found (as
        RedisStore's WAIT after the script): NotDurable when none acknowledged.
        """
        self._check()
        spend = self.state.spends.get(app)
        if spend is None:
            if outcome is not SpendEnd.ABORTED:
                return
            if any(kept[:2] == (owner, fence) for kept in self.state.aborted.get(app, ())):
                self._abort_acknowledged()  # applied already: asked again (the drain's retry)
            elif refresh_fp and fence > 0:
                # The store forgot the record: keep the abort anyway, and announce it (naming
                # the fence: an abort that lands late must not pass for a later spend's).
                self._remember_abort(app, owner, fence, refresh_fp)
                self._publish(
                    Notice(
                        app,
                        "abort",
                        refresh_fp=refresh_fp,
                        owner=owner,
                        protocol=self.protocol,
                        fence=fence,
                    )
                )
                # As RedisStore's WAIT after the script, whatever it found: an abort kept
                # only on this primary is lost by a failover (it said it was acknowledged).
                self._abort_acknowledged()
            else:
                # Nothing of ours here: an answer a replica must hold too (below).
                self._abort_acknowledged()
            return
        if spend.fence != fence or spend.owner != owner:
            if outcome is not SpendEnd.ABORTED:
                return
            stands_for_ours = spend.orig_owner == owner
            if self._retried_spend_never_sent(app, owner, fence):
                self._publish(
                    Notice(
                        app,
                        "abort",
                        rank=spend.rank,
                        refresh_fp=spend.refresh_fp,
                        owner=owner,
                        protocol=self.protocol,
                    )
                )
            elif (
                not stands_for_ours
                and refresh_fp
                and fence > 0
                and (owner, fence, refresh_fp) not in self.state.aborted.get(app, ())
            ):
                # The store forgot our record (an eviction, a restart) and another spend of
                # the token began before our abort: keep the abort as when no record is left,
                # so that a veto standing for our spend alone is refused. A bystander that had
                # read our record vetoed the new spend in our name after our abort, and only
                # we, exited since, could have lifted it (beside swarm seed 56916). No notice:
                # the record is another spend's, which a replica that heard its `sent` notice
                # must not forget.
                self._remember_abort(app, owner, fence, refresh_fp)
            # Another spend's record: ours is settled only if a replica holds what this
            # primary says. A split brain's old primary, where a later spend began after our
            # abort, answers so too, and its heal discards both (swarm seed 25279).
            self._abort_acknowledged()
            return
        if outcome is SpendEnd.ABORTED:
            retry_aborted = spend.orig_sent_at is not None
            retried = None
            if retry_aborted:
                # The retry had no effect, the spend it retried is still unknown: restore it.
                assert spend.orig_sent_at is not None
                spend.fence, spend.state, spend.retries = 0, "unknown", 1
                spend.sent_at, spend.orig_sent_at = spend.orig_sent_at, None
                if spend.orig_owner is not None:
                    retried = (spend.orig_owner, spend.orig_fence)
            else:
                del self.state.spends[app]
                self._remember_abort(app, spend.owner, spend.fence, spend.refresh_fp)
            self._publish(
                Notice(
                    app,
                    "abort",
                    rank=spend.rank,
                    refresh_fp=spend.refresh_fp,
                    owner=spend.owner,
                    retry_aborted=retry_aborted,
                    protocol=self.protocol,
                    retried=retried,
                )
            )
            self._abort_acknowledged()
        else:
            spend.state = "unknown"

    def _remember_abort(self, app: str, owner: str, fence: int, refresh_fp: str) -> None:
        """Keep an aborted spend among the app's recent ones (the newest first)."""
        kept = self.state.aborted.setdefault(app, [])
        kept.insert(0, (owner, fence, refresh_fp))
        del kept[ABORTS_KEPT:]

    def _abort_acknowledged(self) -> None:
        """NotDurable when an abort must be acknowledged by a replica and none did."""
        if not self._wait_for_replica():
            raise NotDurable("memory store: no replica acknowledged the abort")

    def _retried_spend_never_sent(self, app: str, owner: str, fence: int) -> bool:
        """`owner`'s spend under `fence` ended without effect, and `spend` is the grace retry
        of it (or the record such a retry restored when it aborted): the retry is a first
        spend after all (announced: an ordinary spend now; restored: removed). True when the
        record changed so that the others may forget `owner`'s spend (an abort notice); a
        retry already sent stays as it is apart from that (the others keep it unknown)."""
        spend = self.state.spends[app]
        if fence == 0 or spend.orig_owner != owner:
            return False
        # A veto names fence 0 when its replica knew the spend from a notice (no fence): it
        # stands for every spend of that owner's, whose every spend of the token is settled.
        if spend.orig_fence != fence and not (spend.state == "vetoed" and spend.orig_fence == 0):
            return False
        if spend.orig_sent_at is not None and spend.state in ("announced", "sent"):
            spend.orig_sent_at, spend.orig_owner, spend.orig_fence = None, None, 0
            spend.retries = 0
            return spend.state == "announced"
        if spend.orig_sent_at is None and spend.state in ("unknown", "vetoed") and spend.fence == 0:
            # Restored by the retry's abort, or a veto that stood for that spend alone.
            del self.state.spends[app]
            return True
        return False

    async def refuse_token(self, app: str, access_fp: str, *, interval: float) -> Refusal:
        """Record a refusal of the stored set's access token (see TokenStore.refuse_token)."""
        self._check()
        current = self.state.tokens.get(app)
        if current is None or current.fingerprint != access_fp:
            return Refusal.STALE
        now = self._clock.monotonic()
        held = self.state.refused.get(app)
        if held is not None and held[1] > now:
            return Refusal.ALREADY if held[0] == access_fp else Refusal.LIMITED
        self.state.refused[app] = (access_fp, now + interval)
        self._publish(Notice(app, REFUSED, access_fp=access_fp, protocol=self.protocol))
        return Refusal.RECORDED

    async def lower_expiry(
        self, app: str, token: TokenSet, expires_at: float, *, owner: str | None = None
    ) -> bool:
        """Lower the stored set's expiry if it is `token`'s (see TokenStore.lower_expiry)."""
        self._check()
        current = self.state.tokens.get(app)
        if (
            current is None
            or current.rank != token.rank
            or current.fingerprint != token.fingerprint
            or expires_at >= current.expires_at
        ):
            return False
        # (The Redis store keeps the bound beside the encrypted set; a read answers the same.)
        self.state.tokens[app] = current.expiring_at(expires_at)
        self._publish(
            Notice(
                app,
                LOWERED,
                rank=current.rank,
                owner=owner,
                access_fp=current.fingerprint,
                protocol=self.protocol,
            )
        )
        return True

    async def updates(self) -> AsyncIterator[Notice]:
        """Notices of commits and spends, as they happen."""
        self._check()
        queue: asyncio.Queue[Notice | None] = asyncio.Queue()
        self._subscribers[queue] = None
        try:
            while True:
                notice = await queue.get()
                if notice is None:
                    return
                self._check()
                yield notice
        finally:
            self._subscribers.pop(queue, None)

    async def heartbeat(self) -> None:
        """Publish a heartbeat notice."""
        self._check()
        self._publish(_HEARTBEAT_NOTICE)

    # ---- one clock, one backoff and one budget for the fleet ------------------------------

    async def server_time(self) -> float:
        """This process's clock: in memory, the local clock is the reference."""
        self._check()
        return self._clock.time()

    async def record_failure(
        self, app: str, *, failures: int, not_before: float, error: str, permanent: bool
    ) -> None:
        """Keep the failure record (it lapses FAILURE_RETENTION after `not_before`)."""
        self._check()
        self._failures[app] = FailureRecord(failures, not_before, error, permanent)

    async def load_failure(self, app: str) -> FailureRecord | None:
        """The failure record, or None when there is none or it has lapsed."""
        self._check()
        record = self._failures.get(app)
        if record is not None and self._clock.time() >= record.not_before + FAILURE_RETENTION:
            del self._failures[app]
            return None
        return record

    async def clear_failure(self, app: str) -> None:
        """Forget the failure record."""
        self._check()
        self._failures.pop(app, None)

    async def take_budget(self, app: str, limit_per_minute: int, now: float) -> tuple[bool, float]:
        """A sliding window of request times per app."""
        self._check()
        window = self._budgets.setdefault(app, collections.deque())
        while window and window[0] <= now - BUDGET_WINDOW:
            window.popleft()
        if len(window) < limit_per_minute:
            window.append(now)
            return True, 0.0
        return False, window[0] + BUDGET_WINDOW - now

    # ---- status ----------------------------------------------------------------------------

    async def read_time(self) -> float:
        """This process's clock, as `server_time`."""
        return await self.server_time()

    async def inspect(self, name: str, now: float) -> StoredFacts:
        """What is held under `name`, as RedisStore.inspect describes it (nothing changes)."""
        self._check()
        token = self.state.tokens.get(name)
        stored = None
        if token is not None:
            stored = StoredSet(
                token.version,
                token.rank,
                token.protocol,
                token.expires_at,
                token.issued_at,
                jitter=fleet_jitter_sample(token),
            )
        held = self.state.leases.get(name)
        lease = None
        if held is not None and held[2] > self._clock.monotonic():
            owner, fence, until, protocol = held
            lease = StoredLease(owner, fence, protocol, until - self._clock.monotonic())
        spend = self.state.spends.get(name)
        record = self._failures.get(name)
        if record is not None and now >= record.not_before + FAILURE_RETENTION:
            record = None
        window = self._budgets.get(name, ())
        return StoredFacts(
            name=name,
            now=now,
            token=stored,
            lease=lease,
            fence=self.state.fences.get(name, 0),
            spend=None
            if spend is None
            else StoredSpend(
                spend.state,
                spend.owner,
                spend.fence,
                spend.rank,
                spend.retries,
                # sent_at is monotonic here: told as the store's time of sending
                now - (self._clock.monotonic() - spend.sent_at)
                if spend.state != "announced"
                else None,
            ),
            failure=record,
            failure_unreadable=False,
            budget_used=sum(1 for at in window if at > now - BUDGET_WINDOW),
        )

    async def ping(self) -> None:
        """Raise StoreUnavailable while failing."""
        self._check()

    async def close(self) -> None:
        """End every updates() iterator."""
        for queue in self._subscribers:
            queue.put_nowait(None)

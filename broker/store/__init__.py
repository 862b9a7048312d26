"""The TokenStore protocol: where token sets are shared between replicas and kept across restarts.

Besides one token set per app, the store keeps what the fleet protocol (broker/fleet/) needs
to spend a refresh token at most once: a lease with a fence number, and a spend record. The
rules each operation follows are in docs/architecture.md; MemoryStore and RedisStore implement
them identically, and tests/integration/test_store_contract.py holds both to them.

The store plays six roles, each a protocol of its own (as `fleetclock.ServerClock` is):
`TokenSets` (the stored sets), `SpendLedger` (the lease and the spend record), `Notices` (the
channel of changes), `FleetSignals` (the shared backoff and budget), `ServerClock` (the
fleet's reference time) and `Lifecycle`. A consumer asks only for the roles it uses;
`TokenStore` is all six, what the two stores implement.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from broker.fleetclock import ServerClock
from broker.model import PROTOCOL_VERSION, AppSpec, FailureRecord, TokenSet

# How long a failure record outlives its `not_before`: the next lease holder continues the count
# of consecutive failures (and so the backoff) instead of starting over. A success clears it.
FAILURE_RETENTION = 3600.0
# The sliding window of the fleet-wide token request budget, in seconds.
BUDGET_WINDOW = 60.0
# How many recent aborted spends a store keeps per app (the newest first, for a day): a veto
# that stands for one of them alone is refused, as its abort notice was missed (issue 20, swarm
# seed 30624: a bystander on a split brain's old primary missed an abort that three later
# aborts had pushed out of a memory of one).
ABORTS_KEPT = 32
# The kind of a notice that says nothing but "the channel works" (see `TokenStore.heartbeat`).
HEARTBEAT = "heartbeat"
# The kinds of the notices of a lease granted (with its ttl) and released: a replica that hears
# another's grant waits for that holder's notice instead of asking for the lease itself.
LEASE = "lease"
RELEASE = "release"
# The kind of the notice of an access token the upstream refused (`TokenStore.refuse_token`):
# `access_fp` names it, and every replica still holding it treats it as due now (issue 22).
REFUSED = "refused"
# The kind of the notice of a stored expiry lowered (`TokenStore.lower_expiry`): `rank` and
# `access_fp` name the set, and every replica that holds it reads the store to take the lower
# expiry at once, not at its next periodic look (swarm seeds 68595, 80253).
LOWERED = "lowered"


class Refusal(enum.StrEnum):
    """The answer to `refuse_token`."""

    RECORDED = "recorded"  # the stored set is the refused one: recorded and announced
    ALREADY = "already"  # another replica reported this token first: its purge is under way
    STALE = "stale"  # the stored set is another (newer) one, or none: nothing to purge
    LIMITED = "limited"  # another token of the app was purged less than `interval` ago


def client_binding(spec: AppSpec, client_id: str | None) -> str:
    """A short hash of what an app's token sets belong to (issue 20, M6).

    Token URL, client id, grant, scopes (as a set) and audience/resource: a set fetched under
    one of them is no use under another (another client's, or another server's). The store
    keeps each binding's set, lease and spend record under its own name (`bound_name`), and the
    Redis store binds the encrypted set to that name, so two fleets sharing a store and a key
    prefix never see each other's sets.
    """
    material = json.dumps(
        [
            spec.token_url,
            client_id or "",
            spec.grant_type.value,
            sorted(set(spec.scopes)),
            spec.audience or "",
            spec.extra_params.get("resource", ""),
        ],
        separators=(",", ":"),
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def bound_name(app: str, binding: str) -> str:
    """The name the store knows an app's set by: the app and its client binding.

    App names are `[a-z0-9_-]`, so the `@` never occurs in one; a name without it is the
    unbound name a release before the binding used (RedisStore moves such a set once).
    """
    return f"{app}@{binding}"


@dataclass(frozen=True, slots=True)
class Lease:
    """The answer to a lease request: `fence` > 0 when it is ours, else how long it stays busy."""

    fence: int
    busy_for: float = 0.0
    # When busy: the protocol version of the replica holding it.
    protocol: int = PROTOCOL_VERSION

    @property
    def held(self) -> bool:
        """True when the lease was granted."""
        return self.fence > 0


@dataclass(frozen=True, slots=True)
class Commit:
    """The answer to a commit: whether our set was stored, and the set's stored rank.

    `durable` is False when the store requires a replica's acknowledgement
    (`store.require_replica_ack`) and none came: the set is on the primary only, where a
    failover may lose it (issue 20, swarm seeds 21255, 21685, 27519).
    """

    stored: bool
    version: int
    rank: tuple[int, int]
    durable: bool = True


class SpendStart(enum.StrEnum):
    """The answer to `begin_spend`."""

    OK = "ok"  # recorded as announced: the holder marks it sent, then presents the token
    RETRY = "retry"  # recorded as the one retry a grace window allows
    LOST = "lost"  # the lease is not (or no longer) ours under this fence
    STALE = "stale"  # the stored set is not the one we meant to spend
    UNKNOWN = "unknown"  # another attempt spent this token and its outcome is unknown


class SpendEnd(enum.StrEnum):
    """How a spend ended without a new set to commit."""

    ABORTED = "aborted"  # the server did not act on it (or it was never sent): not spent
    UNKNOWN = "unknown"  # it may have been acted on: the outcome is unknown


@dataclass(frozen=True, slots=True)
class SpendRecord:
    """The stored spend record, as `load_spend` reads it: whose, of which refresh token, its
    state (`announced`, `sent`, `unknown` or `vetoed`), and whether it is the one grace retry
    the store granted (nobody vetoes that). `fence` is the spend's (0 once vetoed or
    restored); it is not compared: two reads of one spend are equal. `orig_owner` and
    `orig_fence` name the spend a grace retry retries, or the one its abort restored the
    record of (state `unknown`, fence 0: its owner is the retrier, the spend is the first
    spender's), or the one a veto stands for; None and 0 when none (not compared either)."""

    owner: str
    refresh_fp: str
    state: str
    retry: bool = False
    fence: int = field(default=0, compare=False)
    orig_owner: str | None = field(default=None, compare=False)
    orig_fence: int = field(default=0, compare=False)

    @property
    def restored(self) -> bool:
        """The record an aborted grace retry restored: it stands for the first spender's
        spend (`orig_owner`, `orig_fence`), not its owner's, the retrier."""
        return self.state == "unknown" and self.fence == 0 and self.orig_owner is not None


@dataclass(frozen=True, slots=True)
class Notice:
    """A change another replica (or `authorize`) made, as published to every replica.

    `kind` is "token" (a set was committed), "spend" (a refresh token is about to be spent:
    a replica that knows a newer set writes it back now), "sent" (it is being presented) or
    "abort" (that spend ended without effect). `rank` is the committed set's, or for spends the
    rank of the set whose refresh token is spent; `refresh_fp` names that refresh token.
    `retry` marks the spend of a grace retry the store granted (nobody vetoes it);
    `retry_aborted` an abort of such a retry: the spend it retried is still unknown, and
    `retried` names that spend (owner, fence; absent from a release before it): a replica that
    remembered the spend as the retrier's remembers it as that one's (swarm seed 30624).
    `fence` is the spend's fence on a "sent" notice (0 elsewhere, and from a release before
    it): a replica that vetoes a later spend of that token for it names that spend exactly,
    so the store can tell when its spender ended it as aborted (`veto_spend`). An "abort"
    notice of a spend whose record the store no longer held names it too: a replica that
    knows a later spend of that spender's (another fence) ignores it.
    `protocol` is the fleet protocol version of the replica that made the change (absent on
    the wire: 1). "lease" (LEASE) says `owner` was granted the lease for `ttl` seconds,
    "release" (RELEASE) that it gave the lease back: advisory, for scheduling only (a release
    before them ignores both kinds). "refused" (REFUSED) says the upstream refused the access
    token whose fingerprint is `access_fp`, the stored set's when it was recorded: a replica
    that still holds it refreshes now (under the lease, as always). "lowered" (LOWERED) says
    the stored expiry of the set of `rank` and access token `access_fp` was lowered
    (`lower_expiry`): a replica that holds that set reads the store to take it (a release
    before it ignores the kind).

    A "token" notice carries the committed set itself, so a replica adopts it without reading
    the store (one read per replica per refresh made a refresh cost O(replicas) commands):
    `blob` is the encrypted set as published (base64, the same ciphertext as stored), `token`
    the set the store opened from it (None when this replica cannot open it: it reads instead).
    """

    app: str
    kind: str
    version: int = 0
    rank: tuple[int, int] = (0, 0)
    refresh_fp: str | None = None
    owner: str | None = None
    retry: bool = False
    retry_aborted: bool = False
    protocol: int = PROTOCOL_VERSION
    ttl: float = 0.0
    access_fp: str | None = None
    fence: int = 0
    retried: tuple[str, int] | None = None
    blob: str | None = field(default=None, repr=False, compare=False)
    token: TokenSet | None = field(default=None, repr=False, compare=False)

    def encode(self) -> str:
        """The notice as published on the channel."""
        return json.dumps(
            {
                "app": self.app,
                "kind": self.kind,
                "version": self.version,
                "lineage": self.rank[0],
                "gen": self.rank[1],
                "rfp": self.refresh_fp,
                "owner": self.owner,
                "retry": int(self.retry),
                "ra": int(self.retry_aborted),
                "pv": self.protocol,
                **({"ttl": round(self.ttl * 1000)} if self.ttl else {}),
                **({"afp": self.access_fp} if self.access_fp is not None else {}),
                **({"fence": self.fence} if self.fence else {}),
                **({"ro": self.retried[0], "rf": self.retried[1]} if self.retried else {}),
                **({"blob": self.blob} if self.blob is not None else {}),
            },
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, data: str) -> Notice | None:
        """A notice from the channel, or None for anything malformed."""
        try:
            raw = json.loads(data)
            return cls(
                app=str(raw["app"]),
                kind=str(raw["kind"]),
                version=int(raw.get("version") or 0),
                rank=(int(raw.get("lineage") or 0), int(raw.get("gen") or 0)),
                refresh_fp=raw.get("rfp") or None,
                owner=raw.get("owner") or None,
                retry=bool(raw.get("retry")),
                retry_aborted=bool(raw.get("ra")),
                protocol=int(raw.get("pv") or 1),
                ttl=max(0.0, float(raw.get("ttl") or 0) / 1000),
                access_fp=str(raw["afp"]) if raw.get("afp") else None,
                fence=max(0, int(raw.get("fence") or 0)),
                retried=(
                    (str(raw["ro"]), max(0, int(raw.get("rf") or 0))) if raw.get("ro") else None
                ),
                blob=raw["blob"] if isinstance(raw.get("blob"), str) else None,
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


class TokenSets(Protocol):
    """The store's role of keeping one token set per app (its rank decides which is kept).

    Every method of every role may raise `StoreUnavailable`; callers keep serving from memory
    when it does.
    """

    async def load(self, app: str) -> TokenSet | None:
        """The stored set (with version, lineage, generation), or None when there is none.

        Raises `UnreadableTokenSet` when a set is stored but cannot be decrypted here.
        """
        ...

    async def load_many(self, apps: Sequence[str]) -> dict[str, TokenSet]:
        """The readable stored sets of `apps`, in one round trip (a warm start of many apps).

        Apps with nothing stored, or a set this replica cannot decrypt, are left out: their
        refreshers look again with `load`.
        """
        ...

    async def commit(self, app: str, token: TokenSet, *, fence: int = 0) -> Commit:
        """Store `token` if its rank is higher than the stored set's (or nothing is stored).

        A set of the same rank and access token is already stored: answered as stored (a
        repeat after a lost reply). A stored spend record for a lower rank is resolved by it.
        A store that requires a replica's acknowledgement waits for one after a set answered
        as stored (the repeat included, so repeating a commit asks again) and says in
        `durable` whether it came.
        """
        ...

    async def refuse_token(self, app: str, access_fp: str, *, interval: float) -> Refusal:
        """Record that the upstream refused the access token whose fingerprint is `access_fp`.

        A compare-and-set on the stored set: only while the stored set's access token is that
        one (STALE otherwise, so a 401 for an old token never purges a newer one). At most one
        refusal per app per `interval` seconds (the store's clock): the same token again is
        ALREADY, another token LIMITED. A RECORDED refusal publishes a REFUSED notice naming
        `access_fp`; the set itself stays stored (a rotating grant's refresh token is spent by
        the fleet protocol, never dropped).
        """
        ...

    async def lower_expiry(
        self, app: str, token: TokenSet, expires_at: float, *, owner: str | None = None
    ) -> bool:
        """Lower the stored expiry of `token`'s set to `expires_at` (fleet time): never raise it.

        A conditional rewrite (issue 20, M3): only while the stored set is `token`'s (its rank
        and access token) and `expires_at` is earlier than the stored expiry; a later commit
        stores its own expiry. A replica whose fleet clock saw the store's clock step back
        re-expresses its serving deadline in the new frame with it, so a pod that reads the set
        later does not serve it by the old frame's stamp. The encrypted set is not rewritten:
        the store keeps the lower bound beside it, and every read returns the earlier of the
        two. True when the stored expiry was lowered; the store then publishes a LOWERED notice
        naming the set and `owner` (the replica that lowered it), so every other replica that
        holds it takes the lower expiry at once.
        """
        ...


class SpendLedger(Protocol):
    """The store's role of spending a refresh token at most once: the lease with its fence, and
    the spend record (broker/fleet/; the rules are in docs/architecture.md)."""

    async def acquire_lease(self, app: str, owner: str, ttl: float) -> Lease:
        """Take the app's lease for `ttl` seconds, incrementing its fence; busy when held."""
        ...

    async def release_lease(self, app: str, owner: str, fence: int) -> None:
        """Give the lease back, only if `owner` still holds it under `fence`."""
        ...

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
        """Announce that `owner` will present `token`'s refresh token under `fence`.

        Only while `owner` holds the lease under `fence` and the stored set is `token`'s rank.
        A spend is named by its owner and fence together: fence numbers repeat when the store
        loses its fence counter (an eviction, a rollback), so a record under `fence` made by
        another owner is another spend. A spend of the same refresh token by another spend
        that was marked sent (and not resolved) answers UNKNOWN, or RETRY once if it was sent less than `retry_within`
        seconds ago by the store's clock (a server's reuse grace window). An announced spend
        that was never marked sent is replaced. `resolved_fence` names our own earlier spend
        that we know ended without effect, whose record may be replaced (0 names none: the
        restored record of an aborted grace retry, under fence 0, is nobody's to replace, not
        even its retrier's). A vetoed record, and
        the record of a grace retry (in any state), answer UNKNOWN to every other spend.
        """
        ...

    async def mark_sent(self, app: str, *, owner: str, fence: int) -> bool:
        """Mark our announced spend as sent, just before sending; False: do not send.

        True only while `owner` still holds the lease under `fence` and the record is ours
        (its owner and fence both: fences repeat when the store loses its counter).
        A store that requires a replica's acknowledgement (`store.require_replica_ack`) raises
        NotDurable when none came: the record is applied on the primary only, where a failover
        may lose it or a split brain leave it behind, so the caller must not send (it ends the
        spend as aborted).
        """
        ...

    async def load_spend(self, app: str) -> SpendRecord | None:
        """The app's spend record, or None when there is none.

        A replica that meets another's unresolved record (`begin_spend` answered UNKNOWN)
        learns its owner here: that owner's abort, or its own next spend of the token, may
        still resolve it (a spend whose `mark_sent` answer was lost and that was never sent),
        and the replica must not veto that next spend.
        """
        ...

    async def veto_spend(
        self, app: str, *, refresh_fp: str, protects: tuple[str, int] | None = None
    ) -> bool:
        """Mark an *announced* spend of `refresh_fp` as vetoed, so it is never marked sent and
        no later spend of that token by any fence is allowed (a state of its own: the vetoed
        spender's next `begin_spend` does not take it for its own resolved record).

        `protects` names the one earlier spend (owner, fence) the veto stands for, when the
        vetoing replica knows of no other (fence 0: that owner's spends of the token, known
        from a notice, which carries no fence): that spender's own `end_spend(aborted)` under
        that fence (any, for 0) then removes the vetoed record. The spender sends it only while
        no spend of its of that token is unknown or on the wire: it knows they had no effect
        (a split brain may have kept a stale copy of a record where its abort never arrived).
        A vetoed grace retry already names the spend it retried. A veto whose `protects` names
        a fence is refused when that very spend was the last one its spender ended as aborted
        here: the vetoing replica missed the abort notice (its subscription was down), and a
        veto standing for a resolved spend would stand for good (swarm seed 5510). A store
        that forgot the abort forgot it with the record, and vetoes. A veto whose `protects`
        names the owner of the announced spend is refused too: that spender spends the token
        again, which it does only knowing its earlier spend had no effect (the rule a replica
        applies to the notice), and a veto applied late (a write that timed out and landed
        after that new spend began) would stand for good (swarm seed 6573).

        A replica that remembers an earlier spend of that refresh token with no known outcome
        (the store forgot it: a rollback, an empty restart) stops a replica that does not.
        Only while the spender holds the lease: a record whose lease lapsed cannot be marked
        sent anyway, and may be a ghost that a rollback brought back, which the next holder
        replaces (vetoed, it would block the token for good). True when a spend was vetoed.
        """
        ...

    async def end_spend(
        self,
        app: str,
        *,
        owner: str,
        fence: int,
        outcome: SpendEnd,
        refresh_fp: str | None = None,
    ) -> None:
        """Close our spend under `fence` without a commit: aborted (removed) or unknown (kept).

        Only a record `owner` made under `fence`: fence numbers repeat after a rollback (the
        counter goes back with the snapshot), so another replica's spend may carry ours.

        `refresh_fp` names the token of an ordinary spend (not a grace retry) the caller ended
        as aborted. When the store holds no record at all (it forgot it: an empty restart, an
        eviction), the abort is still kept as the last aborted spend (`owner`, `fence`,
        `refresh_fp`: a veto that stands for exactly that spend is refused) and announced with
        an abort notice: replicas that heard its `sent` notice would otherwise veto the next
        spend of the token for it, and only its spender, which may have exited, could lift
        that veto (swarm seeds 12554, 27015, 28726).

        An aborted grace retry restores the record of the unknown spend it retried, with that
        spend's `sent_at` and no retry left, and its abort notice says `retry_aborted`.

        An abort by the owner and fence of the spend a grace retry retried (its spender never
        sent it: its `mark_sent` answer was lost) makes the retry an ordinary first spend
        (announced: with an abort notice in that owner's name; already sent: silently), and
        removes the record such a retry restored when it aborted (with an abort notice), and a
        vetoed record that names that spend as the one it protects (with an abort notice).

        A store that requires a replica's acknowledgement waits for one after an abort (the
        abort applied, or found applied already) and raises NotDurable when none came: the
        abort is on the primary only, and a failover may bring the `sent` record back (swarm
        seed 23291); the caller writes it again.
        """
        ...


class Notices(Protocol):
    """The store's role of telling every replica what changed (the channel of `Notice`s)."""

    def updates(self) -> AsyncIterator[Notice]:
        """Changes from any replica as they happen, and heartbeats; runs until closed."""
        ...

    async def heartbeat(self) -> None:
        """Publish a notice of kind HEARTBEAT (app "") to every subscriber, this one included.

        A subscription can go half-open (a NAT or load balancer forgot its connection): no
        error ever comes, the notices just stop. A replica that heard nothing for a while
        publishes one, and treats its subscription as broken when not even that comes back.
        """
        ...


class FleetSignals(Protocol):
    """The store's role of one backoff and one budget for the fleet: a failed refresh shared
    (no replica attempts before its `not_before`) and the fleet-wide token request budget."""

    async def record_failure(
        self, app: str, *, failures: int, not_before: float, error: str, permanent: bool
    ) -> None:
        """Share a failed refresh: no replica attempts again before `not_before` (fleet time).

        The record is kept until FAILURE_RETENTION after `not_before`, unless cleared first.
        """
        ...

    async def load_failure(self, app: str) -> FailureRecord | None:
        """The shared failure record, or None (none, expired, or unreadable)."""
        ...

    async def clear_failure(self, app: str) -> None:
        """Forget the app's failure record (a refresh succeeded)."""
        ...

    async def take_budget(self, app: str, limit_per_minute: int, now: float) -> tuple[bool, float]:
        """Count one token request against the app's fleet-wide budget: (allowed, retry_after).

        At most `limit_per_minute` requests in the BUDGET_WINDOW seconds up to `now` (fleet
        time). A refused request is not counted; `retry_after` is the seconds until the oldest
        counted one leaves the window (0 when allowed).
        """
        ...


class Lifecycle(Protocol):
    """The store's connection: whether it answers, and letting it go."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class TokenStore(TokenSets, SpendLedger, Notices, FleetSignals, ServerClock, Lifecycle, Protocol):
    """Shared storage of one token set per app, with the lease and spend record per app: every
    role at once (MemoryStore, RedisStore). `server_time` (ServerClock, broker/fleetclock.py) is
    the store server's wall time: the fleet's reference clock."""

"""What one replica remembers of the spends of one app's refresh tokens (SpendMemory)."""

from __future__ import annotations

# How many of our aborted spends of one refresh token are remembered for re-sending after a
# reconnect: each lease of a failing spend adds one.
MAX_REMEMBERED_ABORTS = 16


def _by_fence(spend: tuple[str, int]) -> int:
    """The fence of an (owner, fence) pair: remembered aborts are kept in fence order."""
    return spend[1]


class SpendMemory:
    """What one replica remembers of the spends of one app's refresh tokens.

    Kept apart from the store on purpose: a store that forgets (a restart, a rollback, a
    failover) must not make the replica forget too. Each collection is keyed by a refresh
    token's fingerprint (the aborts by the spend, owner and fence) and is cleared only by
    `keep_only` once a newer set is held: older spends no longer matter then. The protocol
    (FleetProtocol) decides what each fact means; this class only keeps them consistent.
    """

    def __init__(self) -> None:
        # Refresh tokens another replica sent: fingerprint → (monotonic time of the first
        # `sent` notice, the spender; None once a second replica sent it too), until a newer
        # set, an abort or the spender's own next spend resolves them.
        self.foreign: dict[str, tuple[float, str | None]] = {}
        # ...and every replica heard sending each of them (`None` above hides which).
        self.senders: dict[str, set[str]] = {}
        # ...and the fence of such a spend, where its store record told us: (owner, fence). A
        # veto that stands for that spend alone names it, so its spender can lift it.
        self.foreign_fences: dict[str, tuple[str, int]] = {}
        # Refresh tokens whose spend has an unknown outcome: never presented again.
        self.unknown: set[str] = set()
        # Refresh tokens another replica sent whose spend we found unresolved when we held the
        # lease (its spender died, or lost its lease): unknown like ours, but the spender's
        # abort or its own next spend of the token still resolves them.
        self.unknown_foreign: set[str] = set()
        # Refresh tokens whose one grace retry was granted to us.
        self.retried: set[str] = set()
        # Refresh tokens the server answered `invalid_grant` to when we sent them: dead, so a
        # grace retry of their unknown record is vetoed (`_refuses_retry`).
        self.rejected: set[str] = set()
        # When we sent refresh tokens whose answer never came (monotonic), for the grace rule.
        self.sent_at: dict[str, float] = {}
        # Our own last spend that ended without effect (its record may survive the abort).
        self.aborted_fence = 0
        # Every spend of ours that ended without effect, (owner, fence) → refresh fingerprint,
        # while its token is the newest we know: a split brain may keep its `sent` record on
        # the side the abort never reached, and the heal may discard the side it did. Re-sent
        # after each reconnect (`resend`) and when a record of its token blocks us; owner- and
        # fence-matched, so always safe. The owner is ours, or that of the protocol this one
        # replaced in a config reload (`take_over`): the same process.
        self.aborts: dict[tuple[str, int], str] = {}
        self.resend = False
        # The last aborted spend of the protocol this one replaced in a config reload, whose
        # abort may be unwritten: (owner, fence).
        self.carried_aborts: list[tuple[str, int]] = []

    # ---- what is known ---------------------------------------------------------------------

    def is_unknown(self, refresh_fp: str) -> bool:
        """A spend of `refresh_fp`, ours or another replica's, has no known outcome."""
        return refresh_fp in self.unknown or refresh_fp in self.unknown_foreign

    def sent_time(self, refresh_fp: str) -> float | None:
        """When `refresh_fp` was sent as far as we know (monotonic): by us, or when another
        replica's `sent` notice first reached us; None when neither."""
        foreign = self.foreign.get(refresh_fp)
        return self.sent_at.get(refresh_fp, foreign[0] if foreign is not None else None)

    def aborts_in_fence_order(self) -> list[tuple[str, int]]:
        """Every remembered aborted spend (owner, fence), in fence order."""
        return sorted(self.aborts, key=_by_fence)

    def aborts_of(self, refresh_fp: str) -> list[tuple[str, int]]:
        """The remembered aborted spends of `refresh_fp`, in fence order."""
        return sorted([k for k, fp in self.aborts.items() if fp == refresh_fp], key=_by_fence)

    @property
    def abort_unwritten(self) -> bool:
        """An abort of ours (or carried over in a reload) may not be in the store yet."""
        return self.aborted_fence != 0 or bool(self.carried_aborts)

    # ---- what happened ---------------------------------------------------------------------

    def heard_sent(self, refresh_fp: str, owner: str | None, now: float) -> None:
        """Another replica's `sent` notice for `refresh_fp` (the first one is timed)."""
        first = self.foreign.get(refresh_fp)
        if first is None:
            self.foreign[refresh_fp] = (now, owner)
        elif first[1] != owner:
            self.foreign[refresh_fp] = (first[0], None)  # no one spender can resolve it
        if owner is not None:
            self.senders.setdefault(refresh_fp, set()).add(owner)

    def found_foreign(self, refresh_fp: str, owner: str | None, now: float) -> None:
        """Another replica's spend of `refresh_fp` (of `owner`, when known) is the one to
        remember: found in the store, or the one a grace retry's abort left unknown."""
        self.foreign[refresh_fp] = (self.foreign.get(refresh_fp, (now, None))[0], owner)
        if owner is None:
            self.senders.pop(refresh_fp, None)
        else:
            self.senders[refresh_fp] = {owner}

    def resolved_foreign(self, refresh_fp: str) -> None:
        """Another replica's spend of `refresh_fp` ended without effect (or it spends again)."""
        self.foreign.pop(refresh_fp, None)
        self.senders.pop(refresh_fp, None)
        self.unknown_foreign.discard(refresh_fp)

    def began(self, owner: str, fence: int, refresh_fp: str, *, retry: bool) -> None:
        """Our spend of `refresh_fp` under `fence` is announced (`retry`: the grace retry)."""
        self.aborted_fence = 0
        self.aborts.pop((owner, fence), None)  # a fence repeated after a rollback
        if retry:
            self.retried.add(refresh_fp)

    def our_unknown(self, refresh_fp: str, sent_mono: float) -> None:
        """Our spend of `refresh_fp`, sent at `sent_mono`, got no answer."""
        self.unknown.add(refresh_fp)
        self.sent_at.setdefault(refresh_fp, sent_mono)

    def our_rejected(self, refresh_fp: str) -> None:
        """The server answered `invalid_grant` to our spend of `refresh_fp`."""
        self.unknown.add(refresh_fp)
        self.rejected.add(refresh_fp)

    def aborted(self, owner: str, fence: int, refresh_fp: str | None) -> None:
        """Our spend under `fence` ended without effect; `refresh_fp`: the token it was of."""
        self.aborted_fence = fence
        if refresh_fp is not None:
            self.aborts[owner, fence] = refresh_fp
            if len(self.aborts) > MAX_REMEMBERED_ABORTS:
                # Keep the oldest (the one spend whose record a split's other side copied is
                # the first of a run of aborts) and this newest one.
                del self.aborts[sorted(self.aborts, key=_by_fence)[-2]]

    def abort_written(self, fence: int) -> None:
        """Our abort of `fence` is in the store (unless a later one came meanwhile)."""
        if self.aborted_fence == fence:
            self.aborted_fence = 0

    def keep_only(self, keep: str | None) -> None:
        """A set whose refresh token is `keep` is ours now: forget every older spend."""
        self.foreign = {k: v for k, v in self.foreign.items() if k == keep}
        self.senders = {k: v for k, v in self.senders.items() if k == keep}
        self.unknown = {k for k in self.unknown if k == keep}
        self.unknown_foreign = {k for k in self.unknown_foreign if k == keep}
        self.retried = {k for k in self.retried if k == keep}
        self.rejected = {k for k in self.rejected if k == keep}
        self.aborts = {f: fp for f, fp in self.aborts.items() if fp == keep}
        self.foreign_fences = {k: v for k, v in self.foreign_fences.items() if k == keep}

    def take_over(
        self, previous: SpendMemory, *, owner: str, in_flight: str | None, now: float
    ) -> None:
        """Add what `previous` (of the protocol, owner `owner`, that a config reload replaced)
        remembered; `in_flight`: the token it still has on the wire, another owner's now."""
        self.unknown |= previous.unknown
        self.unknown_foreign |= previous.unknown_foreign
        self.carried_aborts += previous.carried_aborts
        if previous.aborted_fence:
            self.carried_aborts.append((owner, previous.aborted_fence))
        # Every spend the old one aborted, too: re-sent after a reconnect and when a record of
        # its token blocks us, as our own are (a veto may name it: swarm seed 4149).
        for aborted, refresh_fp in previous.aborts.items():
            self.aborts.setdefault(aborted, refresh_fp)
        self.retried |= previous.retried
        self.rejected |= previous.rejected
        for fp, sent in previous.sent_at.items():
            self.sent_at.setdefault(fp, sent)
        for fp, spend in previous.foreign.items():
            if fp not in self.foreign:
                self.foreign[fp] = spend
                self.senders[fp] = set(previous.senders.get(fp, ()))
        if in_flight is not None:
            self.foreign[in_flight] = (now, owner)
            self.senders[in_flight] = {owner}

"""What the store holds about one app, read without writing: the raw material of `status`.

`StoreInspector.inspect` reads an app's set, lease, fence, spend record, shared failure and
request budget with read commands only (so it works against a read-only Redis replica) and
keeps none of the secrets it must decrypt to learn a set's expiry: a `StoredSet` carries the
set's times and rank, never its tokens or their fingerprints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from broker.model import FailureRecord


@dataclass(frozen=True, slots=True)
class StoredSet:
    """An app's stored token set as seen from outside: rank and times, no token.

    `expires_at` and `issued_at` are None when no configured key opens the blob (the rank is
    in plain text). `jitter` is the fleet's jitter sample of the set's due time (derived from
    the access token's fingerprint, so it is kept out of repr and never printed).
    """

    version: int
    rank: tuple[int, int]
    protocol: int
    expires_at: float | None
    issued_at: float | None
    moved_to: str | None = None
    jitter: float = field(default=0.0, repr=False)

    @property
    def readable(self) -> bool:
        """True when a configured key opened the set."""
        return self.expires_at is not None


@dataclass(frozen=True, slots=True)
class StoredLease:
    """The refresh lease: who holds it, under which fence, and for how much longer."""

    owner: str
    fence: int
    protocol: int
    expires_in: float | None


@dataclass(frozen=True, slots=True)
class StoredSpend:
    """An app's spend record, without the refresh token's fingerprint.

    `sent_at` is on the store's clock (seconds), None while the spend is only announced.
    """

    state: str
    owner: str
    fence: int
    rank: tuple[int, int]
    retries: int
    sent_at: float | None


@dataclass(frozen=True, slots=True)
class StoredFacts:
    """Everything the store holds about one app (under its store name), read at `now`."""

    name: str
    now: float
    token: StoredSet | None
    lease: StoredLease | None
    fence: int
    spend: StoredSpend | None
    failure: FailureRecord | None
    failure_unreadable: bool
    budget_used: int


@runtime_checkable
class StoreInspector(Protocol):
    """A store that can describe an app without writing anything (RedisStore, MemoryStore)."""

    async def read_time(self) -> float:
        """The store's clock, in seconds, read with a read-only command."""
        ...

    async def inspect(self, name: str, now: float) -> StoredFacts:
        """What the store holds under the store name `name` at `now` (the store's clock).

        Raises StoreUnavailable when the store cannot be read.
        """
        ...

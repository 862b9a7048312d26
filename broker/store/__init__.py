"""The TokenStore protocol: where token sets are shared between replicas and kept across restarts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from broker.model import FailureRecord, TokenSet

# How long a failure record outlives its `not_before`: the next lease holder continues the count
# of consecutive failures (and so the backoff) instead of starting over. A success clears it.
FAILURE_RETENTION = 3600.0
# The sliding window of the fleet-wide token request budget, in seconds.
BUDGET_WINDOW = 60.0


class TokenStore(Protocol):
    """Shared, versioned storage of one token set per app, plus a per-app refresh lease.

    Every method may raise `StoreUnavailable`; callers keep serving from memory when it does.
    """

    async def load(self, app: str) -> TokenSet | None:
        """The stored token set with its `version`, or None when there is none (or unreadable)."""
        ...

    async def save(self, app: str, token: TokenSet, expected_version: int) -> int | None:
        """Compare-and-set: store `token` if the stored version is `expected_version`.

        `expected_version` 0 means "nothing stored yet". Returns the new version, or None
        when the store held another version (someone else wrote first).
        """
        ...

    async def acquire_lease(self, app: str, owner: str, ttl: float) -> bool:
        """Take the app's refresh lease for `ttl` seconds; False when another owner holds it."""
        ...

    async def renew_lease(self, app: str, owner: str, ttl: float) -> bool:
        """Extend `owner`'s lease to `ttl` seconds from now; False if `owner` no longer holds it."""
        ...

    async def release_lease(self, app: str, owner: str) -> None:
        """Give the lease back, only if `owner` still holds it."""
        ...

    def updates(self) -> AsyncIterator[str]:
        """Names of apps whose stored token set changed (from any replica); runs until closed."""
        ...

    # ---- one clock, one backoff and one budget for the fleet ------------------------------

    async def server_time(self) -> float:
        """The store server's wall time: the fleet's reference clock (broker/fleetclock.py)."""
        ...

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

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...

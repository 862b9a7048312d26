"""The TokenStore protocol: where token sets are shared between replicas and kept across restarts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from broker.model import TokenSet


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

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...

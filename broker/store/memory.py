"""The in-process store: the `memory://` store for one broker, and the fake for unit tests."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from dataclasses import replace

from broker.clock import Clock
from broker.errors import StoreUnavailable
from broker.model import FailureRecord, TokenSet
from broker.store import BUDGET_WINDOW, FAILURE_RETENTION


class MemoryStore:
    """Implements TokenStore in memory. Set `fail = True` to simulate an outage."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._tokens: dict[str, TokenSet] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._subscribers: set[asyncio.Queue[str | None]] = set()
        self._failures: dict[str, FailureRecord] = {}
        self._budgets: dict[str, collections.deque[float]] = {}
        self.fail = False

    def _check(self) -> None:
        if self.fail:
            raise StoreUnavailable("memory store: simulated outage")

    async def load(self, app: str) -> TokenSet | None:
        """The stored token set, or None."""
        self._check()
        return self._tokens.get(app)

    async def save(self, app: str, token: TokenSet, expected_version: int) -> int | None:
        """Compare-and-set on the version; notifies subscribers on success."""
        self._check()
        current = self._tokens.get(app)
        current_version = current.version if current is not None else 0
        if current_version != expected_version:
            return None
        version = current_version + 1
        self._tokens[app] = replace(token, version=version)
        for queue in self._subscribers:
            queue.put_nowait(app)
        return version

    async def acquire_lease(self, app: str, owner: str, ttl: float) -> bool:
        """Take the lease unless another owner holds an unexpired one."""
        self._check()
        now = self._clock.monotonic()
        holder = self._leases.get(app)
        if holder is not None and holder[0] != owner and holder[1] > now:
            return False
        self._leases[app] = (owner, now + ttl)
        return True

    async def renew_lease(self, app: str, owner: str, ttl: float) -> bool:
        """Extend the lease if `owner` still holds it."""
        self._check()
        now = self._clock.monotonic()
        holder = self._leases.get(app)
        if holder is None or holder[0] != owner or holder[1] <= now:
            return False
        self._leases[app] = (owner, now + ttl)
        return True

    async def release_lease(self, app: str, owner: str) -> None:
        """Release the lease if `owner` holds it."""
        self._check()
        holder = self._leases.get(app)
        if holder is not None and holder[0] == owner:
            del self._leases[app]

    async def updates(self) -> AsyncIterator[str]:
        """Apps whose token set was saved, as they are saved."""
        self._check()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while True:
                app = await queue.get()
                if app is None:
                    return
                self._check()
                yield app
        finally:
            self._subscribers.discard(queue)

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

    async def ping(self) -> None:
        """Raise StoreUnavailable while failing."""
        self._check()

    async def close(self) -> None:
        """End every updates() iterator."""
        for queue in self._subscribers:
            queue.put_nowait(None)

"""The clock seam: everything that reads time or sleeps for scheduling goes through a Clock."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Wall time, monotonic time and sleeping, injectable so tests can advance time."""

    def time(self) -> float:
        """Unix time in seconds (wall clock; token expiry is expressed in it)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for intervals and rate limits)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds`; cancellable."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        """Unix time in seconds."""
        return time.time()

    def monotonic(self) -> float:
        """Seconds on the process's monotonic clock."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the event loop."""
        await asyncio.sleep(max(0.0, seconds))

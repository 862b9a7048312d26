"""A fake Clock: time moves only when the test says, and the test can see who is sleeping."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class FakeClock:
    """Implements broker.clock.Clock. `advance()` wakes sleepers whose deadline has passed."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall = start
        self._mono = 1000.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._sleeper_added = asyncio.Event()

    def time(self) -> float:
        """Fake wall time."""
        return self._wall

    def monotonic(self) -> float:
        """Fake monotonic time."""
        return self._mono

    async def sleep(self, seconds: float) -> None:
        """Wait until the fake clock is advanced past now + seconds."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._seq), future))
        self._sleeper_added.set()
        await future

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (cancelled ones excluded)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def next_deadline(self) -> float | None:
        """Seconds until the earliest pending sleep ends, or None."""
        pending = [d for d, _, f in self._sleepers if not f.done()]
        return min(pending) - self._mono if pending else None

    async def settle(self) -> None:
        """Let every runnable task run until all are blocked again."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking sleepers in deadline order and letting them run."""
        target = self._mono + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            if future.done():
                continue
            step = deadline - self._mono
            self._mono = deadline
            self._wall += step
            future.set_result(None)
            await self.settle()
        step = target - self._mono
        self._mono = target
        self._wall += step
        await self.settle()

    def tick(self, seconds: float) -> None:
        """Move wall and monotonic time forward at once without waking sleepers (a slow call)."""
        self._wall += seconds
        self._mono += seconds

    def jump_wall(self, seconds: float) -> None:
        """Move only the wall clock (an NTP step); monotonic time is untouched."""
        self._wall += seconds

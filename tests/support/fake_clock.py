"""A fake Clock: time moves only when the test says, and the test can see who is sleeping."""

from __future__ import annotations

import asyncio

from tests.support.virtual_time import VirtualTimers


class FakeClock:
    """Implements broker.clock.Clock. `advance()` wakes sleepers whose deadline has passed.

    Its monotonic time and its sleepers are a VirtualTimers (tests/support/virtual_time.py),
    the simulation's loop's own timer queue.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall = start
        self._timers = VirtualTimers(1000.0)

    def time(self) -> float:
        """Fake wall time."""
        return self._wall

    def monotonic(self) -> float:
        """Fake monotonic time."""
        return self._timers.now

    async def sleep(self, seconds: float) -> None:
        """Wait until the fake clock is advanced past now + seconds."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = self._timers.schedule(self._timers.now + seconds, _wake, (future,))
        try:
            await future
        except BaseException:
            timer.cancel()
            raise

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (cancelled ones excluded)."""
        return len(self._timers.live())

    def next_deadline(self) -> float | None:
        """Seconds until the earliest pending sleep ends, or None."""
        pending = [timer.when() for timer in self._timers.live()]
        return min(pending) - self._timers.now if pending else None

    async def settle(self) -> None:
        """Let every runnable task run until all are blocked again."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking sleepers in deadline order and letting them run."""
        timers = self._timers
        target = timers.now + seconds
        await self.settle()
        while (timer := timers.pop_due(target)) is not None:
            self._move_to(timer.when())
            timer.run()
            await self.settle()
        self._move_to(target)
        await self.settle()

    def _move_to(self, mono: float) -> None:
        """Set monotonic time to `mono`; the wall clock moves by as much."""
        self._wall += mono - self._timers.now
        self._timers.now = mono

    def tick(self, seconds: float) -> None:
        """Move wall and monotonic time forward at once without waking sleepers (a slow call)."""
        self._wall += seconds
        self._timers.now += seconds

    def jump_wall(self, seconds: float) -> None:
        """Move only the wall clock (an NTP step); monotonic time is untouched."""
        self._wall += seconds


def _wake(sleeper: asyncio.Future[None]) -> None:
    """End a sleep (one already cancelled stays so)."""
    if not sleeper.done():
        sleeper.set_result(None)

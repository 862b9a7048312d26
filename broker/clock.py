"""The clock seam: everything that reads time or sleeps for scheduling goes through a Clock."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol


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


async def wait_within(
    clock: Clock, work: asyncio.Future[Any], seconds: float, *, cancel_late: bool = False
) -> None:
    """Wait until `work` is done or `seconds` pass on `clock`, whichever comes first.

    The work's outcome stays in `work` (`done()`, `cancelled()`, `result()`): nothing is
    raised for it here. With `cancel_late`, work still running when the time is up (or when
    the caller is cancelled) is cancelled and awaited to its end, so that it is done on
    return and `work.cancelled()` says the time ran out; without, it runs on (a task the
    caller shares, such as a single-flight refresh). Cancelling the caller propagates.
    Timeouts run on the injected clock, not the loop's, so the simulation sees them.
    """
    timer = asyncio.create_task(clock.sleep(seconds))
    try:
        await asyncio.wait({work, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        if cancel_late and not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)


class Wake:
    """A loop's wake-up: `set()` ends the current `sleep()`, or makes the next one return at once.

    One task per sleep (the clock's), cancelled by `set()`: an `asyncio.Event` waited on beside
    the sleep cost a second task and an `asyncio.wait` on every turn of every loop.
    """

    def __init__(self) -> None:
        self._set = False
        self._sleeper: asyncio.Future[None] | None = None

    def set(self) -> None:
        """Wake the loop now (or make its next sleep return at once)."""
        self._set = True
        if self._sleeper is not None:
            self._sleeper.cancel()

    def clear(self) -> None:
        """Forget an earlier wake-up."""
        self._set = False

    async def sleep(self, clock: Clock, seconds: float) -> None:
        """Sleep `seconds` on `clock`, or until `set()`; cancelling the caller still cancels."""
        if self._set:
            return
        sleeper = asyncio.create_task(clock.sleep(seconds))
        self._sleeper = sleeper
        try:
            await sleeper
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the caller was cancelled, not woken
        finally:
            self._sleeper = None
            sleeper.cancel()

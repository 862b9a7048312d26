"""Virtual time and the callbacks due on it: the one timer queue of the tests' fake clocks.

`VirtualTimers` serves both fake clocks: the unit tests' FakeClock (tests/support/fake_clock.py),
whose time moves when a test advances it, and the simulation's SimLoop
(tests/simulation/world.py), an event loop whose time jumps to the next timer whenever nothing
can run. Both keep their timers here, in the order asyncio keeps its own: a heap of
(due time, NaN, timer) triples, compared in C. A distinct NaN is neither equal to nor less
than another, so timers due at the same moment compare as asyncio's TimerHandle `<` compares
them (not less) without a Python call, and leave in the order asyncio's heap would give them.

`Handle` and `Timer` are this module's own (asyncio's keep their state in private fields);
they answer what asyncio's callers ask of a handle: `cancel()`, `cancelled()`, `when()`.
"""

from __future__ import annotations

import contextvars
import heapq
from collections.abc import Callable, Sequence
from typing import Any

# Each heap entry's NaN must be a float object of its own (`NAN + 0.0` makes one: arithmetic
# always returns a new float; `float("nan")` does too, but parses a string, ten times slower).
NAN = float("nan")


class Handle:
    """A callback to run once, with its arguments and its context (asyncio.Handle's role)."""

    __slots__ = ("args", "callback", "context", "is_cancelled")

    def __init__(
        self,
        callback: Callable[..., object],
        args: Sequence[Any],
        context: contextvars.Context | None,
    ) -> None:
        self.callback: Callable[..., object] | None = callback
        self.args: Sequence[Any] | None = args
        self.context = context if context is not None else contextvars.copy_context()
        self.is_cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (and drop what it holds)."""
        if not self.is_cancelled:
            self.is_cancelled = True
            self.callback = None
            self.args = None

    def cancelled(self) -> bool:
        """True once cancelled."""
        return self.is_cancelled

    def run(self) -> None:
        """Run the callback in its context."""
        assert self.callback is not None and self.args is not None
        self.context.run(self.callback, *self.args)


class Timer(Handle):
    """A callback due at a moment of virtual time (asyncio.TimerHandle's role)."""

    __slots__ = ("due", "queue", "scheduled")

    def __init__(
        self,
        queue: VirtualTimers,
        due: float,
        callback: Callable[..., object],
        args: Sequence[Any],
        context: contextvars.Context | None,
    ) -> None:
        # (Handle.__init__, inlined: most timers are made on the simulation's hottest path.)
        self.callback = callback
        self.args = args
        self.context = context if context is not None else contextvars.copy_context()
        self.is_cancelled = False
        self.queue = queue
        self.due = due
        self.scheduled = True  # still in the queue's heap

    def cancel(self) -> None:
        """Do not run the callback; the queue counts a cancelled timer it still holds."""
        if not self.is_cancelled:
            if self.scheduled:
                self.queue.cancelled_count += 1
            self.is_cancelled = True
            self.callback = None
            self.args = None

    def when(self) -> float:
        """The virtual time the callback is due at."""
        return self.due


class VirtualTimers:
    """Virtual time (`now`) and a heap of the timers due on it.

    FakeClock takes the timers one at a time (`pop_due`) as a test advances it; SimLoop, a
    subclass, runs them in asyncio's loop iteration (tests/simulation/world.py).
    """

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.heap: list[tuple[float, float, Timer]] = []
        self.cancelled_count = 0  # cancelled timers still in the heap

    def schedule(
        self,
        when: float,
        callback: Callable[..., object],
        args: Sequence[Any] = (),
        context: contextvars.Context | None = None,
    ) -> Timer:
        """Run `callback(*args)` in `context` once time reaches `when`."""
        timer = Timer(self, when, callback, args, context)
        heapq.heappush(self.heap, (when, NAN + 0.0, timer))
        return timer

    def live(self) -> list[Timer]:
        """The timers not cancelled, in no particular order."""
        return [timer for _, _, timer in self.heap if not timer.is_cancelled]

    def pop_due(self, until: float) -> Timer | None:
        """The earliest timer due by `until`, taken off the heap (None when none is). One at a
        time, and time is the caller's to move: a test runs what each wakes first."""
        heap = self.heap
        while heap and heap[0][0] <= until:
            timer = heapq.heappop(heap)[2]
            timer.scheduled = False
            if timer.is_cancelled:
                self.cancelled_count -= 1
                continue
            return timer
        return None

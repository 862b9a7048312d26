"""The simulation's loop runs callbacks in asyncio's own order, on its own virtual time."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.simulation.world import SimLoop
from tests.support.virtual_time import VirtualTimers


def _timer_order(loop: asyncio.AbstractEventLoop, delay: float) -> list[int] | None:
    """Schedule 400 timers due at one moment, cancel a seeded third of them (enough for
    asyncio to rebuild its heap), add more, and return the order the rest ran in. None when
    the moment passed before the last timer was added (a real loop descheduled for `delay`
    on a loaded machine): the timers were then not all due together."""
    ran: list[int] = []
    rng = random.Random(3)
    in_time = True

    async def main() -> None:
        nonlocal in_time
        when = loop.time() + delay
        timers = [loop.call_at(when, ran.append, n) for n in range(400)]
        for timer in rng.sample(timers, 160):
            timer.cancel()
        await asyncio.sleep(0)
        for n in range(400, 450):
            loop.call_at(when, ran.append, n)
        in_time = not ran and loop.time() < when
        done = loop.create_future()
        loop.call_at(when + delay, done.set_result, None)
        await done

    loop.run_until_complete(main())
    loop.close()
    return ran if in_time else None


def _real_timer_order() -> list[int]:
    """asyncio's own order, measured again with a longer moment while the machine was too
    loaded to add every timer before it (a run of the suite under load, 2026-12-08)."""
    for delay in (0.05, 0.2, 0.5, 1.0, 2.0):
        order = _timer_order(asyncio.new_event_loop(), delay)
        if order is not None:
            return order
    raise AssertionError("a real loop never added 450 timers within 2 s")


class TestSimLoop:
    def test_timers_due_together_run_in_asyncios_order(self) -> None:
        """Timers due at one moment, some cancelled, run in the order asyncio's own loop
        runs them (the seeds replay what a real loop would do, tie for tie)."""
        real = _real_timer_order()
        simulated = _timer_order(SimLoop(), 0.05)
        assert simulated is not None and len(simulated) == 290
        assert real != sorted(real)  # (ties are not first come, first served)
        assert simulated == real

    def test_time_jumps_to_the_next_timer(self) -> None:
        """Nothing runs while waiting: a 3600 s sleep ends at once, at simulated 3600."""
        loop = SimLoop()
        loop.run_until_complete(asyncio.sleep(3600.0))
        assert loop.time() == 3600.0
        loop.close()

    def test_a_loop_with_nothing_to_wait_for_says_so(self) -> None:
        """A future nobody will resolve is a deadlock, not a hang."""
        loop = SimLoop()
        with pytest.raises(RuntimeError, match="simulation deadlock"):
            loop.run_until_complete(loop.create_future())
        loop.close()


class TestVirtualTimers:
    def test_pop_due_skips_cancelled_timers_and_leaves_later_ones(self) -> None:
        """One at a time, the earliest live timer due by the bound; nothing past it."""
        timers = VirtualTimers(10.0)
        first = timers.schedule(11.0, print)
        second = timers.schedule(12.0, print)
        timers.schedule(15.0, print)
        first.cancel()
        assert timers.pop_due(14.0) is second
        assert timers.pop_due(14.0) is None
        assert [t.when() for t in timers.live()] == [15.0]
        assert timers.now == 10.0  # time is the caller's to move

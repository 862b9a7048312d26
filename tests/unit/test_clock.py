"""The clock helpers: racing work against the injected clock, and a sleep that can be woken."""

from __future__ import annotations

import asyncio

import pytest

from broker.clock import Wake, wait_within
from tests.support.fake_clock import FakeClock


class TestWaitWithin:
    """`wait_within` waits for work or the injected clock, whichever is first."""

    async def test_returns_when_the_work_finishes_first(self) -> None:
        """Work done before the time is up: its result is there and the timer is gone."""
        clock = FakeClock()
        gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(wait_within(clock, gate, 10.0, cancel_late=True))
        await clock.settle()
        assert clock.sleepers == 1
        gate.set_result("answer")
        await clock.settle()
        assert waiting.done() and waiting.result() is None
        assert gate.result() == "answer"
        assert clock.sleepers == 0

    async def test_work_exception_stays_in_the_work(self) -> None:
        """A failing work is not raised by the wait: the caller reads it from the future."""
        clock = FakeClock()

        async def fail() -> None:
            raise ValueError("boom")

        work = asyncio.ensure_future(fail())
        await wait_within(clock, work, 10.0, cancel_late=True)
        with pytest.raises(ValueError, match="boom"):
            work.result()

    async def test_time_up_leaves_the_work_running_by_default(self) -> None:
        """Without cancel_late, the wait ends on the clock and the (shared) work runs on."""
        clock = FakeClock()
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        work = asyncio.ensure_future(gate)
        waiting = asyncio.ensure_future(wait_within(clock, work, 5.0))
        await clock.advance(4.9)
        assert not waiting.done()
        await clock.advance(0.2)
        assert waiting.done()
        assert not work.done()
        gate.set_result(None)
        await clock.settle()
        assert work.done() and not work.cancelled()

    async def test_time_up_cancels_late_work_and_awaits_its_end(self) -> None:
        """With cancel_late, late work is cancelled and has finished by the time the wait ends."""
        clock = FakeClock()
        cleaned_up: list[bool] = []

        async def slow() -> None:
            try:
                await asyncio.get_running_loop().create_future()
            finally:
                await asyncio.sleep(0)  # a clean-up step that must run before the wait ends
                cleaned_up.append(True)

        work = asyncio.ensure_future(slow())
        waiting = asyncio.ensure_future(wait_within(clock, work, 5.0, cancel_late=True))
        await clock.advance(5.0)
        assert waiting.done() and waiting.result() is None
        assert work.cancelled()
        assert cleaned_up == [True]

    async def test_cancelling_the_caller_propagates_and_cancels_late_work(self) -> None:
        """A cancelled caller raises CancelledError; cancel_late work and the timer are cancelled."""
        clock = FakeClock()
        work = asyncio.ensure_future(asyncio.get_running_loop().create_future())
        waiting = asyncio.ensure_future(wait_within(clock, work, 5.0, cancel_late=True))
        await clock.settle()
        waiting.cancel()
        await clock.settle()
        assert waiting.cancelled()
        assert work.cancelled()
        assert clock.sleepers == 0

    async def test_cancelling_the_caller_leaves_shared_work_running(self) -> None:
        """Without cancel_late, cancelling the caller does not cancel the work it waited for."""
        clock = FakeClock()
        work = asyncio.ensure_future(asyncio.get_running_loop().create_future())
        waiting = asyncio.ensure_future(wait_within(clock, work, 5.0))
        await clock.settle()
        waiting.cancel()
        await clock.settle()
        assert waiting.cancelled()
        assert not work.done()
        assert clock.sleepers == 0
        work.cancel()


class TestWake:
    """`Wake.sleep` sleeps on the injected clock until the time is up or `set()` is called."""

    async def test_sleeps_the_full_time_on_the_clock(self) -> None:
        """Unwoken, the sleep lasts exactly its seconds of fake time."""
        clock = FakeClock()
        sleeping = asyncio.ensure_future(Wake().sleep(clock, 3.0))
        await clock.advance(2.9)
        assert not sleeping.done()
        await clock.advance(0.1)
        assert sleeping.done() and sleeping.exception() is None

    async def test_set_ends_the_current_sleep(self) -> None:
        """`set()` during a sleep ends it at once, without an error, and cancels the timer."""
        clock = FakeClock()
        wake = Wake()
        sleeping = asyncio.ensure_future(wake.sleep(clock, 100.0))
        await clock.settle()
        wake.set()
        await clock.settle()
        assert sleeping.done() and sleeping.exception() is None
        assert clock.sleepers == 0

    async def test_set_before_makes_the_next_sleep_return_at_once(self) -> None:
        """A wake-up before the sleep is not lost; `clear()` forgets it."""
        clock = FakeClock()
        wake = Wake()
        wake.set()
        await wake.sleep(clock, 100.0)
        assert clock.sleepers == 0
        wake.clear()
        sleeping = asyncio.ensure_future(wake.sleep(clock, 100.0))
        await clock.settle()
        assert not sleeping.done()
        sleeping.cancel()

    async def test_cancelling_the_caller_still_cancels(self) -> None:
        """Cancelling the sleeping task raises CancelledError (it is not taken for a wake-up)."""
        clock = FakeClock()
        sleeping = asyncio.ensure_future(Wake().sleep(clock, 100.0))
        await clock.settle()
        sleeping.cancel()
        await clock.settle()
        assert sleeping.cancelled()
        assert clock.sleepers == 0

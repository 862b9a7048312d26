"""The start-up check of the store's settings (maxmemory-policy) waits on the injected clock,
as every timeout in the broker does, so a test (and the simulation) sees it run out."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import structlog.testing

from broker.app import CLOCK_STARTUP_WAIT, Broker, check_store_settings
from tests.support.fake_clock import FakeClock


class _SilentStore:
    """A store whose CONFIG GET never answers."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    async def check_eviction_policy(self) -> str | None:
        self.asked.set()
        await asyncio.Future()  # never answers
        return None


class _FailingStore:
    async def check_eviction_policy(self) -> str | None:
        raise RuntimeError("boom")


def _broker(store: object, clock: FakeClock) -> Broker:
    return cast(Broker, SimpleNamespace(store=store, clock=clock))


class TestCheckStoreSettings:
    async def test_gives_up_when_the_injected_clock_runs_out(self) -> None:
        """A store that does not answer is given up on after CLOCK_STARTUP_WAIT seconds of the
        injected clock (not of the event loop's): logged as unchecked, start-up carries on."""
        clock = FakeClock()
        store = _SilentStore()
        with structlog.testing.capture_logs() as logs:
            checking = asyncio.ensure_future(check_store_settings(_broker(store, clock)))
            await store.asked.wait()
            await clock.settle()
            assert not checking.done()
            await clock.advance(CLOCK_STARTUP_WAIT - 0.5)
            assert not checking.done()
            await clock.advance(1.0)
            await asyncio.wait_for(checking, 1.0)
        events: list[dict[str, Any]] = [dict(e) for e in logs]
        assert [(e["event"], e.get("reason")) for e in events] == [
            ("store.eviction_policy_unchecked", "no answer in time")
        ]

    async def test_a_failing_check_does_not_stop_start_up(self) -> None:
        """An unexpected error in the check is logged, not raised."""
        with structlog.testing.capture_logs() as logs:
            await check_store_settings(_broker(_FailingStore(), FakeClock()))
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("store.eviction_policy_unchecked", "error")
        ]

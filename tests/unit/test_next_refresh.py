"""`AppRefresher.next_refresh_at` (token_broker_next_refresh_timestamp_seconds): the wall time of
the next attempt is when the attempt really happens, after a success and after a failure; none
while the app waits for a person."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from broker.errors import TransientTokenError
from broker.metrics import Metrics
from broker.model import AppSpec, GrantType, RefreshPolicy
from broker.observe import Observer
from broker.refresher import AppRefresher
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock
from tests.support.fakes import FakeTokenSource

POLICY = RefreshPolicy(at_fraction=0.75, min_remaining=5, jitter=0.05, safety_margin=3)


@pytest.fixture
async def running() -> AsyncIterator[list[asyncio.Task[None]]]:
    """Loops started by a test, cancelled after it."""
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def start(
    clock: FakeClock,
    source: FakeTokenSource,
    running: list[asyncio.Task[None]],
    grant: GrantType = GrantType.CLIENT_CREDENTIALS,
    metrics: Metrics | None = None,
) -> AppRefresher:
    """app1's refresher on a memory store, its loop running."""
    spec = AppSpec(name="app1", token_url="http://127.0.0.1/t", grant_type=grant, refresh=POLICY)
    refresher = AppRefresher(
        spec,
        source,
        MemoryStore(clock),
        clock,
        Observer(metrics if metrics is not None else Metrics()),
        owner="r1",
        rng=random.Random(3),
    )
    running.append(asyncio.create_task(refresher.run()))
    return refresher


async def until_calls(clock: FakeClock, source: FakeTokenSource, count: int) -> float:
    """Advance in 0.1 s steps until the source has been called `count` times; the time then."""
    while len(source.calls) < count:
        await clock.advance(0.1)
    return clock.time()


class TestNextRefreshAt:
    async def test_is_when_the_next_refresh_happens(
        self, fake_clock: FakeClock, running: list[asyncio.Task[None]]
    ) -> None:
        """After a token, the time told (and exported) is inside the refresh window and the
        refresh comes then."""
        source = FakeTokenSource(fake_clock, lifetime=60.0)
        metrics = Metrics()
        refresher = start(fake_clock, source, running, metrics=metrics)
        await fake_clock.settle()
        told = refresher.next_refresh_at()
        assert told is not None
        assert fake_clock.time() + 45 - 3 <= told <= fake_clock.time() + 45 + 3 + 0.6
        assert metrics.next_refresh.labels("app1").get() == pytest.approx(told, abs=0.001)
        happened = await until_calls(fake_clock, source, 2)
        assert told <= happened <= told + 0.1 + 1e-6

    async def test_after_a_failure_is_the_retry(
        self, fake_clock: FakeClock, running: list[asyncio.Task[None]]
    ) -> None:
        """After a failed attempt, the time told is the backoff's retry: the next attempt (a
        lease taken) comes then, whether or not the fleet's backoff lets it ask the server."""
        source = FakeTokenSource(fake_clock, lifetime=60.0)
        source.failure = TransientTokenError("500", status=500)
        metrics = Metrics()
        refresher = start(fake_clock, source, running, metrics=metrics)
        attempts = metrics.lease_total.labels(app="app1", outcome="acquired")
        await fake_clock.settle()
        assert attempts.get() == 1
        told = refresher.next_refresh_at()
        assert told is not None and told > fake_clock.time()
        while attempts.get() < 2:
            await fake_clock.advance(0.1)
        assert told <= fake_clock.time() <= told + 0.1 + 1e-6

    async def test_an_attempt_in_flight_shows_when_it_started(
        self, fake_clock: FakeClock, running: list[asyncio.Task[None]]
    ) -> None:
        """An attempt still waiting for its answer is told as its start, growing older (what
        the stall alert looks for), not as "now"."""
        source = FakeTokenSource(fake_clock, lifetime=60.0)
        source.delay = 600.0
        metrics = Metrics()
        refresher = start(fake_clock, source, running, metrics=metrics)
        await fake_clock.settle()
        began = fake_clock.time()
        await fake_clock.advance(8.0)  # the request's 10 s timeout has not run out
        assert refresher.next_refresh_at() == pytest.approx(began)
        assert metrics.next_refresh.labels("app1").get() == pytest.approx(began, abs=0.001)

    async def test_none_while_waiting_for_authorization(
        self, fake_clock: FakeClock, running: list[asyncio.Task[None]]
    ) -> None:
        """An authorization-code app with nothing stored schedules nothing: None."""
        source = FakeTokenSource(fake_clock, lifetime=60.0)
        metrics = Metrics()
        refresher = start(fake_clock, source, running, GrantType.AUTHORIZATION_CODE, metrics)
        await fake_clock.settle()
        assert refresher.next_refresh_at() is None
        assert "token_broker_next_refresh_timestamp_seconds{" not in metrics.render().decode()

"""The fleet clock: the store's time measured NTP-style, smoothed, steps confirmed, with fakes."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from broker.errors import StoreUnavailable
from broker.fleetclock import (
    MEASURE_INTERVAL,
    RETRY_INTERVAL,
    SAMPLES_PER_ROUND,
    ClockSample,
    FleetClock,
    OffsetEstimator,
    stamped,
)
from broker.metrics import Metrics
from broker.model import TokenSet
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock


class FakeServer:
    """Implements ServerClock: a server `offset` s ahead of the fake wall clock, with delays."""

    def __init__(self, clock: FakeClock, offset: float) -> None:
        self.clock = clock
        self.offset = offset
        self.delays: list[tuple[float, float]] = []  # (to the server, back), one per call
        self.down = False
        self.hang = False
        self.calls = 0

    async def server_time(self) -> float:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("fake store down")
        if self.hang:
            await asyncio.get_running_loop().create_future()
        there, back = self.delays.pop(0) if self.delays else (0.001, 0.001)
        self.clock.tick(there)
        reading = self.clock.time() + self.offset
        self.clock.tick(back)
        return reading


def sample(anchor: float, round_trip: float, at: float = 100.0) -> ClockSample:
    """A sample whose midpoint anchor is `anchor`."""
    return ClockSample(at, anchor + at + round_trip / 2, at + round_trip)


class TestOffsetEstimator:
    def test_first_round_takes_the_shortest_round_trip(self) -> None:
        """Of a round, the sample with the shortest round trip (the most precise) is used."""
        estimator = OffsetEstimator()
        outcome = estimator.add_round([sample(7.3, 0.2), sample(5.0, 0.002), sample(6.0, 0.05)])
        assert outcome == "first"
        assert estimator.anchor == pytest.approx(5.0)

    def test_rounds_of_slow_round_trips_are_rejected(self) -> None:
        """Samples slower than the limit are too imprecise: the estimate is not touched."""
        estimator = OffsetEstimator(max_round_trip=0.5)
        assert estimator.add_round([sample(5.0, 0.6), sample(5.0, 2.0)]) == "rejected"
        assert estimator.anchor is None

    def test_small_changes_are_smoothed(self) -> None:
        """A change within the tolerance moves the estimate by the smoothing weight."""
        estimator = OffsetEstimator(smoothing=0.3)
        estimator.add_round([sample(5.0, 0.001)])
        assert estimator.add_round([sample(5.1, 0.001)]) == "smoothed"
        assert estimator.anchor == pytest.approx(5.03)

    def test_a_lone_jump_is_dropped(self) -> None:
        """One round far off is held back, and dropped when the next agrees with the estimate."""
        estimator = OffsetEstimator()
        estimator.add_round([sample(5.0, 0.001)])
        assert estimator.add_round([sample(65.0, 0.001)]) == "held"
        assert estimator.anchor == pytest.approx(5.0)
        assert not estimator.settled
        assert estimator.add_round([sample(5.0, 0.001)]) == "smoothed"
        assert estimator.anchor == pytest.approx(5.0)
        assert estimator.settled

    def test_a_confirmed_jump_is_applied_at_once(self) -> None:
        """A jump that the next round confirms is a real step: applied whole, not smoothed."""
        estimator = OffsetEstimator()
        estimator.add_round([sample(5.0, 0.001)])
        estimator.add_round([sample(65.0, 0.001)])
        assert estimator.add_round([sample(65.1, 0.001)]) == "stepped"
        assert estimator.anchor == pytest.approx(65.1)
        assert estimator.settled


class TestFleetClock:
    async def test_unmeasured_is_the_local_clock(self, fake_clock: FakeClock) -> None:
        """Before any measurement, fleet time is local wall time and the offset is 0."""
        clock = FleetClock(fake_clock)
        assert clock.time() == fake_clock.time()
        assert clock.offset() == 0.0
        assert not clock.measured
        fake_clock.tick(12.0)
        assert clock.offset_age() == pytest.approx(12.0)

    @pytest.mark.parametrize("offset", [-5.0, 0.0, 5.0, 3600.0])
    async def test_measured_time_is_the_servers(self, fake_clock: FakeClock, offset: float) -> None:
        """After a round, fleet time is the server's time, and offset() says by how much."""
        clock = FleetClock(fake_clock)
        assert await clock.measure(FakeServer(fake_clock, offset)) == "first"
        assert clock.time() == pytest.approx(fake_clock.time() + offset, abs=1e-6)
        assert clock.offset() == pytest.approx(offset, abs=1e-6)
        assert clock.offset_age() == 0.0
        assert clock.monotonic() == fake_clock.monotonic()

    async def test_error_is_at_most_half_the_round_trip(self, fake_clock: FakeClock) -> None:
        """With a lopsided round trip (40 ms there, 0 back), the error stays within 20 ms."""
        server = FakeServer(fake_clock, 5.0)
        server.delays = [(0.04, 0.0)] * 4
        clock = FleetClock(fake_clock)
        await clock.measure(server)
        assert abs(clock.offset() - 5.0) <= 0.02 + 1e-6  # float resolution at 1.7e9 s

    async def test_a_settled_offset_is_measured_with_one_precise_round_trip(
        self, fake_clock: FakeClock
    ) -> None:
        """The first round takes every sample; once settled, a round ends at its first precise
        sample (2 ms), and takes them all while the round trips are imprecise (40 ms)."""
        server = FakeServer(fake_clock, 5.0)
        clock = FleetClock(fake_clock)
        assert await clock.measure(server) == "first"
        assert server.calls == SAMPLES_PER_ROUND
        server.calls = 0
        assert await clock.measure(server) == "smoothed"
        assert server.calls == 1
        server.calls = 0
        server.delays = [(0.02, 0.02)] * SAMPLES_PER_ROUND
        assert await clock.measure(server) == "smoothed"
        assert server.calls == SAMPLES_PER_ROUND

    async def test_a_local_wall_step_does_not_move_fleet_time(self, fake_clock: FakeClock) -> None:
        """Fleet time runs on the monotonic clock: an NTP step of this host changes only offset()."""
        clock = FleetClock(fake_clock)
        await clock.measure(FakeServer(fake_clock, 5.0))
        before = clock.time()
        fake_clock.jump_wall(-30.0)
        assert clock.time() == pytest.approx(before)
        assert clock.offset() == pytest.approx(35.0)

    async def test_a_jump_back_that_waits_stamps_with_the_earlier_frame(
        self, fake_clock: FakeClock
    ) -> None:
        """While a jump back waits for its confirming round, fleet time keeps the later frame
        and the earliest time is the jump's; a set is stamped in it (moved earlier only)."""
        server = FakeServer(fake_clock, 20.0)
        clock = FleetClock(fake_clock)
        await clock.measure(server)
        token = TokenSet("at", "Bearer", clock.time(), clock.time() + 60.0)
        assert clock.earliest_time() == pytest.approx(clock.time())
        assert stamped(token, clock) == token
        server.offset = 0.0  # Redis's clock put right
        assert await clock.measure(server) == "held"
        assert clock.offset() == pytest.approx(20.0, abs=0.01)
        assert clock.time() - clock.earliest_time() == pytest.approx(20.0, abs=0.01)
        moved = stamped(token, clock)
        assert moved.issued_at == pytest.approx(token.issued_at - 20.0, abs=0.01)
        assert moved.expires_at == pytest.approx(token.expires_at - 20.0, abs=0.01)
        assert moved.lifetime == pytest.approx(60.0)
        assert await clock.measure(server) == "stepped"
        assert clock.earliest_time() == pytest.approx(clock.time())

    async def test_a_jump_ahead_that_waits_stamps_nothing_later(
        self, fake_clock: FakeClock
    ) -> None:
        """A jump forward that waits leaves the stamp alone: a set is never moved later."""
        server = FakeServer(fake_clock, 0.0)
        clock = FleetClock(fake_clock)
        await clock.measure(server)
        server.offset = 20.0
        assert await clock.measure(server) == "held"
        assert clock.earliest_time() == pytest.approx(clock.time())
        token = TokenSet("at", "Bearer", clock.time(), clock.time() + 60.0)
        assert stamped(token, clock) == token
        assert stamped(token, fake_clock) == token  # no fleet clock: as it is

    async def test_round_listeners_hear_a_jump_back_held_and_taken(
        self, fake_clock: FakeClock
    ) -> None:
        """Each round the store answered is told to the listeners, `back` when it held or took
        a jump back of the store's clock (never for a jump ahead, a first round, or a round
        the store did not answer); a listener removed (twice: harmless) hears nothing."""
        server = FakeServer(fake_clock, 20.0)
        clock = FleetClock(fake_clock)
        heard: list[bool] = []
        remove = clock.add_round_listener(heard.append)
        assert await clock.measure(server) == "first"
        assert await clock.measure(server) == "smoothed"
        server.offset = 0.0
        assert await clock.measure(server) == "held"
        assert await clock.measure(server) == "stepped"
        server.offset = 20.0
        assert await clock.measure(server) == "held"
        assert await clock.measure(server) == "stepped"
        server.down = True
        assert await clock.measure(server) == "unavailable"
        assert heard == [False, False, True, True, False, False]
        remove()
        remove()
        server.down = False
        await clock.measure(server)
        assert len(heard) == 6

    async def test_store_down_keeps_the_last_offset(self, fake_clock: FakeClock) -> None:
        """With the store down the last offset stays in use, and its age grows."""
        server = FakeServer(fake_clock, 5.0)
        clock = FleetClock(fake_clock)
        await clock.measure(server)
        server.down = True
        fake_clock.tick(90.0)
        assert await clock.measure(server) == "unavailable"
        assert clock.offset() == pytest.approx(5.0, abs=1e-6)
        assert clock.offset_age() == pytest.approx(90.0)

    async def test_local_store_needs_no_measurement(self, fake_clock: FakeClock) -> None:
        """memory://: the local clock is the reference; offset 0, age 0, nothing measured."""
        clock = FleetClock(fake_clock, local=True)
        server = FakeServer(fake_clock, 5.0)
        run = asyncio.ensure_future(clock.run(server))
        await fake_clock.advance(MEASURE_INTERVAL * 3)
        assert run.done()
        assert server.calls == 0
        assert clock.measured
        assert (clock.time(), clock.offset(), clock.offset_age()) == (fake_clock.time(), 0.0, 0.0)

    async def test_memory_store_answers_with_its_clock(self, fake_clock: FakeClock) -> None:
        """MemoryStore.server_time is its clock's time (offset 0 when measured against it)."""
        store = MemoryStore(fake_clock)
        clock = FleetClock(fake_clock)
        await clock.measure(store)
        assert await store.server_time() == fake_clock.time()
        assert clock.offset() == pytest.approx(0.0, abs=1e-9)

    async def test_startup_wait_is_bounded(self, fake_clock: FakeClock) -> None:
        """A store that never answers holds startup back no longer than the given wait."""
        server = FakeServer(fake_clock, 5.0)
        server.hang = True
        clock = FleetClock(fake_clock)
        waiting = asyncio.ensure_future(clock.measure_within(server, 3.0))
        await fake_clock.advance(2.9)
        assert not waiting.done()
        await fake_clock.advance(0.2)
        assert waiting.done()
        assert waiting.result() is False
        assert clock.offset() == 0.0

    async def test_run_measures_on_schedule(self, fake_clock: FakeClock) -> None:
        """Every RETRY_INTERVAL while unmeasured, then every MEASURE_INTERVAL once settled
        (its spread drawn at the middle here)."""
        server = FakeServer(fake_clock, 5.0)
        server.down = True
        clock = FleetClock(fake_clock, rng=Midpoint())
        run = asyncio.ensure_future(clock.run(server))
        try:
            await fake_clock.advance(RETRY_INTERVAL * 2 + 0.5)
            assert server.calls == 3  # at 0, 5 and 10 s: the store is down, retry soon
            server.down = False
            await fake_clock.advance(RETRY_INTERVAL)
            calls = server.calls
            assert clock.offset() == pytest.approx(5.0, abs=0.01)
            await fake_clock.advance(MEASURE_INTERVAL - 1.0)
            assert server.calls == calls  # settled: nothing before the interval
            await fake_clock.advance(1.0)
            assert server.calls > calls
        finally:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)

    async def test_a_fleet_started_together_spreads_its_rounds(self, fake_clock: FakeClock) -> None:
        """Settled clocks wait MEASURE_INTERVAL +- half of it (MEASURE_SPREAD), drawn each
        round: ten replicas started at one moment soon measure at ten moments, and some round
        falls inside any 10 s of the interval (a step of the store's clock that came and went
        between two lockstep rounds was seen by no replica: swarm seeds 20791, 28259)."""
        server = FakeServer(fake_clock, 5.0)
        clocks = [FleetClock(fake_clock, rng=random.Random(i)) for i in range(10)]
        rounds: list[float] = []
        start = fake_clock.monotonic()
        for clock in clocks:
            clock.add_round_listener(lambda back: rounds.append(fake_clock.monotonic() - start))
        runs = [asyncio.ensure_future(clock.run(server)) for clock in clocks]
        try:
            await fake_clock.advance(120.0)
            gaps = [b - a for a, b in itertools.pairwise(sorted(rounds)) if b > 60.0]
            assert max(gaps) < 10.0
            assert len(rounds) < 10 * (2 + 120.0 / (MEASURE_INTERVAL * 0.5))
        finally:
            for run in runs:
                run.cancel()
            await asyncio.gather(*runs, return_exceptions=True)


class Midpoint(random.Random):
    """Draws the middle of every range."""

    def random(self) -> float:
        """Always 0.5."""
        return 0.5


class TestClockMetrics:
    async def test_offset_and_age_are_read_at_scrape(self, fake_clock: FakeClock) -> None:
        """token_broker_clock_offset_seconds and ..._age_seconds follow the fleet clock."""
        metrics = Metrics()
        clock = FleetClock(fake_clock)
        metrics.track_clock(clock.offset, clock.offset_age, lambda: clock.measured)
        await clock.measure(FakeServer(fake_clock, -7.5))
        fake_clock.tick(42.0)
        registry = metrics.registry
        offset = registry.get_sample_value("token_broker_clock_offset_seconds")
        assert offset == pytest.approx(-7.5, abs=1e-6)
        assert registry.get_sample_value("token_broker_clock_offset_age_seconds") == 42.0

    async def test_measured_is_0_until_the_first_measurement(self, fake_clock: FakeClock) -> None:
        """token_broker_clock_offset_measured is 0 while the pod keeps time on its own clock
        alone (the store never answered), 1 from the first measurement on."""
        metrics = Metrics()
        clock = FleetClock(fake_clock)
        metrics.track_clock(clock.offset, clock.offset_age, lambda: clock.measured)
        registry = metrics.registry
        assert registry.get_sample_value("token_broker_clock_offset_measured") == 0.0
        await clock.measure(FakeServer(fake_clock, 3.0))
        assert registry.get_sample_value("token_broker_clock_offset_measured") == 1.0


class BrokenServer:
    """A ServerClock whose answer cannot be read: a bug, not an outage."""

    def __init__(self) -> None:
        self.calls = 0

    async def server_time(self) -> float:
        self.calls += 1
        raise ValueError("unreadable TIME reply")


class TestFailures:
    async def test_a_bug_does_not_stop_the_loop(self, fake_clock: FakeClock) -> None:
        """An unexpected error in one round is logged and the next round still runs."""
        server = BrokenServer()
        clock = FleetClock(fake_clock)
        assert await clock.measure_within(server, 3.0) is False
        run = asyncio.ensure_future(clock.run(server))
        try:
            await fake_clock.advance(RETRY_INTERVAL + 0.5)
            assert server.calls == 3
            assert not run.done()
        finally:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)

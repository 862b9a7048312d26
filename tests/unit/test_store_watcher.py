"""The store watcher's heartbeat (issue 20, M2): a subscription that hears nothing, not even its
own heartbeats, for SILENCE_DEADLINE seconds of the injected clock is half-open; the watcher
drops it, re-subscribes and re-reads every app, as after an outage."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from broker.core import HEARTBEAT_AFTER, SILENCE_DEADLINE, STORE_RETRY_MIN, BrokerCore
from broker.metrics import Metrics
from broker.model import AppSpec, GrantType, RefreshPolicy, TokenSet
from broker.observe import Observer
from broker.refresher import AppRefresher
from broker.serving import FORCE_MIN_AGE
from broker.store import HEARTBEAT, Notice
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock
from tests.support.fakes import FakeTokenSource

APP = "scim"


class HalfOpenStore(MemoryStore):
    """A MemoryStore whose subscriptions go half-open on demand: silent for good, no error.

    Commands, and subscriptions made after `half_open()`, work; with `deaf`, none does.
    """

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.subscriptions = 0
        self.heartbeats = 0
        self.deaf = False
        self._half_opened = 0

    def half_open(self) -> None:
        """Every subscription open now stops hearing anything."""
        self._half_opened += 1

    async def updates(self) -> AsyncIterator[Notice]:
        """MemoryStore's notices until the subscription goes half-open, then silence."""
        self.subscriptions += 1
        mark = self._half_opened
        async for notice in super().updates():
            if self._half_opened != mark or self.deaf:
                await asyncio.Future()  # no notice, no error: only a deadline ends this
            yield notice

    async def heartbeat(self) -> None:
        """Count, then publish."""
        self.heartbeats += 1
        await super().heartbeat()


def _set(clock: FakeClock, generation: int) -> TokenSet:
    now = clock.time()
    return TokenSet(
        access_token=f"at-watcher-{generation}",
        token_type="Bearer",
        issued_at=now,
        expires_at=now + 3600,
        refresh_token=f"rt-watcher-{generation}",
        lineage=1,
        generation=generation,
    )


async def _fleet_of_one(
    clock: FakeClock, store: MemoryStore, metrics: Metrics
) -> tuple[BrokerCore, asyncio.Task[None]]:
    """A core with one app whose stored set lives an hour (no refresh is due in these tests)."""
    spec = AppSpec(
        name=APP,
        token_url="http://127.0.0.1/token",
        grant_type=GrantType.AUTHORIZATION_CODE,
        refresh=RefreshPolicy(at_fraction=0.75, min_remaining=5, jitter=0.05, safety_margin=3),
    )
    refresher = AppRefresher(
        spec,
        FakeTokenSource(clock, rotate=True),
        store,
        clock,
        Observer(metrics),
        owner="r0",
        rng=random.Random(7),
    )
    await store.commit(refresher.store_name, _set(clock, 1))
    core = BrokerCore({APP: refresher}, store, clock, Observer(metrics), rng=random.Random(3))
    task = asyncio.create_task(core.run())
    await clock.advance(0.1)
    assert refresher.token is not None and refresher.token.generation == 1
    return core, task


@pytest.fixture
async def clock() -> FakeClock:
    """The injected clock."""
    return FakeClock()


class TestHeartbeat:
    async def test_a_live_subscription_hears_its_heartbeats_and_is_kept(
        self, clock: FakeClock
    ) -> None:
        """Over a quiet minute the replica publishes a heartbeat every 2 to 3 s, hears it, and
        keeps its one subscription."""
        store = HalfOpenStore(clock)
        _, task = await _fleet_of_one(clock, store, Metrics())
        try:
            with capture_logs() as logs:
                await clock.advance(60.0)
            assert store.subscriptions == 1
            assert 60 / (1.5 * HEARTBEAT_AFTER) - 1 <= store.heartbeats <= 60 / HEARTBEAT_AFTER
            assert not [e for e in logs if e["event"] == "store.subscription_stale"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def test_a_busy_channel_needs_no_heartbeat(self, clock: FakeClock) -> None:
        """Notices from other replicas say the subscription works: no heartbeat is published
        while they come more often than HEARTBEAT_AFTER."""
        store = HalfOpenStore(clock)
        _, task = await _fleet_of_one(clock, store, Metrics())
        try:
            for generation in range(2, 32):
                await store.commit("other-app", _set(clock, generation))
                await clock.advance(HEARTBEAT_AFTER * 0.9)
            assert store.heartbeats == 0
            assert store.subscriptions == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def test_a_heartbeat_is_not_handed_to_any_refresher(
        self, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A heartbeat notice names no app (""): the refresher is not told about it."""
        assert Notice(app="", kind=HEARTBEAT).app == ""
        store = HalfOpenStore(clock)
        core, task = await _fleet_of_one(clock, store, Metrics())
        heard: list[Notice] = []
        monkeypatch.setattr(core.refreshers[APP], "on_notice", heard.append)
        try:
            await clock.advance(10.0)
            assert store.heartbeats > 0
            assert heard == []
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class TestHalfOpenSubscription:
    async def test_silence_up_to_the_deadline_is_tolerated(self, clock: FakeClock) -> None:
        """Half-open for a little less than SILENCE_DEADLINE: still the first subscription,
        though heartbeats went out and none came back."""
        store = HalfOpenStore(clock)
        _, task = await _fleet_of_one(clock, store, Metrics())
        try:
            store.half_open()
            before = store.heartbeats
            await clock.advance(SILENCE_DEADLINE - 0.2)
            assert store.subscriptions == 1
            assert store.heartbeats > before
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def test_past_the_deadline_it_resubscribes_and_says_so(self, clock: FakeClock) -> None:
        """Half-open: after SILENCE_DEADLINE (plus the first reconnect delay) the watcher has a
        new subscription, logged `store.subscription_stale` (a warning) and then
        `store.reconnected`, and counted a failed `subscribe` operation."""
        store = HalfOpenStore(clock)
        metrics = Metrics()
        _, task = await _fleet_of_one(clock, store, metrics)
        try:
            with capture_logs() as logs:
                store.half_open()
                await clock.advance(SILENCE_DEADLINE + STORE_RETRY_MIN + 0.2)
            assert store.subscriptions == 2
            events = [e["event"] for e in logs]
            stale = next(e for e in logs if e["event"] == "store.subscription_stale")
            assert stale["log_level"] == "warning"
            assert SILENCE_DEADLINE <= stale["silent_for"] < SILENCE_DEADLINE + 1
            assert events.index("store.subscription_stale") < events.index("store.reconnected")
            errors = metrics.store_errors.labels(operation="subscribe")._value.get()
            assert errors == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def test_a_set_committed_while_deaf_is_adopted_after_the_deadline(
        self, clock: FakeClock
    ) -> None:
        """Another replica commits a newer set while this one's subscription is half-open (the
        notice is lost): the replica still serves the old set until the deadline, and the
        newer one once it re-subscribed and re-read the store (long before its 30 s sync)."""
        store = HalfOpenStore(clock)
        core, task = await _fleet_of_one(clock, store, Metrics())
        refresher = core.refreshers[APP]
        try:
            store.half_open()
            await clock.advance(0.5)
            await store.commit(refresher.store_name, _set(clock, 2))
            await clock.advance(SILENCE_DEADLINE - 1.0)
            assert refresher.token is not None and refresher.token.generation == 1
            await clock.advance(STORE_RETRY_MIN + 1.0)
            assert refresher.token is not None and refresher.token.generation == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def test_a_subscription_that_stays_deaf_backs_off(self, clock: FakeClock) -> None:
        """No subscription carries anything (a path that drops them all): the reconnect delay
        doubles (0.5, 1, 2, 4 s) instead of re-reading every app every 5.5 s."""
        store = HalfOpenStore(clock)
        _, task = await _fleet_of_one(clock, store, Metrics())
        try:
            with capture_logs() as logs:
                store.deaf = True
                await clock.advance(4 * SILENCE_DEADLINE + 0.5 + 1 + 2 + 1.0)
            delays = [e["retry_in"] for e in logs if e["event"] == "store.subscription_stale"]
            assert delays == [0.5, 1.0, 2.0, 4.0]
            assert store.subscriptions == 4
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class CountingStore(HalfOpenStore):
    """A HalfOpenStore that counts the watcher's pings (one per reconnect attempt)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.pings = 0

    async def ping(self) -> None:
        """Count, then answer (or fail while `fail`)."""
        self.pings += 1
        await super().ping()


class TestReconnectDelay:
    async def test_a_store_down_for_everyone_backs_off(self, clock: FakeClock) -> None:
        """Nothing of this replica's is at stake: while the store is down the reconnect delay
        doubles up to STORE_RETRY_MAX (0.5, 1, 2, 4, 5, 5 s: 6 attempts in 17.5 s)."""
        store = CountingStore(clock)
        _, task = await _fleet_of_one(clock, store, Metrics())
        try:
            store.fail = True
            await store.close()  # the restart drops the subscription
            pings = store.pings
            await clock.advance(0.5 + 1 + 2 + 4 + 5 + 5 + 0.1)
            assert store.pings - pings == 6
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def test_a_holder_of_a_token_in_flight_or_an_unstored_set_retries_soon(
        self, clock: FakeClock
    ) -> None:
        """The store goes down while this replica's refresh token is on the wire, and the
        answer cannot be committed: this replica holds what a store that forgot may lack (its
        veto, then the rotated set), and a replica that spends the old set after the long
        objection window must hear of it first. The watcher retries every STORE_RETRY_MIN,
        not at a delay grown to 5 s, and the set is written back at once when the store is
        back; then the backoff doubles again."""
        store = CountingStore(clock)
        core, task = await _fleet_of_one(clock, store, Metrics())
        refresher = core.refreshers[APP]
        source = refresher.source
        assert isinstance(source, FakeTokenSource)
        source.delay = 4.0
        await clock.advance(FORCE_MIN_AGE)  # (a younger token is served, not refreshed)
        try:
            forced = asyncio.ensure_future(core.force_refresh(APP))
            await clock.advance(1.0)
            assert refresher.fleet.in_flight is not None and refresher.must_reach_store
            store.fail = True
            await store.close()
            pings = store.pings
            await clock.advance(10.0)  # the answer came at 4.5 s; its commit failed
            assert refresher.fleet.in_flight is None and refresher.must_reach_store
            assert refresher.token is not None and refresher.token.generation == 2
            assert store.pings - pings >= 10 / STORE_RETRY_MIN - 1
            store.fail = False
            await clock.advance(STORE_RETRY_MIN + 0.1)
            stored = await store.load(refresher.store_name)
            assert stored is not None and stored.generation == 2
            assert not refresher.must_reach_store
            store.fail = True
            await store.close()
            pings = store.pings
            await clock.advance(0.5 + 1 + 2 + 4 + 0.1)
            assert store.pings - pings == 4
        finally:
            forced.cancel()
            task.cancel()
            await asyncio.gather(forced, task, return_exceptions=True)

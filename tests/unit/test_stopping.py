"""Stopping (SIGTERM, an app's removal) with a spend in flight (issue 20, H5): a spend not yet
marked sent ends as aborted and is never sent; one already sent is awaited to its answer and
committed; the drain's bound (the lease plus the read timeout) runs on the injected clock."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from broker.core import BrokerCore
from broker.errors import StoreUnavailable
from broker.fleet import Busy, Fetched, FleetProtocol, Timing
from broker.metrics import Metrics
from broker.model import AppSpec, GrantType, RefreshPolicy, TokenSet
from broker.observe import Observer
from broker.refresher import AppRefresher, drain_bound
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock
from tests.support.fakes import (
    FLEET_APP,
    CurrentSet,
    FakeTokenSource,
    fleet_protocol,
    spendable_grant,
)

APP = FLEET_APP


def _grant(clock: FakeClock, *, expires_in: float = 20.0) -> TokenSet:
    return spendable_grant(clock, "at-stopping-1", "rt-stopping", expires_in=expires_in)


def _protocol(store: MemoryStore, clock: FakeClock, token: TokenSet) -> FleetProtocol:
    return fleet_protocol(store, clock, CurrentSet(token, adopts=False), timing=Timing())


async def _advance_until(
    clock: FakeClock, condition: Callable[[], object], limit: float = 30.0
) -> None:
    waited = 0.0
    while not condition():
        if waited >= limit:
            raise AssertionError("the awaited moment did not come")
        await clock.advance(0.1)
        waited += 0.1


async def test_stopping_inside_the_objection_window_aborts_the_spend_unsent() -> None:
    """SIGTERM while a spend is announced (the long window after an outage): the spend ends as
    aborted at once, the lease is released, and the refresh token is never sent."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    protocol = _protocol(store, clock, token)
    sent: list[str | None] = []

    async def fetch(refresh_token: str | None) -> TokenSet:
        sent.append(refresh_token)
        raise AssertionError("a refresh token was sent after stop()")

    refresh = asyncio.ensure_future(
        protocol.refresh(fetch, is_due=lambda _: True, servable_left=0.0)
    )
    await _advance_until(clock, lambda: APP in store.state.spends)
    assert store.state.spends[APP].state == "announced"
    started = clock.monotonic()

    protocol.stop()
    await clock.advance(0.1)

    assert refresh.done()
    assert isinstance(refresh.result(), Busy)
    assert clock.monotonic() - started < protocol.timing.objection_idle  # cut short
    assert sent == []
    assert APP not in store.state.spends  # nobody waits on a spend that will not happen
    assert APP not in store.state.leases


async def test_stopping_after_sending_awaits_the_answer_past_the_lease() -> None:
    """SIGTERM with the refresh token on the wire: the answer (after 20 s, past the lease and
    the old 15 s drain) is awaited and committed."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    protocol = _protocol(store, clock, token)

    async def slow(refresh_token: str | None) -> TokenSet:
        await clock.sleep(20.0)
        now = clock.time()
        return TokenSet("at-new", "Bearer", now, now + 60, None, "rt-new")

    refresh = asyncio.ensure_future(
        protocol.refresh(slow, is_due=lambda _: True, servable_left=0.0)
    )
    await _advance_until(
        clock, lambda: APP in store.state.spends and store.state.spends[APP].state == "sent"
    )
    protocol.stop()
    await clock.advance(19.0)
    assert not refresh.done()
    await clock.advance(2.0)
    outcome = refresh.result()
    assert isinstance(outcome, Fetched) and outcome.persisted
    stored = await store.load(APP)
    assert stored is not None and stored.refresh_token == "rt-new"


def test_the_drain_bound_is_the_lease_plus_the_read_timeout() -> None:
    """6 s objection + 10 s request + 1 s commit + 0.5 s margin + 120 s read timeout; a grant
    that spends nothing waits only for its request and commit."""
    assert drain_bound(Timing(), spends=True) == 137.5
    assert drain_bound(Timing(read_timeout=30.0), spends=True) == 47.5
    assert drain_bound(Timing(), spends=False) == 11.5


def _refresher(clock: FakeClock, store: MemoryStore, source: FakeTokenSource) -> AppRefresher:
    spec = AppSpec(
        name=APP,
        token_url="http://127.0.0.1/token",
        grant_type=GrantType.AUTHORIZATION_CODE,
        refresh=RefreshPolicy(at_fraction=0.75, min_remaining=5, jitter=0.05, safety_margin=3),
    )
    return AppRefresher(
        spec, source, store, clock, Observer(Metrics()), owner="r0", rng=random.Random(7)
    )


async def _core_with_a_sent_request(
    delay: float,
) -> tuple[FakeClock, MemoryStore, BrokerCore, asyncio.Task[None]]:
    clock = FakeClock()
    store = MemoryStore(clock)
    source = FakeTokenSource(clock, rotate=True)
    source.delay = delay
    refresher = _refresher(clock, store, source)
    await store.commit(refresher.store_name, _grant(clock, expires_in=5.0))  # due now
    core = BrokerCore({APP: refresher}, store, clock, Observer(Metrics()))
    task = asyncio.create_task(core.run())
    await _advance_until(clock, lambda: source.calls)
    return clock, store, core, task


async def test_the_drain_waits_on_the_injected_clock_for_the_answer() -> None:
    """Draining with a sent request answered after 100 s: the drain is still waiting at 99 s
    of the injected clock (no real time passes), then stores the answer and returns."""
    clock, store, core, task = await _core_with_a_sent_request(100.0)
    try:
        drain = asyncio.ensure_future(core.drain())
        await clock.advance(99.0)
        assert not drain.done()
        await clock.advance(2.0)
        assert drain.done()
        stored = await store.load(core.refreshers[APP].store_name)
        assert stored is not None and stored.generation == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_drains_bound_runs_on_the_injected_clock() -> None:
    """A drain bounded at 5 s gives up when the injected clock says 5 s passed, not before,
    and without waiting 5 real seconds."""
    clock, _, core, task = await _core_with_a_sent_request(100.0)
    try:
        real = time.monotonic()
        drain = asyncio.ensure_future(core.drain(5.0))
        await clock.advance(4.9)
        assert not drain.done()
        await clock.advance(0.2)
        assert drain.done()
        assert time.monotonic() - real < 2.0
    finally:
        task.cancel()
        inflight = core.refreshers[APP]._inflight
        if inflight is not None:
            inflight.cancel()
        await asyncio.gather(task, *([inflight] if inflight else []), return_exceptions=True)


async def test_a_drain_that_never_reaches_the_store_names_its_unwritten_abort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM as the store goes down right after applying `mark_sent` (the answer lost: the
    token is never sent), down for the whole drain: the drain tries to write the abort to its
    bound, then logs `spend.abort_unwritten` with the spend's owner and fence (the record the
    store keeps, `sent`, which no other replica can tell from a request on the wire)."""
    clock = FakeClock()
    store = MemoryStore(clock)
    source = FakeTokenSource(clock, rotate=True)
    refresher = _refresher(clock, store, source)
    await store.commit(refresher.store_name, _grant(clock, expires_in=5.0))  # due now
    mark_sent = store.mark_sent

    async def mark_then_go_down(app: str, *, owner: str, fence: int) -> bool:
        await mark_sent(app, owner=owner, fence=fence)
        store.fail = True
        raise StoreUnavailable("simulated: the answer to mark_sent lost")

    monkeypatch.setattr(store, "mark_sent", mark_then_go_down)
    core = BrokerCore({APP: refresher}, store, clock, Observer(Metrics()))
    task = asyncio.create_task(core.run())
    try:
        await _advance_until(clock, lambda: store.fail)
        record = store.state.spends[refresher.store_name]
        with capture_logs() as logs:
            drain = asyncio.ensure_future(core.drain())
            await clock.advance(core.drain_bound() - 1.0)
            assert not drain.done()  # still trying to write the abort
            await clock.advance(2.0)
            assert drain.done()
        assert source.calls == []
        assert store.state.spends[refresher.store_name].state == "sent"
        unwritten = [e for e in logs if e["event"] == "spend.abort_unwritten"]
        assert len(unwritten) == 1, logs
        assert unwritten[0]["owner"] == "r0" and unwritten[0]["fence"] == record.fence
        assert unwritten[0]["log_level"] == "error"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

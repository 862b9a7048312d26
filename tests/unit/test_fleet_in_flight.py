"""A spend in flight (issue 20): the spender vetoes a second spend of its token (C1), a store
that forgot makes spends wait the long objection window (C1), invalid_grant for a sent token is
reuse detected (C1), and a sent request is awaited past its lease to the read timeout (H1)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from broker.errors import PermanentTokenError
from broker.fleet import Fetched, FleetProtocol, ReuseDetected, Timing
from broker.model import TokenSet
from broker.store import Notice
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock
from tests.support.fakes import FLEET_APP, CurrentSet, fleet_protocol, spendable_grant

APP = FLEET_APP


def _grant(clock: FakeClock) -> TokenSet:
    return spendable_grant(clock, "at-in-flight-1", "rt-in-flight")


def _protocol(
    store: MemoryStore, clock: FakeClock, owner: str, holder: CurrentSet, **timing: float
) -> FleetProtocol:
    return fleet_protocol(store, clock, holder, owner=owner, timing=Timing(**timing))


def _fresh(clock: FakeClock) -> TokenSet:
    now = clock.time()
    return TokenSet("at-new", "Bearer", now, now + 60, None, "rt-new")


async def _run_until_sent(clock: FakeClock, store: MemoryStore) -> None:
    for _ in range(200):
        spend = store.state.spends.get(APP)
        if spend is not None and spend.state == "sent":
            return
        await clock.advance(0.1)
    raise AssertionError("the spend was never marked sent")


async def test_the_spender_vetoes_another_spend_of_its_token_in_flight() -> None:
    """While its refresh token is on the wire, the spender vetoes a spend of the same token
    announced by a replica that never heard the `sent` notice (a new pod after an empty
    restart), both on the notice and on its reconnect."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    spender = _protocol(store, clock, "r0", CurrentSet(token))
    answer: asyncio.Future[TokenSet] = asyncio.get_running_loop().create_future()

    async def slow_fetch(refresh_token: str | None) -> TokenSet:
        return await answer

    refresh = asyncio.ensure_future(
        spender.refresh(slow_fetch, is_due=lambda _: True, servable_left=10.0)
    )
    await _run_until_sent(clock, store)
    assert spender.in_flight == token.refresh_fingerprint
    newcomer_spend = Notice(
        APP, "spend", rank=token.rank, refresh_fp=token.refresh_fingerprint, owner="r1.2"
    )
    assert spender.must_veto(newcomer_spend)

    # The store restarts empty; the new pod writes the set back and announces a spend.
    store.state.spends.clear()
    store.state.leases.clear()
    lease = await store.acquire_lease(APP, "r1.2", 30.0)
    assert (await store.begin_spend(APP, owner="r1.2", fence=lease.fence, token=token)) == "ok"
    await spender.veto_in_flight()  # what a reconnect triggers
    assert not await store.mark_sent(APP, owner="r1.2", fence=lease.fence)

    answer.set_result(_fresh(clock))
    await clock.advance(1.0)
    assert isinstance(await refresh, Fetched)
    assert spender.in_flight is None


async def test_a_write_back_makes_spends_wait_the_long_objection_window_for_a_while() -> None:
    """A write-back that stored a set is evidence that the store forgot: for `forgetful_for`
    seconds every spend waits the long objection window, even with a servable token."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    protocol = _protocol(store, clock, "r1", CurrentSet(token), forgetful_for=60.0)
    assert protocol.objection_window(10.0) == protocol.timing.objection

    assert await protocol.sync()  # the store is empty: our set is written back

    assert protocol.objection_window(10.0) == protocol.timing.objection_idle
    assert protocol.lease_ttl(10.0) > protocol.timing.objection_idle + protocol.timing.max_attempt
    await clock.advance(61.0)
    assert protocol.objection_window(10.0) == protocol.timing.objection


async def test_a_dropped_store_connection_makes_spends_wait_the_long_objection_window() -> None:
    """A dropped subscription is evidence that the store may have forgotten (a restart or a
    rollback drops every connection, and may erase a `sent` record while the set survives):
    for `forgetful_for` seconds the set held then waits the long window (swarm seed 5310)."""
    clock = FakeClock()
    store = MemoryStore(clock)
    holder = CurrentSet(_grant(clock))
    protocol = _protocol(store, clock, "r1", holder, forgetful_for=60.0)
    assert protocol.objection_window(10.0) == protocol.timing.objection

    protocol.note_connection_lost()

    assert protocol.objection_window(10.0) == protocol.timing.objection_idle
    held = holder.token
    assert held is not None
    holder.token = replace(held, generation=held.generation + 1)  # issued after the drop
    assert protocol.objection_window(10.0) == protocol.timing.objection
    holder.token = held
    await clock.advance(61.0)
    assert protocol.objection_window(10.0) == protocol.timing.objection


async def test_the_long_objection_window_ends_with_the_first_set_newer_than_the_write_back() -> (
    None
):
    """Only the refresh token of the set written back (or an older one) can have been in flight
    when the store forgot: once a newer set is held, spends use the short window again, so a
    fleet of tokens shorter than the long window keeps serving after a store restart."""
    clock = FakeClock()
    store = MemoryStore(clock)
    holder = CurrentSet(_grant(clock))
    protocol = _protocol(store, clock, "r1", holder, forgetful_for=60.0)
    assert await protocol.sync()  # written back: the store forgot
    assert protocol.objection_window(10.0) == protocol.timing.objection_idle

    written_back = holder.token
    assert written_back is not None
    holder.token = replace(written_back, generation=written_back.generation + 1)
    assert protocol.objection_window(10.0) == protocol.timing.objection
    holder.token = written_back  # the same rank again (a replica that did not adopt yet)
    assert protocol.objection_window(10.0) == protocol.timing.objection_idle


async def test_invalid_grant_for_a_sent_token_is_reuse_detected() -> None:
    """invalid_grant for a refresh token this replica sent is proof of a double spend: the
    outcome says so, and the token is never presented again by this replica."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    protocol = _protocol(store, clock, "r0", CurrentSet(token))

    async def refused(refresh_token: str | None) -> TokenSet:
        raise PermanentTokenError("invalid_grant", status=400, error="invalid_grant")

    refresh = asyncio.ensure_future(
        protocol.refresh(refused, is_due=lambda _: True, servable_left=10.0)
    )
    await clock.advance(2.0)
    outcome = await refresh

    assert isinstance(outcome, ReuseDetected)
    assert protocol.outcome_unknown(token)
    assert "rt-in-flight" not in outcome.reason


async def test_a_sent_request_is_awaited_past_its_lease_and_committed() -> None:
    """An answer that comes after the request budget and the lease (14 s against 10 s) is
    awaited, not cancelled, and committed: the grant stays intact."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    protocol = _protocol(store, clock, "r0", CurrentSet(token))
    cancelled = False

    async def slow_fetch(refresh_token: str | None) -> TokenSet:
        nonlocal cancelled
        try:
            await clock.sleep(14.0)
        except asyncio.CancelledError:
            cancelled = True
            raise
        return _fresh(clock)

    refresh = asyncio.ensure_future(
        protocol.refresh(slow_fetch, is_due=lambda _: True, servable_left=10.0)
    )
    for _ in range(40):
        await clock.advance(0.5)
    outcome = await refresh

    assert not cancelled
    assert isinstance(outcome, Fetched) and outcome.persisted
    stored = await store.load(APP)
    assert stored is not None and stored.rank == (1, 3)


async def test_a_sent_request_is_given_up_only_at_the_read_timeout() -> None:
    """With no answer at all, the request is abandoned at the read timeout (on the injected
    clock), and its outcome is unknown."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    protocol = _protocol(store, clock, "r0", CurrentSet(token), read_timeout=30.0)
    never: asyncio.Future[TokenSet] = asyncio.get_running_loop().create_future()

    async def silent(refresh_token: str | None) -> TokenSet:
        return await never

    refresh = asyncio.ensure_future(
        protocol.refresh(silent, is_due=lambda _: True, servable_left=10.0)
    )
    for _ in range(50):
        await clock.advance(0.5)
    assert not refresh.done()  # 25 s: past the lease, still waiting
    for _ in range(20):
        await clock.advance(0.5)
    outcome = await refresh
    assert type(outcome).__name__ == "OutcomeUnknown"

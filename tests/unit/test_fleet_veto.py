"""A replica that remembers a lost reply vetoes a spend it missed the notice of (seed 4556)."""

from __future__ import annotations

from broker.fleet import FleetProtocol
from broker.model import TokenSet
from broker.store import SpendStart
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock

APP = "scim"


def _grant(clock: FakeClock) -> TokenSet:
    now = clock.time()
    return TokenSet(
        access_token="at-vetoed-1",
        token_type="Bearer",
        issued_at=now - 100,
        expires_at=now - 40,
        refresh_token="rt-spent-once",
        lineage=1,
        generation=2,
    )


def _protocol(store: MemoryStore, clock: FakeClock, owner: str, token: TokenSet) -> FleetProtocol:
    return FleetProtocol(
        APP,
        store,
        clock,
        owner=owner,
        spends_refresh_tokens=True,
        current=lambda: token,
        adopt=lambda _: None,
    )


async def _announce(store: MemoryStore, owner: str, token: TokenSet) -> int:
    lease = await store.acquire_lease(APP, owner, 30.0)
    assert lease.held
    assert await store.begin_spend(APP, owner=owner, fence=lease.fence, token=token) is (
        SpendStart.OK
    )
    return lease.fence


async def test_resync_vetoes_an_announced_spend_of_a_token_remembered_as_spent() -> None:
    """Re-syncing after a reconnect vetoes another replica's announced spend of a refresh token
    this replica remembers as sent with no known outcome, so the token never leaves twice."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    remembers = _protocol(store, clock, "r0", token)
    remembers._unknown.add(token.refresh_fingerprint or "")
    fence = await _announce(store, "r1", token)  # r1 restarted and forgot; r0 missed the notice

    assert await remembers.sync()

    assert not await store.mark_sent(APP, owner="r1", fence=fence)


async def test_resync_leaves_a_spend_alone_when_nothing_is_remembered() -> None:
    """A replica with no memory of an earlier spend does not veto one when it re-syncs."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    bystander = _protocol(store, clock, "r0", token)
    fence = await _announce(store, "r1", token)

    assert await bystander.sync()

    assert await store.mark_sent(APP, owner="r1", fence=fence)

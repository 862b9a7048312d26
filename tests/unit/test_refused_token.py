"""Issue 22: a token the upstream refused is purged fleet-wide, once.

The store's compare-and-set (MemoryStore, the fake and `memory://` store; the Redis script is
held to the same rules by tests/integration/test_store_contract.py), and refreshers sharing
one store: a refusal reported by every replica costs the fleet one refresh, and a refusal of
a token already replaced costs none.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import pytest

from broker.errors import RateLimited
from broker.metrics import Metrics
from broker.model import AppSpec, GrantType, RefreshPolicy, TokenSet
from broker.observe import Observer
from broker.refresher import AppRefresher
from broker.serving import PURGE_INTERVAL
from broker.store import REFUSED, Notice, Refusal, bound_name, client_binding
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock
from tests.support.fakes import FakeTokenSource

POLICY = RefreshPolicy(at_fraction=0.75, min_remaining=5, jitter=0.05, safety_margin=3)
APP = "app1"


def token(access: str, generation: int, now: float) -> TokenSet:
    """A set of lineage 1 issued `now`, living 60 s."""
    return TokenSet(
        access, "Bearer", now, now + 60, None, f"refresh-{access}", 1, generation=generation
    )


@pytest.fixture
def store(fake_clock: FakeClock) -> MemoryStore:
    """An in-memory store on the fake clock."""
    return MemoryStore(fake_clock)


class TestRefuseToken:
    """MemoryStore.refuse_token: a compare-and-set on the stored set, one per interval."""

    async def test_the_stored_sets_token_is_recorded_and_announced(
        self, store: MemoryStore, fake_clock: FakeClock
    ) -> None:
        """A refusal of the stored set's access token is recorded, with a REFUSED notice that
        names its fingerprint (never the token)."""
        stored = token("access-one-000000000000", 1, fake_clock.time())
        await store.commit(APP, stored)
        updates = cast(AsyncGenerator[Notice, None], store.updates())
        heard = asyncio.ensure_future(anext(updates))
        await asyncio.sleep(0)
        answer = await store.refuse_token(APP, stored.fingerprint, interval=10.0)
        notice = await heard
        await updates.aclose()
        assert answer is Refusal.RECORDED
        assert (notice.kind, notice.access_fp) == (REFUSED, stored.fingerprint)
        assert stored.access_token not in notice.encode()

    async def test_an_old_token_cannot_purge_a_newer_one(
        self, store: MemoryStore, fake_clock: FakeClock
    ) -> None:
        """A refusal of a token that is no longer stored (or of any token while none is) is
        STALE: nothing recorded, nothing announced, the newer set untouched."""
        now = fake_clock.time()
        old, new = token("access-old-000000000000", 1, now), token("access-new-00000000000", 2, now)
        assert await store.refuse_token(APP, old.fingerprint, interval=10.0) is Refusal.STALE
        await store.commit(APP, old)
        await store.commit(APP, new)
        assert await store.refuse_token(APP, old.fingerprint, interval=10.0) is Refusal.STALE
        assert APP not in store.state.refused
        assert await store.refuse_token(APP, new.fingerprint, interval=10.0) is Refusal.RECORDED

    async def test_once_per_interval(self, store: MemoryStore, fake_clock: FakeClock) -> None:
        """The same token again within the interval is ALREADY; a successor refused within it
        is LIMITED; after the interval a refusal is recorded again."""
        now = fake_clock.time()
        first, second = token("access-1-0000000000000", 1, now), token("access-2-000000000", 2, now)
        await store.commit(APP, first)
        assert await store.refuse_token(APP, first.fingerprint, interval=10.0) is Refusal.RECORDED
        assert await store.refuse_token(APP, first.fingerprint, interval=10.0) is Refusal.ALREADY
        await store.commit(APP, second)
        assert await store.refuse_token(APP, second.fingerprint, interval=10.0) is Refusal.LIMITED
        await fake_clock.advance(10.0)
        assert await store.refuse_token(APP, second.fingerprint, interval=10.0) is Refusal.RECORDED

    def test_the_notice_round_trips(self) -> None:
        """A REFUSED notice keeps its fingerprint on the wire; other notices carry none."""
        notice = Notice("app1@0123", REFUSED, access_fp="abcdef012345")
        assert Notice.decode(notice.encode()) == notice
        assert "afp" not in Notice("app1@0123", "token").encode()


# ---- refreshers sharing one store ------------------------------------------------------------


def spec(grant: GrantType) -> AppSpec:
    """The app every refresher here serves."""
    return AppSpec(name=APP, token_url="http://127.0.0.1/token", grant_type=grant, refresh=POLICY)


def key(grant: GrantType) -> str:
    """The store name of the app."""
    app = spec(grant)
    return bound_name(app.name, client_binding(app, app.client_id))


class Fleet:
    """Refreshers on one store, each hearing the store's notices as BrokerCore dispatches them."""

    def __init__(self, store: MemoryStore, clock: FakeClock, grant: GrantType) -> None:
        self.store = store
        self.clock = clock
        self.grant = grant
        self.sources: list[FakeTokenSource] = []
        self.replicas: list[AppRefresher] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.metrics = Metrics()

    def start(self, count: int) -> None:
        """Start `count` replicas."""
        for index in range(count):
            source = FakeTokenSource(
                self.clock, lifetime=60.0, rotate=self.grant is GrantType.AUTHORIZATION_CODE
            )
            replica = AppRefresher(
                spec(self.grant),
                source,
                self.store,
                self.clock,
                Observer(self.metrics),
                owner=f"r{index}",
                rng=random.Random(index),
            )
            self.sources.append(source)
            self.replicas.append(replica)
            self.tasks.append(asyncio.create_task(replica.run()))
            self.tasks.append(asyncio.create_task(self._hear(replica)))

    async def _hear(self, replica: AppRefresher) -> None:
        async for notice in self.store.updates():
            replica.on_notice(notice)

    @property
    def requests(self) -> int:
        """Token requests the fleet made."""
        return sum(len(source.calls) for source in self.sources)

    async def stop(self) -> None:
        """Cancel every loop."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture(params=[GrantType.CLIENT_CREDENTIALS, GrantType.AUTHORIZATION_CODE])
async def fleet(
    request: pytest.FixtureRequest, store: MemoryStore, fake_clock: FakeClock
) -> AsyncIterator[Fleet]:
    """Four replicas sharing the store and holding one token (both grants)."""
    grant = cast(GrantType, request.param)
    if grant is GrantType.AUTHORIZATION_CODE:
        now = fake_clock.time()
        seed = TokenSet(
            "seed-access-000000000000", "Bearer", now, now + 60, None, "seed-refresh-000", 1, 1
        )
        await store.commit(key(grant), seed)
    fleet = Fleet(store, fake_clock, grant)
    fleet.start(4)
    await fake_clock.advance(8.0)  # every replica holds the fleet's set (one refresh or none)
    yield fleet
    await fleet.stop()


async def report_all(fleet: Fleet, refused: TokenSet) -> list[TokenSet]:
    """Every replica reports `refused` at once; what each would retry with."""
    reports = [asyncio.ensure_future(r.refused(refused)) for r in fleet.replicas]
    for _ in range(40):
        await fleet.clock.advance(0.25)
        if all(report.done() for report in reports):
            break
    return [await report for report in reports]


class TestPurge:
    async def test_every_replica_reporting_costs_the_fleet_one_refresh(self, fleet: Fleet) -> None:
        """Four replicas whose upstream refused the same token: one refresh (under the lease;
        a rotating grant spends its refresh token once), and every replica retries with the
        new token, well before the refused one was due."""
        held = fleet.replicas[0].token
        assert held is not None and all(r.token == held for r in fleet.replicas)
        before = fleet.requests
        retried = await report_all(fleet, held)
        assert fleet.requests == before + 1
        assert len({t.access_token for t in retried}) == 1
        assert retried[0].access_token != held.access_token
        assert all(r.token is not None and r.token.rank > held.rank for r in fleet.replicas)
        counted = fleet.metrics.token_refused_total
        assert counted.labels(app=APP, outcome="recorded")._value == 1
        assert counted.labels(app=APP, outcome="already")._value == 3

    async def test_a_refusal_of_a_replaced_token_refreshes_nothing(self, fleet: Fleet) -> None:
        """A late 401 for the token before the purge (a slow request, a replica that held it
        longer) is stale: the newer token is retried, no second refresh, at any age."""
        held = fleet.replicas[0].token
        assert held is not None
        await report_all(fleet, held)
        after = fleet.requests
        await fleet.clock.advance(PURGE_INTERVAL + 6.0)  # past the interval and the 5 s guard
        retried = await report_all(fleet, held)
        assert fleet.requests == after
        assert all(t.access_token != held.access_token for t in retried)

    async def test_the_successor_refused_soon_after_is_rate_limited(self, fleet: Fleet) -> None:
        """An upstream that refuses every token costs one refresh per PURGE_INTERVAL: the
        successor refused within it is LIMITED (the caller gets the upstream's answer)."""
        held = fleet.replicas[0].token
        assert held is not None
        await report_all(fleet, held)
        successor = fleet.replicas[1].token
        assert successor is not None and successor != held
        after = fleet.requests
        with pytest.raises(RateLimited):
            await fleet.replicas[1].refused(successor)
        await fleet.clock.advance(1.0)
        assert fleet.requests == after

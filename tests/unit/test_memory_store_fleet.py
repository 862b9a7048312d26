"""MemoryStore's fleet primitives: the shared failure record, the request budget, and a spend
record's ending after a rollback."""

from __future__ import annotations

import pytest

from broker.errors import StoreUnavailable
from broker.model import FailureRecord, TokenSet
from broker.store import BUDGET_WINDOW, FAILURE_RETENTION, SpendEnd, SpendStart
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock


@pytest.fixture
def store(fake_clock: FakeClock) -> MemoryStore:
    """An in-memory store on the fake clock."""
    return MemoryStore(fake_clock)


class TestFailureRecord:
    async def test_round_trip(self, store: MemoryStore, fake_clock: FakeClock) -> None:
        """A recorded failure loads back as written; other apps have none."""
        not_before = fake_clock.time() + 8.0
        await store.record_failure(
            "app1", failures=3, not_before=not_before, error="transient: http 503", permanent=False
        )
        assert await store.load_failure("app1") == FailureRecord(
            3, not_before, "transient: http 503", False
        )
        assert await store.load_failure("app2") is None

    async def test_a_newer_record_replaces_the_older(
        self, store: MemoryStore, fake_clock: FakeClock
    ) -> None:
        """The latest outcome wins."""
        now = fake_clock.time()
        await store.record_failure(
            "app1", failures=1, not_before=now + 1, error="a", permanent=False
        )
        await store.record_failure(
            "app1", failures=2, not_before=now + 300, error="b", permanent=True
        )
        assert await store.load_failure("app1") == FailureRecord(2, now + 300, "b", True)

    async def test_clear(self, store: MemoryStore, fake_clock: FakeClock) -> None:
        """After clear_failure (a success) there is no record; clearing none is fine."""
        await store.record_failure(
            "app1", failures=1, not_before=fake_clock.time(), error="e", permanent=False
        )
        await store.clear_failure("app1")
        await store.clear_failure("app1")
        assert await store.load_failure("app1") is None

    async def test_lapses_after_the_retention(
        self, store: MemoryStore, fake_clock: FakeClock
    ) -> None:
        """The record stays FAILURE_RETENTION past not_before (so the count goes on), then lapses."""
        not_before = fake_clock.time() + 10.0
        await store.record_failure(
            "app1", failures=4, not_before=not_before, error="e", permanent=False
        )
        await fake_clock.advance(10.0 + FAILURE_RETENTION - 1.0)
        assert await store.load_failure("app1") is not None
        await fake_clock.advance(1.0)
        assert await store.load_failure("app1") is None


class TestBudget:
    async def test_allows_the_limit_then_refuses(self, store: MemoryStore) -> None:
        """`limit` requests in a minute pass; the next is refused until the oldest leaves."""
        results = [await store.take_budget("app1", 3, 1000.0 + i) for i in range(3)]
        assert results == [(True, 0.0)] * 3
        allowed, retry_after = await store.take_budget("app1", 3, 1010.0)
        assert not allowed
        assert retry_after == pytest.approx(1000.0 + BUDGET_WINDOW - 1010.0)

    async def test_the_window_slides(self, store: MemoryStore) -> None:
        """A request is allowed again once the oldest counted one is a window old."""
        for i in range(3):
            await store.take_budget("app1", 3, 1000.0 + i)
        assert (await store.take_budget("app1", 3, 1000.0 + BUDGET_WINDOW - 0.01))[0] is False
        assert await store.take_budget("app1", 3, 1000.0 + BUDGET_WINDOW) == (True, 0.0)

    async def test_refused_requests_are_not_counted(self, store: MemoryStore) -> None:
        """Refusals do not push the window: after it slides, the full limit is there again."""
        await store.take_budget("app1", 1, 1000.0)
        for i in range(10):
            assert (await store.take_budget("app1", 1, 1001.0 + i))[0] is False
        assert (await store.take_budget("app1", 1, 1000.0 + BUDGET_WINDOW))[0] is True

    async def test_apps_have_their_own_budget(self, store: MemoryStore) -> None:
        """One app's spent budget does not refuse another's requests."""
        await store.take_budget("app1", 1, 1000.0)
        assert await store.take_budget("app2", 1, 1000.0) == (True, 0.0)


class TestEndSpendAfterARollback:
    async def test_a_repeated_fence_of_another_owner_does_not_end_a_spend(
        self, store: MemoryStore
    ) -> None:
        """a spends under fence 1; the store rolls back to before it (the fence counter too);
        b gets fence 1 again and sends. a's late end_spend(fence 1) must not end b's spend:
        the token b sent stays blocked for everyone else."""
        token = TokenSet("at", "Bearer", 0.0, 3600.0, None, "rt", lineage=1, generation=1)
        await store.commit("app", token)
        before = store.snapshot()
        a = await store.acquire_lease("app", "a", 30.0)
        assert await store.begin_spend("app", owner="a", fence=a.fence, token=token) is (
            SpendStart.OK
        )
        store.restore(before)
        b = await store.acquire_lease("app", "b", 30.0)
        assert b.fence == a.fence  # the fence repeats
        await store.begin_spend("app", owner="b", fence=b.fence, token=token)
        assert await store.mark_sent("app", owner="b", fence=b.fence)
        await store.end_spend("app", owner="a", fence=a.fence, outcome=SpendEnd.ABORTED)
        spend = store.state.spends["app"]
        assert (spend.owner, spend.state) == ("b", "sent")
        await store.release_lease("app", "b", b.fence)
        c = await store.acquire_lease("app", "c", 30.0)
        assert await store.begin_spend("app", owner="c", fence=c.fence, token=token) is (
            SpendStart.UNKNOWN
        )


class TestRepeatedFenceAfterAnEviction:
    async def test_another_owners_sent_record_under_the_same_fence_blocks_the_token(
        self, store: MemoryStore
    ) -> None:
        """a marks its spend sent under fence 1; the store evicts the lease and the fence
        counter (not the record); b is granted fence 1 again. b's spend of the same token must
        meet a's record as another spend's, sent: UNKNOWN, the record left as it was (swarm
        seed 75139: b replaced it, sent the token again, and the grant was revoked)."""
        token = TokenSet("at", "Bearer", 0.0, 3600.0, None, "rt", lineage=1, generation=1)
        await store.commit("app", token)
        a = await store.acquire_lease("app", "a", 30.0)
        await store.begin_spend("app", owner="a", fence=a.fence, token=token)
        assert await store.mark_sent("app", owner="a", fence=a.fence)
        del store.state.leases["app"], store.state.fences["app"]  # evicted
        b = await store.acquire_lease("app", "b", 30.0)
        assert b.fence == a.fence  # the fence repeats
        assert await store.begin_spend("app", owner="b", fence=b.fence, token=token) is (
            SpendStart.UNKNOWN
        )
        assert not await store.mark_sent("app", owner="b", fence=b.fence)
        spend = store.state.spends["app"]
        assert (spend.owner, spend.state) == ("a", "sent")


class TestBeginSpendAfterTheFenceCounterIsLost:
    async def test_a_repeated_fence_of_another_owner_is_another_spends_record(
        self, store: MemoryStore
    ) -> None:
        """a marks its spend sent under fence 1 (its answer lost: never sent, or on the wire);
        the store evicts its fence counter; b gets fence 1 again. b's begin_spend must meet
        a's record as another spend's (unknown), not replace it as its own: a's abort still
        ends it, and a token a did send is never presented by b (swarm seed 56916)."""
        token = TokenSet("at", "Bearer", 0.0, 3600.0, None, "rt", lineage=1, generation=1)
        await store.commit("app", token)
        a = await store.acquire_lease("app", "a", 30.0)
        await store.begin_spend("app", owner="a", fence=a.fence, token=token)
        assert await store.mark_sent("app", owner="a", fence=a.fence)
        del store.state.fences["app"]  # evicted
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 30.0)
        assert b.fence == a.fence  # the fence repeats
        assert await store.begin_spend("app", owner="b", fence=b.fence, token=token) is (
            SpendStart.UNKNOWN
        )
        spend = store.state.spends["app"]
        assert (spend.owner, spend.fence, spend.state) == ("a", a.fence, "sent")
        await store.end_spend(
            "app", owner="a", fence=a.fence, outcome=SpendEnd.ABORTED, refresh_fp="rt-fp"
        )
        assert "app" not in store.state.spends
        assert await store.begin_spend("app", owner="b", fence=b.fence, token=token) is (
            SpendStart.OK
        )


class TestOutage:
    async def test_every_primitive_raises_store_unavailable(
        self, store: MemoryStore, fake_clock: FakeClock
    ) -> None:
        """With the store failing, each fleet primitive raises StoreUnavailable."""
        store.fail = True
        with pytest.raises(StoreUnavailable):
            await store.server_time()
        with pytest.raises(StoreUnavailable):
            await store.record_failure("a", failures=1, not_before=0.0, error="e", permanent=False)
        with pytest.raises(StoreUnavailable):
            await store.load_failure("a")
        with pytest.raises(StoreUnavailable):
            await store.clear_failure("a")
        with pytest.raises(StoreUnavailable):
            await store.take_budget("a", 1, fake_clock.time())

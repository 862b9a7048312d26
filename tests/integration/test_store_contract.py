"""The store rules the fleet protocol relies on, held against both stores: memory and real Redis.

The simulation runs on MemoryStore; the fleet runs on RedisStore's Lua scripts. These tests keep
the two saying the same thing for every operation of broker/store/__init__.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import cast

import pytest

from broker.clock import SystemClock
from broker.metrics import Metrics
from broker.model import PROTOCOL_VERSION, TokenSet
from broker.store import (
    REFUSED,
    Lease,
    Notice,
    Refusal,
    SpendEnd,
    SpendRecord,
    SpendStart,
    TokenStore,
)
from broker.store.crypto import Keyring
from broker.store.memory import MemoryStore
from broker.store.redis_store import RedisStore, redis_client
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration


def token_set(generation: int, lineage: int = 1, refresh: str | None = None) -> TokenSet:
    return TokenSet(
        f"access-{lineage}-{generation}-secret-value",
        "Bearer",
        1000.0,
        4600.0,
        None,
        refresh if refresh is not None else f"refresh-{lineage}-{generation}-secret",
        lineage=lineage,
        generation=generation,
    )


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[TokenStore]:
    if request.param == "memory":
        yield MemoryStore(SystemClock())
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_store = RedisStore(
        redis_client(server.url),
        key_prefix="tb",
        keyring=Keyring([("k", b"K" * 32)]),
        metrics=Metrics(),
        clock=SystemClock(),
    )
    yield redis_store
    await redis_store.close()


async def marked_sent(store: TokenStore, owner: str) -> Lease:
    """`owner` holds the lease and has marked its spend of token_set(1) sent (the answer awaited)."""
    lease = await store.acquire_lease("app", owner, 5)
    await store.begin_spend("app", owner=owner, fence=lease.fence, token=token_set(1))
    await store.mark_sent("app", owner=owner, fence=lease.fence)
    return lease


class TestCommit:
    async def test_a_higher_rank_wins_whatever_its_expiry(self, store: TokenStore) -> None:
        """Rank, not expiry, decides: a newer generation replaces an older one, never the reverse."""
        assert (await store.commit("app", token_set(2))).stored
        older_but_longer = replace(token_set(1), expires_at=99_999.0)
        refused = await store.commit("app", older_but_longer)
        assert (refused.stored, refused.rank) == (False, (1, 2))
        newer_but_shorter = replace(token_set(3), expires_at=2000.0)
        assert (await store.commit("app", newer_but_shorter)).stored
        loaded = await store.load("app")
        assert loaded is not None and loaded.rank == (1, 3)

    async def test_a_new_lineage_outranks_any_generation(self, store: TokenStore) -> None:
        """A new authorization (higher lineage) replaces a set of any generation."""
        await store.commit("app", token_set(50, lineage=1))
        assert (await store.commit("app", token_set(1, lineage=2))).stored
        assert not (await store.commit("app", token_set(51, lineage=1))).stored

    async def test_a_repeated_commit_is_answered_as_stored(self, store: TokenStore) -> None:
        """Committing the same set again (a reply was lost) succeeds without a new version."""
        first = await store.commit("app", token_set(1))
        again = await store.commit("app", token_set(1))
        assert again.stored and again.version == first.version

    async def test_the_same_rank_with_another_token_is_refused(self, store: TokenStore) -> None:
        """Two sets of one rank: the first stored stays."""
        await store.commit("app", token_set(1))
        other = replace(token_set(1), access_token="another-access-token-value")
        assert not (await store.commit("app", other)).stored


class TestLoadMany:
    async def test_loads_every_stored_app_at_once(self, store: TokenStore) -> None:
        """One call returns the stored sets of the apps asked for, leaving out the others."""
        await store.commit("a", token_set(1))
        await store.commit("b", token_set(2))
        found = await store.load_many(["a", "b", "c"])
        assert {app: token.rank for app, token in found.items()} == {"a": (1, 1), "b": (1, 2)}
        assert await store.load_many([]) == {}


class TestLease:
    async def test_one_holder_and_a_growing_fence(self, store: TokenStore) -> None:
        """One owner at a time; each grant gets a larger fence; busy answers say for how long."""
        first = await store.acquire_lease("app", "a", 5)
        busy = await store.acquire_lease("app", "b", 5)
        assert first.held and not busy.held and 0 < busy.busy_for <= 5
        await store.release_lease("app", "b", first.fence)  # not b's: no effect
        assert not (await store.acquire_lease("app", "b", 5)).held
        await store.release_lease("app", "a", first.fence)
        second = await store.acquire_lease("app", "b", 5)
        assert second.held and second.fence > first.fence


class TestSpend:
    async def test_spending_needs_the_lease_and_the_stored_set(self, store: TokenStore) -> None:
        """No lease (or a stale fence): lost. A set that is not the stored one: stale."""
        await store.commit("app", token_set(1))
        assert (
            await store.begin_spend("app", owner="a", fence=1, token=token_set(1))
            is SpendStart.LOST
        )
        lease = await store.acquire_lease("app", "a", 5)
        assert (
            await store.begin_spend("app", owner="a", fence=lease.fence, token=token_set(2))
            is SpendStart.STALE
        )
        assert (
            await store.begin_spend("app", owner="a", fence=lease.fence, token=token_set(1))
            is SpendStart.OK
        )

    async def test_an_announced_spend_never_sent_is_replaced(self, store: TokenStore) -> None:
        """A spend announced but never marked sent did not happen: the next holder may spend."""
        await store.commit("app", token_set(1))
        first = await store.acquire_lease("app", "a", 5)
        await store.begin_spend("app", owner="a", fence=first.fence, token=token_set(1))
        await store.release_lease("app", "a", first.fence)
        second = await store.acquire_lease("app", "b", 5)
        assert (
            await store.begin_spend("app", owner="b", fence=second.fence, token=token_set(1))
            is SpendStart.OK
        )
        assert not await store.mark_sent("app", owner="a", fence=first.fence)
        assert await store.mark_sent("app", owner="b", fence=second.fence)

    async def test_a_veto_stops_an_announced_spend_while_its_lease_is_held(
        self, store: TokenStore
    ) -> None:
        """A veto turns a live announced spend into an unknown one: it is never marked sent."""
        await store.commit("app", token_set(1))
        lease = await store.acquire_lease("app", "a", 5)
        await store.begin_spend("app", owner="a", fence=lease.fence, token=token_set(1))
        fp = token_set(1).refresh_fingerprint or ""
        assert await store.veto_spend("app", refresh_fp=fp)
        assert not await store.mark_sent("app", owner="a", fence=lease.fence)
        await store.release_lease("app", "a", lease.fence)
        other = await store.acquire_lease("app", "b", 5)
        assert (
            await store.begin_spend("app", owner="b", fence=other.fence, token=token_set(1))
            is SpendStart.UNKNOWN
        )

    async def test_a_veto_leaves_an_announced_spend_without_its_lease(
        self, store: TokenStore
    ) -> None:
        """An announced spend whose lease is gone (a rollback's ghost) is not vetoed: the next
        holder replaces it as before."""
        await store.commit("app", token_set(1))
        lease = await store.acquire_lease("app", "a", 5)
        await store.begin_spend("app", owner="a", fence=lease.fence, token=token_set(1))
        await store.release_lease("app", "a", lease.fence)
        fp = token_set(1).refresh_fingerprint or ""
        assert not await store.veto_spend("app", refresh_fp=fp)
        other = await store.acquire_lease("app", "b", 5)
        assert (
            await store.begin_spend("app", owner="b", fence=other.fence, token=token_set(1))
            is SpendStart.OK
        )

    async def test_an_unresolved_spend_blocks_every_other_fence(self, store: TokenStore) -> None:
        """A spend marked sent (or unknown) answers UNKNOWN to the next holder."""
        await store.commit("app", token_set(1))
        first = await store.acquire_lease("app", "a", 5)
        await store.begin_spend("app", owner="a", fence=first.fence, token=token_set(1))
        assert await store.mark_sent("app", owner="a", fence=first.fence)
        await store.release_lease("app", "a", first.fence)
        second = await store.acquire_lease("app", "b", 5)
        assert (
            await store.begin_spend("app", owner="b", fence=second.fence, token=token_set(1))
            is SpendStart.UNKNOWN
        )
        await store.end_spend("app", owner="a", fence=first.fence, outcome=SpendEnd.UNKNOWN)
        assert (
            await store.begin_spend("app", owner="b", fence=second.fence, token=token_set(1))
            is SpendStart.UNKNOWN
        )

    async def test_a_grace_window_allows_exactly_one_retry(self, store: TokenStore) -> None:
        """Inside retry_within of the send (store clock), one RETRY; never a second."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        retry = await store.begin_spend(
            "app", owner="b", fence=b.fence, token=token_set(1), retry_within=30
        )
        assert retry is SpendStart.RETRY
        await store.mark_sent("app", owner="b", fence=b.fence)
        await store.release_lease("app", "b", b.fence)
        c = await store.acquire_lease("app", "c", 5)
        again = await store.begin_spend(
            "app", owner="c", fence=c.fence, token=token_set(1), retry_within=30
        )
        assert again is SpendStart.UNKNOWN

    async def test_no_retry_once_the_grace_window_has_passed(self, store: TokenStore) -> None:
        """A spend sent longer ago than retry_within answers UNKNOWN even with a window."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.release_lease("app", "a", a.fence)
        await asyncio.sleep(0.3)
        b = await store.acquire_lease("app", "b", 5)
        late = await store.begin_spend(
            "app", owner="b", fence=b.fence, token=token_set(1), retry_within=0.2
        )
        assert late is SpendStart.UNKNOWN

    async def test_a_repeated_fence_of_another_owner_does_not_end_its_spend(
        self, store: TokenStore
    ) -> None:
        """Fences repeat after a rollback: a's late end_spend under the fence b now holds (the
        counter went back) leaves b's record alone, and b's own ending still works."""
        await store.commit("app", token_set(1))
        b = await store.acquire_lease("app", "b", 5)
        await store.begin_spend("app", owner="b", fence=b.fence, token=token_set(1))
        assert await store.mark_sent("app", owner="b", fence=b.fence)
        # a held this fence number before the store went back to a snapshot.
        await store.end_spend("app", owner="a", fence=b.fence, outcome=SpendEnd.ABORTED)
        await store.end_spend("app", owner="a", fence=b.fence, outcome=SpendEnd.UNKNOWN)
        await store.release_lease("app", "b", b.fence)
        c = await store.acquire_lease("app", "c", 5)
        assert (
            await store.begin_spend("app", owner="c", fence=c.fence, token=token_set(1))
            is SpendStart.UNKNOWN
        ), "b's spend was sent: its record must still block the token"
        await store.release_lease("app", "c", c.fence)
        await store.end_spend("app", owner="b", fence=b.fence, outcome=SpendEnd.ABORTED)
        d = await store.acquire_lease("app", "d", 5)
        assert (
            await store.begin_spend("app", owner="d", fence=d.fence, token=token_set(1))
            is SpendStart.OK
        )

    async def test_no_retry_when_the_store_clock_stepped_back(self, store: TokenStore) -> None:
        """A spend sent "in the future" of the store's clock (it stepped back since) is not
        inside any grace window: UNKNOWN, even with no window at all (issue 20, swarm)."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.release_lease("app", "a", a.fence)
        if isinstance(store, MemoryStore):
            store.state.spends["app"].sent_at += 60.0
        else:
            redis_store = cast(RedisStore, store)
            await redis_store._client.hincrby(redis_store.spend_key("app"), "sent_at", 60_000)
        b = await store.acquire_lease("app", "b", 5)
        for retry_within in (0.0, 30.0):
            answer = await store.begin_spend(
                "app", owner="b", fence=b.fence, token=token_set(1), retry_within=retry_within
            )
            assert answer is SpendStart.UNKNOWN

    async def test_an_aborted_spend_frees_the_token(self, store: TokenStore) -> None:
        """A spend that ended without effect (aborted) does not block the next holder."""
        await store.commit("app", token_set(1))
        a = await store.acquire_lease("app", "a", 5)
        await store.begin_spend("app", owner="a", fence=a.fence, token=token_set(1))
        await store.end_spend("app", owner="a", fence=a.fence, outcome=SpendEnd.ABORTED)
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        assert (
            await store.begin_spend("app", owner="b", fence=b.fence, token=token_set(1))
            is SpendStart.OK
        )

    async def test_a_veto_sticks_even_for_the_vetoed_spender(self, store: TokenStore) -> None:
        """M1: a vetoed record is a state of its own. The vetoed spender's next begin_spend,
        naming no resolved fence (0) or its own vetoed fence, answers UNKNOWN: it never mistakes
        the vetoed record for one it resolved."""
        await store.commit("app", token_set(1))
        a = await store.acquire_lease("app", "a", 5)
        await store.begin_spend("app", owner="a", fence=a.fence, token=token_set(1))
        assert await store.veto_spend("app", refresh_fp=token_set(1).refresh_fingerprint or "")
        await store.release_lease("app", "a", a.fence)
        again = await store.acquire_lease("app", "a", 5)
        for resolved in (0, a.fence):
            answer = await store.begin_spend(
                "app", owner="a", fence=again.fence, token=token_set(1), resolved_fence=resolved
            )
            assert answer is SpendStart.UNKNOWN, resolved

    async def test_an_aborted_grace_retry_restores_the_unknown_spend(
        self, store: TokenStore
    ) -> None:
        """H3: the one grace retry aborts (429): the spend it retried is unknown again with its
        first send time, so a later holder gets UNKNOWN, never OK, and never a second RETRY."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.end_spend("app", owner="a", fence=a.fence, outcome=SpendEnd.UNKNOWN)
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        retry = await store.begin_spend(
            "app", owner="b", fence=b.fence, token=token_set(1), retry_within=30
        )
        assert retry is SpendStart.RETRY
        await store.mark_sent("app", owner="b", fence=b.fence)
        await store.end_spend("app", owner="b", fence=b.fence, outcome=SpendEnd.ABORTED)
        await store.release_lease("app", "b", b.fence)
        c = await store.acquire_lease("app", "c", 5)
        for resolved in (0, b.fence):
            answer = await store.begin_spend(
                "app",
                owner="c",
                fence=c.fence,
                token=token_set(1),
                retry_within=30,
                resolved_fence=resolved,
            )
            assert answer is SpendStart.UNKNOWN, resolved

    async def test_the_spend_record_names_its_owner_and_state(self, store: TokenStore) -> None:
        """`load_spend` reads the record as it goes: announced, sent, vetoed; none at all
        before a spend and after an abort."""
        fp = token_set(1).refresh_fingerprint or ""
        await store.commit("app", token_set(1))
        assert await store.load_spend("app") is None
        a = await store.acquire_lease("app", "a", 5)
        await store.begin_spend("app", owner="a", fence=a.fence, token=token_set(1))
        assert await store.load_spend("app") == SpendRecord("a", fp, "announced")
        await store.mark_sent("app", owner="a", fence=a.fence)
        assert await store.load_spend("app") == SpendRecord("a", fp, "sent")
        await store.end_spend("app", owner="a", fence=a.fence, outcome=SpendEnd.ABORTED)
        assert await store.load_spend("app") is None
        again = await store.acquire_lease("app", "a", 5)
        await store.begin_spend("app", owner="a", fence=again.fence, token=token_set(1))
        assert await store.veto_spend("app", refresh_fp=fp)
        assert await store.load_spend("app") == SpendRecord("a", fp, "vetoed")

    async def test_the_spend_record_says_when_it_is_a_granted_retry(
        self, store: TokenStore
    ) -> None:
        """`load_spend` marks the record of the one grace retry the store granted (a replica
        that re-syncs must not veto it), and no other."""
        fp = token_set(1).refresh_fingerprint or ""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.end_spend("app", owner="a", fence=a.fence, outcome=SpendEnd.UNKNOWN)
        assert await store.load_spend("app") == SpendRecord("a", fp, "unknown", retry=False)
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        retry = await store.begin_spend(
            "app", owner="b", fence=b.fence, token=token_set(1), retry_within=30
        )
        assert retry is SpendStart.RETRY
        assert await store.load_spend("app") == SpendRecord("b", fp, "announced", retry=True)

    async def test_a_sent_record_whose_answer_was_lost_is_aborted_by_its_owner_alone(
        self, store: TokenStore
    ) -> None:
        """The spender whose `mark_sent` answer was lost never sent: its abort under its own
        owner name and fence removes the record (another owner's, with the same fence, does
        not), and the next holder may spend the token."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.release_lease("app", "a", a.fence)
        await store.end_spend("app", owner="b", fence=a.fence, outcome=SpendEnd.ABORTED)
        assert (await store.load_spend("app") or SpendRecord("", "", "")).state == "sent"
        await store.end_spend("app", owner="a", fence=a.fence, outcome=SpendEnd.ABORTED)
        assert await store.load_spend("app") is None
        b = await store.acquire_lease("app", "b", 5)
        answer = await store.begin_spend("app", owner="b", fence=b.fence, token=token_set(1))
        assert answer is SpendStart.OK

    async def test_the_spend_record_carries_its_fence(self, store: TokenStore) -> None:
        """`load_spend` reads the spend's fence (0 once vetoed), for a veto to name it."""
        await store.commit("app", token_set(1))
        a = await store.acquire_lease("app", "a", 5)
        await store.begin_spend("app", owner="a", fence=a.fence, token=token_set(1))
        assert (await store.load_spend("app") or SpendRecord("", "", "")).fence == a.fence
        assert await store.veto_spend("app", refresh_fp=token_set(1).refresh_fingerprint or "")
        assert (await store.load_spend("app") or SpendRecord("", "", "", fence=-1)).fence == 0

    async def test_a_veto_that_names_a_spend_is_lifted_by_that_spends_abort_alone(
        self, store: TokenStore
    ) -> None:
        """A veto standing for one earlier spend (owner, fence): that owner's abort under
        another fence, or another owner's under that fence, leaves it; that spend's own abort
        removes the record and publishes an abort in that owner's name."""
        fp = token_set(1).refresh_fingerprint or ""
        await store.commit("app", token_set(1))
        b = await store.acquire_lease("app", "b", 5)
        await store.begin_spend("app", owner="b", fence=b.fence, token=token_set(1))
        assert await store.veto_spend("app", refresh_fp=fp, protects=("a", 7))
        await store.end_spend("app", owner="a", fence=6, outcome=SpendEnd.ABORTED)
        await store.end_spend("app", owner="c", fence=7, outcome=SpendEnd.ABORTED)
        await store.end_spend("app", owner="a", fence=7, outcome=SpendEnd.UNKNOWN)
        assert await store.load_spend("app") == SpendRecord("b", fp, "vetoed")
        await store.end_spend("app", owner="a", fence=7, outcome=SpendEnd.ABORTED)
        assert await store.load_spend("app") is None

    async def test_a_veto_for_the_spend_its_spender_last_aborted_is_refused(
        self, store: TokenStore
    ) -> None:
        """A veto naming (owner, fence) of the spend that owner last ended as aborted here is
        refused (the vetoing replica missed the abort notice: swarm seed 5510); one naming an
        earlier spend of that owner's, or the owner alone (fence 0), still vetoes."""
        fp = token_set(1).refresh_fingerprint or ""
        await store.commit("app", token_set(1))
        a = await store.acquire_lease("app", "a", 5)
        await store.begin_spend("app", owner="a", fence=a.fence, token=token_set(1))
        await store.end_spend("app", owner="a", fence=a.fence, outcome=SpendEnd.ABORTED)
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        await store.begin_spend("app", owner="b", fence=b.fence, token=token_set(1))
        assert not await store.veto_spend("app", refresh_fp=fp, protects=("a", a.fence))
        assert not await store.veto_spend("app", refresh_fp=fp, protects=("a", a.fence))
        assert (await store.load_spend("app") or SpendRecord("", "", "")).state == "announced"
        assert await store.veto_spend("app", refresh_fp=fp, protects=("a", a.fence - 1))
        assert await store.load_spend("app") == SpendRecord("b", fp, "vetoed")

    async def test_a_veto_for_a_spend_of_the_announced_spends_own_owner_is_refused(
        self, store: TokenStore
    ) -> None:
        """The spender of the spend a veto stands for spends the token again: it knows that
        spend had no effect, so a veto naming it (a late write: swarm seed 6573) is refused;
        one naming another owner still vetoes."""
        fp = token_set(1).refresh_fingerprint or ""
        await store.commit("app", token_set(1))
        a = await store.acquire_lease("app", "a", 5)
        await store.begin_spend("app", owner="a", fence=a.fence, token=token_set(1))
        assert not await store.veto_spend("app", refresh_fp=fp, protects=("a", 0))
        assert not await store.veto_spend("app", refresh_fp=fp, protects=("a", a.fence + 7))
        assert await store.veto_spend("app", refresh_fp=fp, protects=("b", 0))
        assert await store.load_spend("app") == SpendRecord("a", fp, "vetoed")

    async def test_a_veto_that_names_an_owner_alone_is_lifted_by_its_abort_of_any_fence(
        self, store: TokenStore
    ) -> None:
        """A veto standing for an owner's spends known from a notice (fence 0): that owner's
        abort under any fence lifts it (never fence 0, which names no spend); a veto that
        names nothing is lifted by no abort."""
        fp = token_set(1).refresh_fingerprint or ""
        await store.commit("app", token_set(1))
        b = await store.acquire_lease("app", "b", 5)
        await store.begin_spend("app", owner="b", fence=b.fence, token=token_set(1))
        assert await store.veto_spend("app", refresh_fp=fp, protects=("a", 0))
        await store.end_spend("app", owner="a", fence=0, outcome=SpendEnd.ABORTED)
        assert await store.load_spend("app") == SpendRecord("b", fp, "vetoed")
        await store.end_spend("app", owner="a", fence=3, outcome=SpendEnd.ABORTED)
        assert await store.load_spend("app") is None
        await store.release_lease("app", "b", b.fence)
        c = await store.acquire_lease("app", "c", 5)
        await store.begin_spend("app", owner="c", fence=c.fence, token=token_set(1))
        assert await store.veto_spend("app", refresh_fp=fp)
        for owner in ("a", "b", "c"):
            await store.end_spend("app", owner=owner, fence=c.fence, outcome=SpendEnd.ABORTED)
        assert await store.load_spend("app") == SpendRecord("c", fp, "vetoed")

    async def test_a_grace_retry_of_a_spend_never_sent_becomes_a_first_spend(
        self, store: TokenStore
    ) -> None:
        """A grace retry granted from a `sent` record whose spender never sent (its answer
        lost): that spender's abort, under its own owner name and fence, makes the retry an
        ordinary spend; under another owner name it changes nothing."""
        fp = token_set(1).refresh_fingerprint or ""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        retry = await store.begin_spend(
            "app", owner="b", fence=b.fence, token=token_set(1), retry_within=30
        )
        assert retry is SpendStart.RETRY
        await store.end_spend("app", owner="c", fence=a.fence, outcome=SpendEnd.ABORTED)
        assert await store.load_spend("app") == SpendRecord("b", fp, "announced", retry=True)
        await store.end_spend("app", owner="a", fence=a.fence, outcome=SpendEnd.ABORTED)
        assert await store.load_spend("app") == SpendRecord("b", fp, "announced", retry=False)
        assert await store.mark_sent("app", owner="b", fence=b.fence)

    async def test_a_sent_retry_of_a_spend_never_sent_stays_sent(self, store: TokenStore) -> None:
        """The first spender says it never sent after the retry was sent: the retry's record
        stays `sent` (its answer decides), as an ordinary spend's."""
        fp = token_set(1).refresh_fingerprint or ""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        await store.begin_spend(
            "app", owner="b", fence=b.fence, token=token_set(1), retry_within=30
        )
        assert await store.mark_sent("app", owner="b", fence=b.fence)
        await store.end_spend("app", owner="a", fence=a.fence, outcome=SpendEnd.ABORTED)
        assert await store.load_spend("app") == SpendRecord("b", fp, "sent", retry=False)

    async def test_the_record_an_aborted_retry_restored_goes_with_its_spenders_abort(
        self, store: TokenStore
    ) -> None:
        """The grace retry of a spend never sent aborts (its record of the unknown spend is
        restored); then the first spender says it never sent: the record goes, and the next
        holder spends the token."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        await store.begin_spend(
            "app", owner="b", fence=b.fence, token=token_set(1), retry_within=30
        )
        await store.end_spend("app", owner="b", fence=b.fence, outcome=SpendEnd.ABORTED)
        assert (await store.load_spend("app") or SpendRecord("", "", "")).state == "unknown"
        await store.end_spend("app", owner="a", fence=a.fence, outcome=SpendEnd.ABORTED)
        assert await store.load_spend("app") is None
        await store.release_lease("app", "b", b.fence)
        c = await store.acquire_lease("app", "c", 5)
        answer = await store.begin_spend("app", owner="c", fence=c.fence, token=token_set(1))
        assert answer is SpendStart.OK

    async def test_a_restored_grace_retry_is_not_its_retriers_to_replace(
        self, store: TokenStore
    ) -> None:
        """The record an aborted grace retry restored (fence 0, the retrier's name) answers
        UNKNOWN to the retrier too, whatever fence it names as resolved: fence 0 names no spend
        (swarm seed 177: the retrier spent the token as new, past the window)."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        retry = await store.begin_spend(
            "app", owner="b", fence=b.fence, token=token_set(1), retry_within=30
        )
        assert retry is SpendStart.RETRY
        await store.mark_sent("app", owner="b", fence=b.fence)
        await store.end_spend("app", owner="b", fence=b.fence, outcome=SpendEnd.ABORTED)
        await store.release_lease("app", "b", b.fence)
        again = await store.acquire_lease("app", "b", 5)
        for resolved in (0, b.fence):
            answer = await store.begin_spend(
                "app",
                owner="b",
                fence=again.fence,
                token=token_set(1),
                retry_within=30,
                resolved_fence=resolved,
            )
            assert answer is SpendStart.UNKNOWN, resolved

    async def test_our_own_aborted_record_may_be_replaced(self, store: TokenStore) -> None:
        """A holder that could not clear its aborted record names it, and may spend again."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.release_lease("app", "a", a.fence)
        again = await store.acquire_lease("app", "a", 5)
        answer = await store.begin_spend(
            "app", owner="a", fence=again.fence, token=token_set(1), resolved_fence=a.fence
        )
        assert answer is SpendStart.OK

    async def test_a_newer_commit_resolves_the_spend(self, store: TokenStore) -> None:
        """Once the rotated set is committed, the old spend no longer blocks anything."""
        await store.commit("app", token_set(1))
        a = await store.acquire_lease("app", "a", 5)
        await store.begin_spend("app", owner="a", fence=a.fence, token=token_set(1))
        await store.commit("app", token_set(2), fence=a.fence)
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        assert (
            await store.begin_spend("app", owner="b", fence=b.fence, token=token_set(2))
            is SpendStart.OK
        )


class TestNotices:
    async def test_commits_spends_and_aborts_are_announced(self, store: TokenStore) -> None:
        """Every replica hears of a commit (version, rank), of a spend, its send and its abort."""
        updates = cast(AsyncGenerator[Notice, None], store.updates())
        heard: list[Notice] = []

        async def listen() -> None:
            async for notice in updates:
                if notice.kind not in ("lease", "release"):
                    heard.append(notice)
                if len(heard) == 4:
                    return

        listener = asyncio.ensure_future(listen())
        await asyncio.sleep(0.3)  # subscribed
        await store.commit("app", token_set(1))
        lease = await marked_sent(store, "a")
        await store.end_spend("app", owner="a", fence=lease.fence, outcome=SpendEnd.ABORTED)
        await asyncio.wait_for(listener, 5)
        await updates.aclose()
        fp = token_set(1).refresh_fingerprint
        assert [(n.kind, n.rank, n.refresh_fp, n.owner) for n in heard] == [
            ("token", (1, 1), None, None),
            ("spend", (1, 1), fp, "a"),
            ("sent", (1, 1), fp, "a"),
            ("abort", (1, 1), fp, "a"),
        ]
        assert heard[0].version == 1
        assert not any(n.retry or n.retry_aborted for n in heard)

    async def test_a_grace_retry_and_its_abort_say_so(self, store: TokenStore) -> None:
        """H2/H3: the spend of a granted grace retry is marked `retry` (bystanders do not veto
        it); its abort is marked `retry_aborted` (the retried spend is still unknown)."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.release_lease("app", "a", a.fence)
        updates = cast(AsyncGenerator[Notice, None], store.updates())
        heard: list[Notice] = []

        async def listen() -> None:
            async for notice in updates:
                if notice.kind in ("spend", "abort"):
                    heard.append(notice)
                if len(heard) == 2:
                    return

        listener = asyncio.ensure_future(listen())
        await asyncio.sleep(0.3)  # subscribed
        b = await store.acquire_lease("app", "b", 5)
        retry = await store.begin_spend(
            "app", owner="b", fence=b.fence, token=token_set(1), retry_within=30
        )
        assert retry is SpendStart.RETRY
        await store.end_spend("app", owner="b", fence=b.fence, outcome=SpendEnd.ABORTED)
        await asyncio.wait_for(listener, 5)
        await updates.aclose()
        assert [(n.kind, n.owner, n.retry, n.retry_aborted) for n in heard] == [
            ("spend", "b", True, False),
            ("abort", "b", False, True),
        ]

    async def test_a_token_notice_carries_the_committed_set(self, store: TokenStore) -> None:
        """A replica adopts a committed set from its notice, without reading the store."""
        updates = cast(AsyncGenerator[Notice, None], store.updates())
        listener = asyncio.ensure_future(anext(updates))
        await asyncio.sleep(0.3)  # subscribed
        await store.commit("app", token_set(3))
        notice = await asyncio.wait_for(listener, 5)
        await updates.aclose()
        assert notice.kind == "token" and notice.rank == (1, 3)
        assert notice.token is not None
        assert notice.token.access_token == token_set(3).access_token
        assert notice.token.refresh_token == token_set(3).refresh_token
        assert notice.token.version == notice.version == 1
        assert notice.blob is None  # opened, the ciphertext is not passed on

    async def test_a_lease_granted_and_released_is_announced(self, store: TokenStore) -> None:
        """Issue 20, the fleet's cost: a grant says who holds the lease and for how long, and
        a release says it is free, so the other replicas wait for the holder's notice instead
        of asking for the lease. A busy answer and a release by another owner say nothing."""
        updates = cast(AsyncGenerator[Notice, None], store.updates())
        heard: list[Notice] = []

        async def listen() -> None:
            async for notice in updates:
                heard.append(notice)
                if notice.kind == "token":
                    return

        listener = asyncio.ensure_future(listen())
        await asyncio.sleep(0.3)  # subscribed
        lease = await store.acquire_lease("app", "a", 7.5)
        assert not (await store.acquire_lease("app", "b", 5)).held
        await store.release_lease("app", "b", lease.fence)  # not b's: nothing happens
        await store.release_lease("app", "a", lease.fence)
        await store.release_lease("app", "a", lease.fence)  # released already: nothing
        await store.commit("app", token_set(1))  # the end of what is heard
        await asyncio.wait_for(listener, 5)
        await updates.aclose()
        assert [(n.kind, n.owner, n.ttl, n.protocol) for n in heard] == [
            ("lease", "a", 7.5, PROTOCOL_VERSION),
            ("release", "a", 0.0, PROTOCOL_VERSION),
            ("token", None, 0.0, PROTOCOL_VERSION),
        ]
        assert all(n.app == "app" and n.refresh_fp is None for n in heard)


class TestRefusedToken:
    """Issue 22: a token the upstream refused is recorded by a compare-and-set on the stored
    set, at most once per app per interval, and announced by fingerprint."""

    async def test_only_the_stored_sets_token_is_recorded(self, store: TokenStore) -> None:
        """Nothing stored, or another set stored: STALE. The stored set's token: RECORDED,
        then ALREADY for the same token; a newer set refused within the interval: LIMITED."""
        old, new = token_set(1), token_set(2)
        assert await store.refuse_token("app", old.fingerprint, interval=5) is Refusal.STALE
        await store.commit("app", old)
        await store.commit("app", new)
        assert await store.refuse_token("app", old.fingerprint, interval=5) is Refusal.STALE
        assert await store.refuse_token("app", new.fingerprint, interval=5) is Refusal.RECORDED
        assert await store.refuse_token("app", new.fingerprint, interval=5) is Refusal.ALREADY
        await store.commit("app", token_set(3))
        newest = token_set(3).fingerprint
        assert await store.refuse_token("app", newest, interval=5) is Refusal.LIMITED
        assert await store.refuse_token("other", newest, interval=5) is Refusal.STALE
        loaded = await store.load("app")
        assert loaded is not None and loaded.rank == (1, 3)  # the set itself stays stored

    async def test_the_interval_lapses(self, store: TokenStore) -> None:
        """After the interval the stored set's token may be refused (and purged) again."""
        await store.commit("app", token_set(1))
        fp = token_set(1).fingerprint
        assert await store.refuse_token("app", fp, interval=0.2) is Refusal.RECORDED
        await asyncio.sleep(0.3)
        assert await store.refuse_token("app", fp, interval=0.2) is Refusal.RECORDED

    async def test_a_recorded_refusal_is_announced_by_fingerprint(self, store: TokenStore) -> None:
        """One REFUSED notice per recorded refusal, naming the access token's fingerprint
        (never the token); a stale or repeated refusal says nothing."""
        await store.commit("app", token_set(2))
        updates = cast(AsyncGenerator[Notice, None], store.updates())
        heard: list[Notice] = []

        async def listen() -> None:
            async for notice in updates:
                heard.append(notice)
                if notice.kind == "token":
                    return

        listener = asyncio.ensure_future(listen())
        await asyncio.sleep(0.3)  # subscribed
        await store.refuse_token("app", token_set(1).fingerprint, interval=5)  # stale
        await store.refuse_token("app", token_set(2).fingerprint, interval=5)
        await store.refuse_token("app", token_set(2).fingerprint, interval=5)  # already
        await store.commit("app", token_set(3))  # the end of what is heard
        await asyncio.wait_for(listener, 5)
        await updates.aclose()
        assert [(n.kind, n.access_fp, n.protocol) for n in heard] == [
            (REFUSED, token_set(2).fingerprint, PROTOCOL_VERSION),
            ("token", None, PROTOCOL_VERSION),
        ]


class TestNoticeWithoutTheKey:
    async def test_a_replica_lacking_the_key_gets_the_rank_only(
        self, redis_server: RedisServer
    ) -> None:
        """A notice whose set this replica cannot open says only that a set exists (it reads,
        and gets UnreadableTokenSet there, as before); its ciphertext is all Redis carried."""

        def store_with(key: bytes) -> RedisStore:
            return RedisStore(
                redis_client(redis_server.url),
                key_prefix="tb",
                keyring=Keyring([(key.decode()[:1], key)]),
                metrics=Metrics(),
                clock=SystemClock(),
            )

        writer, reader = store_with(b"W" * 32), store_with(b"R" * 32)
        try:
            updates = cast(AsyncGenerator[Notice, None], reader.updates())
            listener = asyncio.ensure_future(anext(updates))
            await asyncio.sleep(0.3)
            await writer.commit("app", token_set(2))
            notice = await asyncio.wait_for(listener, 5)
            await updates.aclose()
            assert notice.kind == "token" and notice.rank == (1, 2)
            assert notice.token is None
        finally:
            await writer.close()
            await reader.close()

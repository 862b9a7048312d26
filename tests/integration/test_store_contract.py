"""The store rules the fleet protocol relies on, held against both stores: memory and real Redis.

The simulation runs on MemoryStore; the fleet runs on RedisStore's Lua scripts. These tests keep
the two saying the same thing for every operation of broker/store/__init__.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, cast

import pytest

from broker.clock import SystemClock
from broker.errors import UnreadableTokenSet
from broker.metrics import Metrics
from broker.model import PROTOCOL_VERSION, TokenSet
from broker.store import (
    ABORTS_KEPT,
    LOWERED,
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
from broker.store.redis_store import RedisStore, _plaintext, redis_client
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


async def aborted_spends(store: TokenStore, owners: list[str]) -> list[int]:
    """Each of `owners` in turn announces a spend of token_set(1) and ends it as aborted; the
    fences of those spends, in order."""
    fences = []
    for owner in owners:
        lease = await store.acquire_lease("app", owner, 5)
        await store.begin_spend("app", owner=owner, fence=lease.fence, token=token_set(1))
        await store.end_spend("app", owner=owner, fence=lease.fence, outcome=SpendEnd.ABORTED)
        await store.release_lease("app", owner, lease.fence)
        fences.append(lease.fence)
    return fences


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


# ---- the spend ledger, as scenarios: each row a sequence of store calls and their answers ----

Fence = str | int  # a lease's label (its fence), or a fence number
FP = token_set(1).refresh_fingerprint or ""


@dataclass
class Run:
    """A scenario's store and the leases it took, by label (label -> owner, lease)."""

    store: TokenStore
    leases: dict[str, tuple[str, Lease]] = field(default_factory=dict)

    def owner(self, label: str) -> str:
        """The owner of the lease `label`; a label with no lease names its owner."""
        return self.leases[label][0] if label in self.leases else label

    def fence(self, ref: Fence) -> int:
        """The fence of the lease `ref`, or `ref` itself."""
        return ref if isinstance(ref, int) else self.leases[ref][1].fence


class Step:
    """One store call of a scenario; an expectation of None is not checked."""

    async def run(self, run: Run) -> None:
        """Make the call and check its answer."""
        raise NotImplementedError


@dataclass(frozen=True)
class Commit(Step):
    generation: int = 1
    fence: Fence | None = None

    async def run(self, run: Run) -> None:
        fence = None if self.fence is None else run.fence(self.fence)
        if fence is None:
            await run.store.commit("app", token_set(self.generation))
        else:
            await run.store.commit("app", token_set(self.generation), fence=fence)


@dataclass(frozen=True)
class Acquire(Step):
    label: str
    owner: str | None = None

    async def run(self, run: Run) -> None:
        owner = self.owner or self.label
        run.leases[self.label] = (owner, await run.store.acquire_lease("app", owner, 5))


@dataclass(frozen=True)
class Release(Step):
    label: str

    async def run(self, run: Run) -> None:
        await run.store.release_lease("app", run.owner(self.label), run.fence(self.label))


@dataclass(frozen=True)
class Begin(Step):
    label: str
    expect: SpendStart | None = None
    generation: int = 1
    fence: int | None = None  # instead of the lease's
    retry_within: float | None = None
    resolved: Fence | None = None
    why: str = ""

    async def run(self, run: Run) -> None:
        options: dict[str, Any] = {}
        if self.retry_within is not None:
            options["retry_within"] = self.retry_within
        if self.resolved is not None:
            options["resolved_fence"] = run.fence(self.resolved)
        answer = await run.store.begin_spend(
            "app",
            owner=run.owner(self.label),
            fence=self.fence if self.fence is not None else run.fence(self.label),
            token=token_set(self.generation),
            **options,
        )
        if self.expect is not None:
            assert answer is self.expect, (self, self.why)


@dataclass(frozen=True)
class MarkSent(Step):
    label: str
    expect: bool | None = None

    async def run(self, run: Run) -> None:
        sent = await run.store.mark_sent(
            "app", owner=run.owner(self.label), fence=run.fence(self.label)
        )
        if self.expect is not None:
            assert sent is self.expect, self


@dataclass(frozen=True)
class End(Step):
    fence: Fence
    outcome: SpendEnd = SpendEnd.ABORTED
    owner: str | None = None  # another owner's end under this fence

    async def run(self, run: Run) -> None:
        owner = self.owner or run.owner(str(self.fence))
        await run.store.end_spend(
            "app", owner=owner, fence=run.fence(self.fence), outcome=self.outcome
        )


@dataclass(frozen=True)
class Veto(Step):
    expect: bool
    protects: tuple[str, int] | None = None

    async def run(self, run: Run) -> None:
        if self.protects is None:
            vetoed = await run.store.veto_spend("app", refresh_fp=FP)
        else:
            vetoed = await run.store.veto_spend("app", refresh_fp=FP, protects=self.protects)
        assert vetoed is self.expect, self


@dataclass(frozen=True)
class Record(Step):
    expect: SpendRecord | None

    async def run(self, run: Run) -> None:
        assert await run.store.load_spend("app") == self.expect, self


@dataclass(frozen=True)
class RecordState(Step):
    state: str

    async def run(self, run: Run) -> None:
        assert (await run.store.load_spend("app") or SpendRecord("", "", "")).state == self.state


@dataclass(frozen=True)
class RecordFence(Step):
    fence: Fence

    async def run(self, run: Run) -> None:
        record = await run.store.load_spend("app") or SpendRecord("", "", "", fence=-1)
        assert record.fence == run.fence(self.fence), self


@dataclass(frozen=True)
class Wait(Step):
    seconds: float

    async def run(self, run: Run) -> None:
        await asyncio.sleep(self.seconds)


def sent_by(label: str) -> list[Step]:
    """`label` takes the lease and marks its spend of token_set(1) sent (the answer awaited)."""
    return [Acquire(label), Begin(label), MarkSent(label)]


OK, STALE, LOST, RETRY, UNKNOWN = (
    SpendStart.OK,
    SpendStart.STALE,
    SpendStart.LOST,
    SpendStart.RETRY,
    SpendStart.UNKNOWN,
)
ABORTED = SpendEnd.ABORTED


def scenario(name: str, *steps: Step | list[Step]) -> Any:
    """A row: its id and its steps (lists of steps are spliced in)."""
    flat = [s for step in steps for s in (step if isinstance(step, list) else [step])]
    return pytest.param(flat, id=name)


SPEND_SCENARIOS = [
    # No lease (or a stale fence): lost. A set that is not the stored one: stale.
    scenario(
        "spending_needs_the_lease_and_the_stored_set",
        Commit(),
        Begin("a", LOST, fence=1),
        Acquire("a"),
        Begin("a", STALE, generation=2),
        Begin("a", OK),
    ),
    # A spend announced but never marked sent did not happen: the next holder may spend.
    scenario(
        "an_announced_spend_never_sent_is_replaced",
        Commit(),
        Acquire("a"),
        Begin("a"),
        Release("a"),
        Acquire("b"),
        Begin("b", OK),
        MarkSent("a", False),
        MarkSent("b", True),
    ),
    # A veto turns a live announced spend into an unknown one: it is never marked sent.
    scenario(
        "a_veto_stops_an_announced_spend_while_its_lease_is_held",
        Commit(),
        Acquire("a"),
        Begin("a"),
        Veto(True),
        MarkSent("a", False),
        Release("a"),
        Acquire("b"),
        Begin("b", UNKNOWN),
    ),
    # An announced spend whose lease is gone (a rollback's ghost) is not vetoed: the next
    # holder replaces it as before.
    scenario(
        "a_veto_leaves_an_announced_spend_without_its_lease",
        Commit(),
        Acquire("a"),
        Begin("a"),
        Release("a"),
        Veto(False),
        Acquire("b"),
        Begin("b", OK),
    ),
    # A spend marked sent (or unknown) answers UNKNOWN to the next holder.
    scenario(
        "an_unresolved_spend_blocks_every_other_fence",
        Commit(),
        Acquire("a"),
        Begin("a"),
        MarkSent("a", True),
        Release("a"),
        Acquire("b"),
        Begin("b", UNKNOWN),
        End("a", SpendEnd.UNKNOWN),
        Begin("b", UNKNOWN),
    ),
    # Inside retry_within of the send (store clock), one RETRY; never a second.
    scenario(
        "a_grace_window_allows_exactly_one_retry",
        Commit(),
        sent_by("a"),
        Release("a"),
        Acquire("b"),
        Begin("b", RETRY, retry_within=30),
        MarkSent("b"),
        Release("b"),
        Acquire("c"),
        Begin("c", UNKNOWN, retry_within=30),
    ),
    # A spend sent longer ago than retry_within answers UNKNOWN even with a window.
    scenario(
        "no_retry_once_the_grace_window_has_passed",
        Commit(),
        sent_by("a"),
        Release("a"),
        Wait(0.3),
        Acquire("b"),
        Begin("b", UNKNOWN, retry_within=0.2),
    ),
    # Fences repeat after a rollback: a's late end_spend under the fence b now holds (the
    # counter went back) leaves b's record alone, and b's own ending still works.
    scenario(
        "a_repeated_fence_of_another_owner_does_not_end_its_spend",
        Commit(),
        Acquire("b"),
        Begin("b"),
        MarkSent("b", True),
        # a held this fence number before the store went back to a snapshot.
        End("b", ABORTED, owner="a"),
        End("b", SpendEnd.UNKNOWN, owner="a"),
        Release("b"),
        Acquire("c"),
        Begin("c", UNKNOWN, why="b's spend was sent: its record must still block the token"),
        Release("c"),
        End("b", ABORTED),
        Acquire("d"),
        Begin("d", OK),
    ),
    # A spend that ended without effect (aborted) does not block the next holder.
    scenario(
        "an_aborted_spend_frees_the_token",
        Commit(),
        Acquire("a"),
        Begin("a"),
        End("a", ABORTED),
        Release("a"),
        Acquire("b"),
        Begin("b", OK),
    ),
    # M1: a vetoed record is a state of its own. The vetoed spender's next begin_spend, naming
    # no resolved fence (0) or its own vetoed fence, answers UNKNOWN: it never mistakes the
    # vetoed record for one it resolved.
    scenario(
        "a_veto_sticks_even_for_the_vetoed_spender",
        Commit(),
        Acquire("a"),
        Begin("a"),
        Veto(True),
        Release("a"),
        Acquire("again", owner="a"),
        Begin("again", UNKNOWN, resolved=0),
        Begin("again", UNKNOWN, resolved="a"),
    ),
    # H3: the one grace retry aborts (429): the spend it retried is unknown again with its
    # first send time, so a later holder gets UNKNOWN, never OK, and never a second RETRY.
    scenario(
        "an_aborted_grace_retry_restores_the_unknown_spend",
        Commit(),
        sent_by("a"),
        End("a", SpendEnd.UNKNOWN),
        Release("a"),
        Acquire("b"),
        Begin("b", RETRY, retry_within=30),
        MarkSent("b"),
        End("b", ABORTED),
        Release("b"),
        Acquire("c"),
        Begin("c", UNKNOWN, retry_within=30, resolved=0),
        Begin("c", UNKNOWN, retry_within=30, resolved="b"),
    ),
    # `load_spend` reads the record as it goes: announced, sent, vetoed; none at all before a
    # spend and after an abort.
    scenario(
        "the_spend_record_names_its_owner_and_state",
        Commit(),
        Record(None),
        Acquire("a"),
        Begin("a"),
        Record(SpendRecord("a", FP, "announced")),
        MarkSent("a"),
        Record(SpendRecord("a", FP, "sent")),
        End("a", ABORTED),
        Record(None),
        Acquire("again", owner="a"),
        Begin("again"),
        Veto(True),
        Record(SpendRecord("a", FP, "vetoed")),
    ),
    # `load_spend` marks the record of the one grace retry the store granted (a replica that
    # re-syncs must not veto it), and no other.
    scenario(
        "the_spend_record_says_when_it_is_a_granted_retry",
        Commit(),
        sent_by("a"),
        End("a", SpendEnd.UNKNOWN),
        Record(SpendRecord("a", FP, "unknown", retry=False)),
        Release("a"),
        Acquire("b"),
        Begin("b", RETRY, retry_within=30),
        Record(SpendRecord("b", FP, "announced", retry=True)),
    ),
    # The spender whose `mark_sent` answer was lost never sent: its abort under its own owner
    # name and fence removes the record (another owner's, with the same fence, does not), and
    # the next holder may spend the token.
    scenario(
        "a_sent_record_whose_answer_was_lost_is_aborted_by_its_owner_alone",
        Commit(),
        sent_by("a"),
        Release("a"),
        End("a", ABORTED, owner="b"),
        RecordState("sent"),
        End("a", ABORTED),
        Record(None),
        Acquire("b"),
        Begin("b", OK),
    ),
    # `load_spend` reads the spend's fence (0 once vetoed), for a veto to name it.
    scenario(
        "the_spend_record_carries_its_fence",
        Commit(),
        Acquire("a"),
        Begin("a"),
        RecordFence("a"),
        Veto(True),
        RecordFence(0),
    ),
    # A veto standing for one earlier spend (owner, fence): that owner's abort under another
    # fence, or another owner's under that fence, leaves it; that spend's own abort removes the
    # record and publishes an abort in that owner's name.
    scenario(
        "a_veto_that_names_a_spend_is_lifted_by_that_spends_abort_alone",
        Commit(),
        Acquire("b"),
        Begin("b"),
        Veto(True, protects=("a", 7)),
        End(6, ABORTED, owner="a"),
        End(7, ABORTED, owner="c"),
        End(7, SpendEnd.UNKNOWN, owner="a"),
        Record(SpendRecord("b", FP, "vetoed")),
        End(7, ABORTED, owner="a"),
        Record(None),
    ),
    # A veto standing for an owner's spends known from a notice (fence 0): that owner's abort
    # under any fence lifts it (never fence 0, which names no spend); a veto that names nothing
    # is lifted by no abort.
    scenario(
        "a_veto_that_names_an_owner_alone_is_lifted_by_its_abort_of_any_fence",
        Commit(),
        Acquire("b"),
        Begin("b"),
        Veto(True, protects=("a", 0)),
        End(0, ABORTED, owner="a"),
        Record(SpendRecord("b", FP, "vetoed")),
        End(3, ABORTED, owner="a"),
        Record(None),
        Release("b"),
        Acquire("c"),
        Begin("c"),
        Veto(True),
        [End("c", ABORTED, owner=owner) for owner in ("a", "b", "c")],
        Record(SpendRecord("c", FP, "vetoed")),
    ),
    # A grace retry granted from a `sent` record whose spender never sent (its answer lost):
    # that spender's abort, under its own owner name and fence, makes the retry an ordinary
    # spend; under another owner name it changes nothing.
    scenario(
        "a_grace_retry_of_a_spend_never_sent_becomes_a_first_spend",
        Commit(),
        sent_by("a"),
        Release("a"),
        Acquire("b"),
        Begin("b", RETRY, retry_within=30),
        End("a", ABORTED, owner="c"),
        Record(SpendRecord("b", FP, "announced", retry=True)),
        End("a", ABORTED),
        Record(SpendRecord("b", FP, "announced", retry=False)),
        MarkSent("b", True),
    ),
    # The first spender says it never sent after the retry was sent: the retry's record stays
    # `sent` (its answer decides), as an ordinary spend's.
    scenario(
        "a_sent_retry_of_a_spend_never_sent_stays_sent",
        Commit(),
        sent_by("a"),
        Release("a"),
        Acquire("b"),
        Begin("b", retry_within=30),
        MarkSent("b", True),
        End("a", ABORTED),
        Record(SpendRecord("b", FP, "sent", retry=False)),
    ),
    # The grace retry of a spend never sent aborts (its record of the unknown spend is
    # restored); then the first spender says it never sent: the record goes, and the next
    # holder spends the token.
    scenario(
        "the_record_an_aborted_retry_restored_goes_with_its_spenders_abort",
        Commit(),
        sent_by("a"),
        Release("a"),
        Acquire("b"),
        Begin("b", retry_within=30),
        End("b", ABORTED),
        RecordState("unknown"),
        End("a", ABORTED),
        Record(None),
        Release("b"),
        Acquire("c"),
        Begin("c", OK),
    ),
    # The record an aborted grace retry restored (fence 0, the retrier's name) answers UNKNOWN
    # to the retrier too, whatever fence it names as resolved: fence 0 names no spend (swarm
    # seed 177: the retrier spent the token as new, past the window).
    scenario(
        "a_restored_grace_retry_is_not_its_retriers_to_replace",
        Commit(),
        sent_by("a"),
        Release("a"),
        Acquire("b"),
        Begin("b", RETRY, retry_within=30),
        MarkSent("b"),
        End("b", ABORTED),
        Release("b"),
        Acquire("again", owner="b"),
        Begin("again", UNKNOWN, retry_within=30, resolved=0),
        Begin("again", UNKNOWN, retry_within=30, resolved="b"),
    ),
    # A holder that could not clear its aborted record names it, and may spend again.
    scenario(
        "our_own_aborted_record_may_be_replaced",
        Commit(),
        sent_by("a"),
        Release("a"),
        Acquire("again", owner="a"),
        Begin("again", OK, resolved="a"),
    ),
    # Once the rotated set is committed, the old spend no longer blocks anything.
    scenario(
        "a_newer_commit_resolves_the_spend",
        Commit(),
        Acquire("a"),
        Begin("a"),
        Commit(2, fence="a"),
        Release("a"),
        Acquire("b"),
        Begin("b", OK, generation=2),
    ),
]


class TestSpend:
    @pytest.mark.parametrize("steps", SPEND_SCENARIOS)
    async def test_a_spend_scenario(self, store: TokenStore, steps: list[Step]) -> None:
        """The row's store calls, in order, answer as its steps expect (the row's comment says
        which rule of the spend ledger it holds the store to)."""
        run = Run(store)
        for step in steps:
            await step.run(run)

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

    async def test_a_repeated_fence_of_another_owner_is_another_spend(
        self, store: TokenStore
    ) -> None:
        """The store evicts the lease and the fence counter after a's spend was marked sent;
        b is granted the same fence again. b's spend of that token is another spend: UNKNOWN,
        and b cannot mark a's record sent (swarm seed 75139)."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        if isinstance(store, MemoryStore):
            del store.state.leases["app"], store.state.fences["app"]
        else:
            redis_store = cast(RedisStore, store)
            await redis_store._client.delete(
                redis_store.lease_key("app"), redis_store.fence_key("app")
            )
        b = await store.acquire_lease("app", "b", 5)
        assert b.fence == a.fence
        answer = await store.begin_spend("app", owner="b", fence=b.fence, token=token_set(1))
        assert answer is SpendStart.UNKNOWN
        assert not await store.mark_sent("app", owner="b", fence=b.fence)
        record = await store.load_spend("app")
        assert record is not None and (record.owner, record.state) == ("a", "sent")

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

    async def test_an_abort_that_finds_no_record_is_kept_and_announced(
        self, store: TokenStore
    ) -> None:
        """The store forgot the record (an empty restart, an eviction) before its spender ended
        it as aborted: the abort of an ordinary spend (`refresh_fp` given) is still kept as the
        last aborted spend and announced, so a veto for exactly that spend is refused (swarm
        seeds 12554, 27015, 28726); one without `refresh_fp` (a grace retry's) keeps nothing."""
        fp = token_set(1).refresh_fingerprint or ""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        if isinstance(store, MemoryStore):
            del store.state.spends["app"]
        else:
            redis_store = cast(RedisStore, store)
            await redis_store._client.delete(redis_store.spend_key("app"))
        async with hearing(
            store, keep=lambda n: n.kind == "abort", until=lambda heard: len(heard) == 1
        ) as heard:
            await store.end_spend("app", owner="x", fence=9, outcome=SpendEnd.ABORTED)
            await store.end_spend(
                "app", owner="a", fence=a.fence, outcome=SpendEnd.ABORTED, refresh_fp=fp
            )
        assert [(n.kind, n.refresh_fp, n.owner, n.fence, n.retry_aborted) for n in heard] == [
            ("abort", fp, "a", a.fence, False)
        ]
        assert await store.load_spend("app") is None
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        assert await store.begin_spend("app", owner="b", fence=b.fence, token=token_set(1)) is (
            SpendStart.OK
        )
        assert not await store.veto_spend("app", refresh_fp=fp, protects=("a", a.fence))
        assert (await store.load_spend("app") or SpendRecord("", "", "")).state == "announced"
        # The abort without a fingerprint kept nothing: a veto for that spend stands.
        assert await store.veto_spend("app", refresh_fp=fp, protects=("x", 9))
        assert await store.load_spend("app") == SpendRecord("b", fp, "vetoed")

    async def test_a_record_under_the_callers_fence_made_by_another_owner_is_not_its_own(
        self, store: TokenStore
    ) -> None:
        """The store lost its fence counter (an eviction) while a spend was marked sent: the
        next lease repeats that fence, and its holder's begin_spend meets the record as another
        spend's (unknown) instead of replacing it (swarm seed 56916: it replaced a `sent`
        record, and only a bystander's veto kept the token from leaving a second time)."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        if isinstance(store, MemoryStore):
            del store.state.fences["app"]
        else:
            redis_store = cast(RedisStore, store)
            await redis_store._client.delete(redis_store.fence_key("app"))
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        assert b.fence == a.fence
        assert await store.begin_spend("app", owner="b", fence=b.fence, token=token_set(1)) is (
            SpendStart.UNKNOWN
        )
        record = await store.load_spend("app")
        assert record is not None and (record.owner, record.fence, record.state) == (
            "a",
            a.fence,
            "sent",
        )

    async def test_an_abort_that_finds_another_spends_record_is_kept_unannounced(
        self, store: TokenStore
    ) -> None:
        """The store forgot the record (an eviction) and another spend of the token began
        before its spender ended it as aborted: the abort of an ordinary spend is still kept, so
        a veto for exactly that spend is refused (a bystander that read the record before it
        went would veto the new spend in the name of a spender that may have exited: beside
        swarm seed 56916), and it is not announced (the record is another spend's, which a
        replica that heard its notices must not forget)."""
        fp = token_set(1).refresh_fingerprint or ""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        if isinstance(store, MemoryStore):
            del store.state.spends["app"]
        else:
            redis_store = cast(RedisStore, store)
            await redis_store._client.delete(redis_store.spend_key("app"))
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        assert await store.begin_spend("app", owner="b", fence=b.fence, token=token_set(1)) is (
            SpendStart.OK
        )
        async with hearing(
            store, keep=lambda n: n.kind == "abort", until=lambda heard: len(heard) == 1
        ) as heard:
            for _ in range(2):  # asked again (a drain's retry): kept once
                await store.end_spend(
                    "app", owner="a", fence=a.fence, outcome=SpendEnd.ABORTED, refresh_fp=fp
                )
            assert not await store.veto_spend("app", refresh_fp=fp, protects=("a", a.fence))
            record = await store.load_spend("app")
            assert record is not None and (record.owner, record.state) == ("b", "announced")
            await store.end_spend("app", owner="b", fence=b.fence, outcome=SpendEnd.ABORTED)
        assert [(n.owner, n.fence) for n in heard] == [("b", 0)]

    async def test_a_restored_record_names_the_spend_it_stands_for(self, store: TokenStore) -> None:
        """The record an aborted grace retry restored is under the retrier's name and fence 0,
        and names the spend it stands for: the first spender and its fence (swarm seed 10135:
        read as the retrier's, it was remembered as nobody's spend)."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        record = await store.load_spend("app")
        assert record is not None and not record.restored
        assert (record.orig_owner, record.orig_fence) == (None, 0)
        await store.release_lease("app", "a", a.fence)
        b = await store.acquire_lease("app", "b", 5)
        retry = await store.begin_spend(
            "app", owner="b", fence=b.fence, token=token_set(1), retry_within=30
        )
        assert retry is SpendStart.RETRY
        record = await store.load_spend("app")
        assert record is not None and record.retry and not record.restored
        assert (record.orig_owner, record.orig_fence) == ("a", a.fence)
        await store.end_spend("app", owner="b", fence=b.fence, outcome=SpendEnd.ABORTED)
        record = await store.load_spend("app")
        assert record is not None and record.restored
        assert (record.owner, record.fence, record.state) == ("b", 0, "unknown")
        assert (record.orig_owner, record.orig_fence) == ("a", a.fence)


@asynccontextmanager
async def hearing(
    store: TokenStore,
    *,
    keep: Callable[[Notice], bool] = lambda notice: True,
    until: Callable[[list[Notice]], bool],
) -> AsyncIterator[list[Notice]]:
    """The notices `store` publishes while the block runs (those `keep` selects), heard until
    `until(heard)` holds: awaited, for up to 5 s, when the block ends."""
    updates = cast(AsyncGenerator[Notice, None], store.updates())
    heard: list[Notice] = []

    async def listen() -> None:
        async for notice in updates:
            if keep(notice):
                heard.append(notice)
            if until(heard):
                return

    listener = asyncio.ensure_future(listen())
    await asyncio.sleep(0.3)  # subscribed
    try:
        yield heard
        await asyncio.wait_for(listener, 5)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await updates.aclose()


class TestNotices:
    async def test_commits_spends_and_aborts_are_announced(self, store: TokenStore) -> None:
        """Every replica hears of a commit (version, rank), of a spend, its send and its abort."""
        async with hearing(
            store,
            keep=lambda notice: notice.kind not in ("lease", "release"),
            until=lambda heard: len(heard) == 4,
        ) as heard:
            await store.commit("app", token_set(1))
            lease = await marked_sent(store, "a")
            await store.end_spend("app", owner="a", fence=lease.fence, outcome=SpendEnd.ABORTED)
        fp = token_set(1).refresh_fingerprint
        assert [(n.kind, n.rank, n.refresh_fp, n.owner) for n in heard] == [
            ("token", (1, 1), None, None),
            ("spend", (1, 1), fp, "a"),
            ("sent", (1, 1), fp, "a"),
            ("abort", (1, 1), fp, "a"),
        ]
        assert heard[0].version == 1
        assert not any(n.retry or n.retry_aborted for n in heard)
        # The `sent` notice names the spend's fence (a veto for it names that spend exactly).
        assert [n.fence for n in heard] == [0, 0, lease.fence, 0]

    async def test_a_grace_retry_and_its_abort_say_so(self, store: TokenStore) -> None:
        """H2/H3: the spend of a granted grace retry is marked `retry` (bystanders do not veto
        it); its abort is marked `retry_aborted` (the retried spend is still unknown)."""
        await store.commit("app", token_set(1))
        a = await marked_sent(store, "a")
        await store.release_lease("app", "a", a.fence)
        async with hearing(
            store,
            keep=lambda notice: notice.kind in ("spend", "abort"),
            until=lambda heard: len(heard) == 2,
        ) as heard:
            b = await store.acquire_lease("app", "b", 5)
            retry = await store.begin_spend(
                "app", owner="b", fence=b.fence, token=token_set(1), retry_within=30
            )
            assert retry is SpendStart.RETRY
            await store.end_spend("app", owner="b", fence=b.fence, outcome=SpendEnd.ABORTED)
        assert [(n.kind, n.owner, n.retry, n.retry_aborted) for n in heard] == [
            ("spend", "b", True, False),
            ("abort", "b", False, True),
        ]
        # The retry's abort names the spend it retried, whose record it restored (swarm seed
        # 30624): a bystander that knew the spend as the retrier's now knows it as a's.
        assert [n.retried for n in heard] == [None, ("a", a.fence)]

    async def test_a_veto_for_any_of_the_recent_aborted_spends_is_refused(
        self, store: TokenStore
    ) -> None:
        """A veto naming a spend its spender aborted is refused although later spends of the
        token were aborted since (swarm seed 30624: three later aborts had replaced the one
        kept mark, and a bystander that missed the first abort vetoed for it, for good); the
        store keeps ABORTS_KEPT of them, the newest."""
        fp = token_set(1).refresh_fingerprint or ""
        await store.commit("app", token_set(1))
        fences = await aborted_spends(store, ["a", "b", "c"])
        d = await store.acquire_lease("app", "d", 5)
        await store.begin_spend("app", owner="d", fence=d.fence, token=token_set(1))
        for owner, fence in zip(("a", "b", "c"), fences, strict=True):
            assert not await store.veto_spend("app", refresh_fp=fp, protects=(owner, fence))
        assert (await store.load_spend("app") or SpendRecord("", "", "")).state == "announced"
        assert await store.veto_spend("app", refresh_fp=fp, protects=("a", fences[0] + 100))

    async def test_only_the_newest_aborts_are_kept(self, store: TokenStore) -> None:
        """The memory of aborted spends is bounded: past ABORTS_KEPT later aborts, a veto for
        the first one is no longer refused."""
        fp = token_set(1).refresh_fingerprint or ""
        await store.commit("app", token_set(1))
        fences = await aborted_spends(store, [f"r{index}" for index in range(ABORTS_KEPT + 1)])
        z = await store.acquire_lease("app", "z", 5)
        await store.begin_spend("app", owner="z", fence=z.fence, token=token_set(1))
        assert not await store.veto_spend("app", refresh_fp=fp, protects=("r1", fences[1]))
        assert await store.veto_spend("app", refresh_fp=fp, protects=("r0", fences[0]))

    async def test_a_token_notice_carries_the_committed_set(self, store: TokenStore) -> None:
        """A replica adopts a committed set from its notice, without reading the store."""
        async with hearing(store, until=lambda heard: len(heard) == 1) as heard:
            await store.commit("app", token_set(3))
        [notice] = heard
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
        async with hearing(store, until=lambda heard: heard[-1].kind == "token") as heard:
            lease = await store.acquire_lease("app", "a", 7.5)
            assert not (await store.acquire_lease("app", "b", 5)).held
            await store.release_lease("app", "b", lease.fence)  # not b's: nothing happens
            await store.release_lease("app", "a", lease.fence)
            await store.release_lease("app", "a", lease.fence)  # released already: nothing
            await store.commit("app", token_set(1))  # the end of what is heard
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
        async with hearing(store, until=lambda heard: heard[-1].kind == "token") as heard:
            await store.refuse_token("app", token_set(1).fingerprint, interval=5)  # stale
            await store.refuse_token("app", token_set(2).fingerprint, interval=5)
            await store.refuse_token("app", token_set(2).fingerprint, interval=5)  # already
            await store.commit("app", token_set(3))  # the end of what is heard
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
            async with hearing(reader, until=lambda heard: len(heard) == 1) as heard:
                await writer.commit("app", token_set(2))
            [notice] = heard
            assert notice.kind == "token" and notice.rank == (1, 2)
            assert notice.token is None
        finally:
            await writer.close()
            await reader.close()


class TestLowerExpiry:
    """Issue 20, M3: after the store's clock stepped back, a replica lowers the stored set's
    expiry to its own deadline in the new frame, conditionally, never raising it."""

    async def test_lowers_the_stored_expiry_and_never_raises_it(self, store: TokenStore) -> None:
        """Every read then answers the lower expiry (load and load_many); a later or equal
        one changes nothing; a lower one again lowers it."""
        held = token_set(2)
        await store.commit("app", held)
        assert await store.lower_expiry("app", held, 4000.0)
        assert (await store.load("app")).expires_at == 4000.0  # type: ignore[union-attr]
        assert (await store.load_many(["app"]))["app"].expires_at == 4000.0
        assert not await store.lower_expiry("app", held, 4000.0)
        assert not await store.lower_expiry("app", held, 4300.0)
        assert not await store.lower_expiry("app", held, 4600.0)
        assert (await store.load("app")).expires_at == 4000.0  # type: ignore[union-attr]
        assert await store.lower_expiry("app", held, 3900.5)
        stored = await store.load("app")
        assert stored is not None
        assert (stored.expires_at, stored.rank, stored.access_token) == (
            3900.5,
            (1, 2),
            held.access_token,
        )

    async def test_a_lowering_is_announced(self, store: TokenStore) -> None:
        """One LOWERED notice per bound kept, naming the set (rank, access token fingerprint)
        and the replica that lowered it; a lowering that changes nothing says nothing. Its
        holders read the store at once (swarm seeds 68595, 80253: a pod that read the set at
        face value served it until its periodic look, past its true expiry)."""
        held = token_set(2)
        await store.commit("app", held)
        async with hearing(store, until=lambda heard: heard[-1].kind == "token") as heard:
            assert await store.lower_expiry("app", held, 4000.0, owner="r1")
            assert not await store.lower_expiry("app", held, 4100.0, owner="r2")
            assert not await store.lower_expiry("app", token_set(1), 3000.0, owner="r2")
            await store.commit("app", token_set(3))  # the end of what is heard
        assert [(n.kind, n.rank, n.access_fp, n.owner, n.protocol) for n in heard] == [
            (LOWERED, held.rank, held.fingerprint, "r1", PROTOCOL_VERSION),
            ("token", token_set(3).rank, None, None, PROTOCOL_VERSION),
        ]

    async def test_a_lowered_set_keeps_its_lifetime(self, store: TokenStore) -> None:
        """The issue moves with the expiry: a stamp re-expressed in another frame of Redis's
        clock, not a shorter token (kept in place, a reader would take the set for issued in
        the future and lower it again: swarm seed 5792)."""
        held = token_set(2)
        await store.commit("app", held)
        assert await store.lower_expiry("app", held, held.expires_at - 20.0)
        stored = await store.load("app")
        assert stored is not None
        assert (stored.issued_at, stored.lifetime) == (held.issued_at - 20.0, held.lifetime)

    async def test_only_the_set_it_names(self, store: TokenStore) -> None:
        """Another rank, the same rank with another access token, or nothing stored: no
        rewrite (a replica holding an older set must not cut a newer set's life)."""
        assert not await store.lower_expiry("app", token_set(2), 4000.0)
        await store.commit("app", token_set(2))
        assert not await store.lower_expiry("app", token_set(1), 4000.0)
        assert not await store.lower_expiry("app", token_set(3), 4000.0)
        other = replace(token_set(2), access_token="another-access-token-secret")
        assert not await store.lower_expiry("app", other, 4000.0)
        assert not await store.lower_expiry("other", token_set(2), 4000.0)
        assert (await store.load("app")).expires_at == 4600.0  # type: ignore[union-attr]

    async def test_a_newer_commit_keeps_its_own_expiry(self, store: TokenStore) -> None:
        """The bound belongs to the set it was written for: a repeated commit of that set (a
        write-back) keeps it, a newer set's commit stores its own expiry."""
        await store.commit("app", token_set(2))
        assert await store.lower_expiry("app", token_set(2), 4000.0)
        assert (await store.commit("app", token_set(2))).stored
        assert (await store.load("app")).expires_at == 4000.0  # type: ignore[union-attr]
        assert (await store.commit("app", token_set(3))).stored
        assert (await store.load("app")).expires_at == 4600.0  # type: ignore[union-attr]


class TestLowerExpiryOnRedis:
    async def test_the_bound_is_beside_the_encrypted_set(self, redis_server: RedisServer) -> None:
        """The rewrite leaves the ciphertext (its AAD binds it to the app and client binding,
        M6) as it was: the bound is a field of its own, which a read applies as a minimum, and
        which names the version it was written for. A commit by a release before the field
        (which does not remove it) leaves a bound of another version: ignored."""
        store = RedisStore(
            redis_client(redis_server.url),
            key_prefix="tb",
            keyring=Keyring([("k", b"K" * 32)]),
            metrics=Metrics(),
            clock=SystemClock(),
        )
        client = redis_client(redis_server.url)
        key = store.token_key("app@0123456789abcdef")
        try:
            await store.commit("app@0123456789abcdef", token_set(2))
            blob = await client.hget(key, "blob")
            assert await store.lower_expiry("app@0123456789abcdef", token_set(2), 4000.25)
            fields = await client.hgetall(key)
            assert fields[b"blob"] == blob
            assert (fields[b"expires_by"], fields[b"expires_by_version"]) == (b"4000250", b"1")
            stored = await store.load("app@0123456789abcdef")
            assert stored is not None and stored.expires_at == 4000.25
            # A blob copied under another name does not open there, bound or not (its AAD).
            await client.hset(store.token_key("app@fedcba9876543210"), mapping=fields)
            with pytest.raises(UnreadableTokenSet):
                await store.load("app@fedcba9876543210")
            # An older release's commit: HSET of the newer set's fields, the bound left behind.
            newer = token_set(3)
            await client.hset(
                key,
                mapping={
                    "version": 2,
                    "gen": 3,
                    "fp": newer.fingerprint,
                    "blob": store._keyring.encrypt(
                        _plaintext(newer), store._aad("app@0123456789abcdef")
                    ),
                },
            )
            stored = await store.load("app@0123456789abcdef")
            assert stored is not None and (stored.rank, stored.expires_at) == ((1, 3), 4600.0)
            # This release's commit of a newer set removes the bound it finds (only then).
            assert (await store.commit("app@0123456789abcdef", token_set(4))).stored
            fields = await client.hgetall(key)
            assert b"expires_by" not in fields and b"expires_by_version" not in fields
            assert (await store.commit("app@0123456789abcdef", token_set(5))).stored
            stored = await store.load("app@0123456789abcdef")
            assert stored is not None and stored.rank == (1, 5)
        finally:
            await client.aclose()
            await store.close()

"""A spend marked sent but never sent (issue 20, swarm seeds of `_SENT_NEVER_SENT`): the store
applied `mark_sent` and its answer was lost, so the spender never calls its HTTP client and
cannot write its abort. It resolves its own record when the store answers again (also after a
config reload), and a bystander that met the record keeps it as the spender's."""

from __future__ import annotations

import asyncio

from broker.errors import StoreUnavailable
from broker.fleet import Blocked, FleetProtocol, OutcomeUnknown
from broker.model import TokenSet
from broker.store import Notice
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock
from tests.support.fakes import FLEET_APP, CurrentSet, fleet_protocol, spendable_grant

APP = FLEET_APP


class _AnswerLost(MemoryStore):
    """`mark_sent` is applied, then the store goes down before the answer comes back."""

    async def mark_sent(self, app: str, *, owner: str, fence: int) -> bool:
        await super().mark_sent(app, owner=owner, fence=fence)
        self.fail = True
        raise StoreUnavailable("simulated: the answer was lost")


def _grant(clock: FakeClock) -> TokenSet:
    return spendable_grant(clock, "at-never-sent-1", "rt-never-sent")


def _protocol(store: MemoryStore, clock: FakeClock, owner: str, token: TokenSet) -> FleetProtocol:
    return fleet_protocol(store, clock, CurrentSet(token), owner=owner)


async def _never_called(refresh_token: str | None) -> TokenSet:
    raise AssertionError("the refresh token was handed to the HTTP client")


async def _mark_sent_answer_lost(clock: FakeClock) -> tuple[_AnswerLost, TokenSet, FleetProtocol]:
    store = _AnswerLost(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    spender = _protocol(store, clock, "r0", token)
    refresh = asyncio.ensure_future(
        spender.refresh(_never_called, is_due=lambda _: True, servable_left=10.0)
    )
    while not refresh.done():
        await clock.advance(0.1)  # the objection window
    assert isinstance(refresh.result(), Blocked)
    assert store.state.spends[APP].state == "sent"
    return store, token, spender


async def test_the_spender_ends_its_never_sent_record_when_the_store_is_back() -> None:
    """A bystander meets the `sent` record (unknown to it, but the spender's to resolve); the
    spender's next sync ends the record as aborted, and the bystander's memory of it goes with
    the abort notice: it may spend the token, and does not veto the spender's spend of it."""
    clock = FakeClock()
    store, token, spender = await _mark_sent_answer_lost(clock)
    store.fail = False
    notices = store.updates()

    async def first_abort() -> Notice:
        # Lease grants and releases are announced too (the fleet's cost); the abort is awaited.
        async for notice in notices:
            if notice.kind == "abort":
                return notice
        raise AssertionError("the notices ended")

    first = asyncio.ensure_future(first_abort())
    await asyncio.sleep(0)  # subscribed
    await clock.advance(12.0)  # the spender's lease lapses
    bystander = _protocol(store, clock, "r1", token)
    outcome = await bystander.refresh(_never_called, is_due=lambda _: True, servable_left=8.0)
    assert isinstance(outcome, OutcomeUnknown)
    assert bystander.outcome_unknown(token)

    assert await spender.sync()

    assert APP not in store.state.spends
    abort = await asyncio.wait_for(first, 1.0)
    assert (abort.kind, abort.owner) == ("abort", "r0")
    bystander.on_notice(abort)
    assert not bystander.outcome_unknown(token)


async def test_a_bystander_cut_off_before_it_reads_the_records_owner_remembers_nothing() -> None:
    """A bystander meets the `sent` record, then the store goes down before it reads whose
    record it is (door record_owner_unread_in_a_flapping_store): it is blocked, and keeps no
    spend of nobody's that it would veto for good; once the store answers it reads the owner
    and keeps the spend as the spender's."""
    clock = FakeClock()
    store, token, _ = await _mark_sent_answer_lost(clock)
    store.fail = False
    await clock.advance(12.0)  # the spender's lease lapses
    fp = token.refresh_fingerprint or ""
    bystander = _protocol(store, clock, "r1", token)
    load_spend = store.load_spend

    async def cut_off(app: str) -> object:
        store.fail = True  # the store goes down after begin_spend answered
        return await load_spend(app)

    store.load_spend = cut_off  # type: ignore[method-assign,assignment]
    outcome = await bystander.refresh(_never_called, is_due=lambda _: True, servable_left=8.0)
    assert isinstance(outcome, Blocked)
    assert fp not in bystander.memory.foreign
    assert not bystander.outcome_unknown(token)

    store.load_spend = load_spend  # type: ignore[method-assign]
    store.fail = False
    await clock.advance(12.0)  # the bystander's own lease lapses
    outcome = await bystander.refresh(_never_called, is_due=lambda _: True, servable_left=8.0)
    assert isinstance(outcome, OutcomeUnknown)
    assert bystander.memory.foreign[fp][1] == "r0"


async def test_a_reload_hands_the_unresolved_abort_to_the_new_refresher() -> None:
    """A config reload replaces the protocol (a new owner name) before the store is back: the
    new one ends the old one's never-sent record under the old owner name."""
    clock = FakeClock()
    store, token, spender = await _mark_sent_answer_lost(clock)
    reloaded = _protocol(store, clock, "r0-reloaded", token)
    reloaded.carry_over(spender, same_grant=True)
    store.fail = False

    assert await reloaded.sync()

    assert APP not in store.state.spends


async def test_another_owner_cannot_end_the_record() -> None:
    """Only the owner name that made the record ends it: a restarted process (a new name)
    remembers nothing and leaves it alone."""
    clock = FakeClock()
    store, token, _ = await _mark_sent_answer_lost(clock)
    store.fail = False
    restarted = _protocol(store, clock, "r0-restarted", token)

    assert await restarted.sync()

    assert store.state.spends[APP].state == "sent"

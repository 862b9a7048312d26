"""Vetoes and foreign spends: what a replica remembers of other replicas' spends (seeds 4556,
1630, 2331)."""

from __future__ import annotations

from broker.errors import UnreadableTokenSet
from broker.fleet import FleetProtocol, OutcomeUnknown
from broker.model import TokenSet
from broker.store import Notice, SpendEnd, SpendStart
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock
from tests.support.fakes import FLEET_APP, CurrentSet, fleet_protocol, spendable_grant

APP = FLEET_APP


def _grant(clock: FakeClock) -> TokenSet:
    return spendable_grant(clock, "at-vetoed-1", "rt-spent-once", expires_in=-40)


def _protocol(store: MemoryStore, clock: FakeClock, owner: str, token: TokenSet) -> FleetProtocol:
    return fleet_protocol(store, clock, CurrentSet(token, adopts=False), owner=owner)


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
    remembers.memory.unknown.add(token.refresh_fingerprint or "")
    fence = await _announce(store, "r1", token)  # r1 restarted and forgot; r0 missed the notice

    assert await remembers.sync()

    assert not await store.mark_sent(APP, owner="r1", fence=fence)


class _KeyLacked(MemoryStore):
    """A store whose set was written back under a key this replica lacks."""

    async def load(self, app: str) -> TokenSet | None:
        stored = await super().load(app)
        if stored is not None:
            raise UnreadableTokenSet(
                "written under unknown key id 'k2'", rank=stored.rank, version=stored.version
            )
        return stored


async def test_resync_vetoes_a_spend_of_a_token_remembered_as_spent_under_a_key_it_lacks() -> None:
    """Swarm seed 88902: the store forgot the spender's `sent` record (an empty restart), a
    replica wrote the same set back under a key the spender lacks, and announced a spend of it
    while the spender, whose spend ended unknown, was re-subscribing. The spender's re-sync
    cannot open the stored set, yet it is the set it holds: it vetoes, as with a readable one."""
    clock = FakeClock()
    store = _KeyLacked(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    remembers = _protocol(store, clock, "r0", token)
    remembers.memory.unknown.add(token.refresh_fingerprint or "")
    fence = await _announce(store, "r2", token)

    assert await remembers.sync()

    assert not await store.mark_sent(APP, owner="r2", fence=fence)


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


def _notice(kind: str, owner: str, token: TokenSet) -> Notice:
    return Notice(APP, kind, rank=token.rank, refresh_fp=token.refresh_fingerprint, owner=owner)


async def test_a_spenders_next_spend_resolves_its_earlier_one() -> None:
    """A replica that heard r1 send a token does not veto r1 spending it again (r1 knows its
    last spend ended without effect; the abort notice was lost), but does veto anyone else."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    heard = _protocol(store, clock, "r0", token)
    heard.on_notice(_notice("sent", "r1", token))

    assert heard.must_veto(_notice("spend", "r2", token))
    assert not heard.must_veto(_notice("spend", "r1", token))
    heard.on_notice(_notice("spend", "r1", token))
    assert not heard.must_veto(_notice("spend", "r2", token))


async def test_another_replicas_unresolved_spend_is_forgiven_when_its_spender_resolves_it() -> None:
    """Holding the lease over another replica's unresolved spend answers outcome-unknown (the
    grant is at risk), and the token is spendable again once that spender's abort arrives."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    waiting = _protocol(store, clock, "r0", token)
    waiting.on_notice(_notice("sent", "r1", token))

    async def fetch(refresh_token: str | None) -> TokenSet:
        raise AssertionError("must not spend a token another replica is spending")

    first = await waiting.refresh(fetch, is_due=lambda _: True, servable_left=0.0)
    assert isinstance(first, OutcomeUnknown)
    assert waiting.outcome_unknown(token)
    assert isinstance(waiting._spend_blocked(token), OutcomeUnknown)
    waiting.on_notice(_notice("abort", "r1", token))
    assert not waiting.outcome_unknown(token)
    assert waiting._spend_blocked(token) is None


async def test_a_token_sent_by_two_replicas_is_resolved_by_neither_ones_next_spend() -> None:
    """Once two replicas sent the same token (a grace-window retry), neither one's next spend
    proves the other's ended without effect: it is vetoed."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    heard = _protocol(store, clock, "r0", token)
    heard.on_notice(_notice("sent", "r1", token))
    heard.on_notice(_notice("sent", "r2", token))

    assert heard.must_veto(_notice("spend", "r1", token))
    assert heard.must_veto(_notice("spend", "r2", token))


async def test_a_veto_for_one_spenders_spend_names_it_and_its_abort_lifts_it() -> None:
    """Seed 1233: a veto that stands only for another replica's `sent` spend names that
    spender, and the spender, whose spends of the token all ended without effect, lifts it
    when it meets the vetoed record: the fleet does not wait for a person."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    fp = token.refresh_fingerprint or ""
    bystander = _protocol(store, clock, "r0", token)
    bystander.on_notice(_notice("sent", "r2", token))  # r2's abort notice never reached r0
    spender = _protocol(store, clock, "r2", token)
    spender.memory.aborts[spender.owner, 4] = (
        fp  # r2's spend under fence 4 was refused (429): no effect
    )
    fence = await _announce(store, "r1", token)
    notice = _notice("spend", "r1", token)
    assert bystander.must_veto(notice)

    await bystander.veto(notice)

    assert not await store.mark_sent(APP, owner="r1", fence=fence)
    assert await spender._lift_vetoes_of_our_aborts(fp)
    assert await store.load_spend(APP) is None


async def test_a_veto_for_our_own_unknown_spend_names_no_one() -> None:
    """A veto that stands for the vetoer's own unknown spend (or a token on its wire, or two
    spenders' spends) names nobody: no abort can lift it."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    fp = token.refresh_fingerprint or ""
    bystander = _protocol(store, clock, "r0", token)
    bystander.on_notice(_notice("sent", "r2", token))
    assert bystander._protects(fp) == ("r2", 0)
    bystander.memory.unknown.add(fp)
    assert bystander._protects(fp) is None
    bystander.memory.unknown.discard(fp)
    bystander.on_notice(_notice("sent", "r3", token))  # a second spender: no one alone
    assert bystander._protects(fp) is None


async def test_a_spender_with_an_unknown_spend_of_the_token_lifts_nothing() -> None:
    """A spender ends its aborted spends again only while none of its spends of the token is
    unknown: a veto may stand for that one."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    fp = token.refresh_fingerprint or ""
    await _announce(store, "r1", token)
    assert await store.veto_spend(APP, refresh_fp=fp, protects=("r2", 0))
    spender = _protocol(store, clock, "r2", token)
    spender.memory.aborts[spender.owner, 4] = fp
    spender.memory.unknown.add(fp)

    assert not await spender._lift_vetoes_of_our_aborts(fp)

    assert await store.load_spend(APP) is not None


async def test_a_veto_for_a_spend_heard_with_its_fence_names_it_exactly() -> None:
    """Seeds 12554, 27015, 28726: the `sent` notice names the spend's fence, so a bystander's
    veto stands for exactly that spend, and the store refuses it once that spend's spender
    ended it as aborted, even after the store forgot the record (the abort kept anyway)."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    fp = token.refresh_fingerprint or ""
    bystander = _protocol(store, clock, "r0", token)
    bystander.on_notice(Notice(APP, "sent", rank=token.rank, refresh_fp=fp, owner="r2", fence=4))
    assert bystander._protects(fp) == ("r2", 4)
    # r2's spend under fence 4 ended without effect after the store forgot its record; r0
    # missed the abort notice.
    await store.end_spend(APP, owner="r2", fence=4, outcome=SpendEnd.ABORTED, refresh_fp=fp)
    fence = await _announce(store, "r1", token)
    notice = _notice("spend", "r1", token)
    assert bystander.must_veto(notice)

    await bystander.veto(notice)

    assert await store.mark_sent(APP, owner="r1", fence=fence)


def test_a_sent_notice_keeps_its_fence_on_the_wire() -> None:
    """The fence of a `sent` notice round-trips; other notices carry none."""
    notice = Notice(APP, "sent", rank=(1, 2), refresh_fp="abc", owner="r1", fence=7)
    assert Notice.decode(notice.encode()) == notice
    assert '"fence"' not in Notice(APP, "abort", refresh_fp="abc", owner="r1").encode()


async def test_a_restored_record_is_remembered_as_its_first_spenders_spend() -> None:
    """Seed 10135: the record an aborted grace retry restored (the retrier's name, fence 0)
    stands for the first spender's spend: the retrier and the others remember it as that
    spend (not as nobody's, not as the retrier's), so that spender's next spend of the token,
    which it makes only knowing its own spend had no effect, is not vetoed."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    await store.commit(APP, token)
    fp = token.refresh_fingerprint or ""
    first = await _announce(store, "r2", token)
    assert await store.mark_sent(APP, owner="r2", fence=first)
    await store.release_lease(APP, "r2", first)
    lease = await store.acquire_lease(APP, "r1", 30.0)
    assert (
        await store.begin_spend(APP, owner="r1", fence=lease.fence, token=token, retry_within=30)
        is SpendStart.RETRY
    )
    await store.end_spend(APP, owner="r1", fence=lease.fence, outcome=SpendEnd.ABORTED)
    await store.release_lease(APP, "r1", lease.fence)
    for owner in ("r1", "r0"):  # the retrier, and another bystander
        replica = _protocol(store, clock, owner, token)
        assert await replica._record_owner(fp) == "r2"
        assert replica.memory.foreign_fences[fp] == ("r2", first)
    assert await _protocol(store, clock, "r2", token)._record_owner(fp) is None  # its own


def test_an_abort_of_an_earlier_spend_leaves_a_later_one_remembered() -> None:
    """An abort notice that names an earlier fence of the spender than the `sent` notice we
    heard (an abort written late, after the store forgot the later spend's record) does not
    clear our memory of the later spend; one naming that spend does."""
    clock = FakeClock()
    store = MemoryStore(clock)
    token = _grant(clock)
    fp = token.refresh_fingerprint or ""
    bystander = _protocol(store, clock, "r0", token)
    bystander.on_notice(Notice(APP, "sent", rank=token.rank, refresh_fp=fp, owner="r2", fence=4))
    bystander.on_notice(Notice(APP, "abort", refresh_fp=fp, owner="r2", fence=1))
    assert fp in bystander.memory.foreign
    bystander.on_notice(Notice(APP, "abort", refresh_fp=fp, owner="r2", fence=4))
    assert fp not in bystander.memory.foreign


def _retry_abort(token: TokenSet, retrier: str, retried: tuple[str, int]) -> Notice:
    """The abort notice of `retrier`'s grace retry of the spend `retried` (owner, fence)."""
    fp = token.refresh_fingerprint or ""
    return Notice(APP, "abort", refresh_fp=fp, owner=retrier, retry_aborted=True, retried=retried)


def _sent(token: TokenSet, owner: str, fence: int, *, retry: bool = False) -> Notice:
    fp = token.refresh_fingerprint or ""
    return Notice(
        APP, "sent", rank=token.rank, refresh_fp=fp, owner=owner, fence=fence, retry=retry
    )


def _bystander(owner: str) -> tuple[FleetProtocol, TokenSet, str]:
    """A replica `owner` that holds the grant, and the grant and its refresh fingerprint."""
    clock = FakeClock()
    token = _grant(clock)
    return (
        _protocol(MemoryStore(clock), clock, owner, token),
        token,
        token.refresh_fingerprint or "",
    )


class TestAnAbortedGraceRetry:
    """A grace retry that ended without effect leaves the spend it retried unknown: a
    bystander remembers that spend, so that a veto names it and its spender's abort lifts it
    (swarm seed 30624; door retry_aborted_after_both_sends_heard)."""

    def test_heard_only_the_retry_the_spend_retried_is_remembered(self) -> None:
        bystander, token, fp = _bystander("r5")
        bystander.on_notice(_sent(token, "r4", 6, retry=True))
        bystander.on_notice(_retry_abort(token, "r4", ("r7", 5)))
        assert bystander.memory.foreign[fp][1] == "r7"
        assert bystander.memory.foreign_fences[fp] == ("r7", 5)

    def test_heard_both_sends_the_spend_retried_is_remembered(self) -> None:
        bystander, token, fp = _bystander("r0")
        bystander.on_notice(_sent(token, "r2", 1))
        first_heard = bystander.memory.foreign[fp][0]
        bystander.on_notice(_sent(token, "r1", 2, retry=True))
        assert bystander.memory.foreign[fp] == (first_heard, None)  # two spenders: no one alone
        bystander.on_notice(_retry_abort(token, "r1", ("r2", 1)))
        assert bystander.memory.foreign[fp] == (first_heard, "r2")
        assert bystander.memory.foreign_fences[fp] == ("r2", 1)
        assert not bystander.must_veto(_notice("spend", "r2", token))  # its own next spend
        assert bystander.must_veto(_notice("spend", "r3", token))

    def test_the_spend_retried_was_ours_and_aborted_nothing_is_remembered(self) -> None:
        """The retried spend is this replica's own, which it ended as aborted (its abort went to
        a split brain's old primary): nothing of the token is unknown, and it vetoes no spend
        in its own name (swarm seed 55914: it did, and its own OutcomeUnknown then kept it from
        the begin_spend that would have lifted the veto)."""
        spender, token, fp = _bystander("r3")
        spender.memory.aborted("r3", 4, fp)
        spender.on_notice(_sent(token, "r1", 5, retry=True))
        spender.on_notice(_retry_abort(token, "r1", ("r3", 4)))
        assert fp not in spender.memory.foreign
        assert not spender.memory.is_unknown(fp)
        assert not spender.must_veto(_notice("spend", "r2", token))

    def test_the_spend_retried_was_ours_and_unknown_it_stays_unknown(self) -> None:
        """The retried spend is this replica's own, sent with no answer: still never spent
        again, and vetoed, as its own unknown spend (never forgiven), not as another's."""
        spender, token, fp = _bystander("r3")
        spender.memory.our_unknown(fp, 0.0)
        spender.on_notice(_sent(token, "r1", 5, retry=True))
        spender.on_notice(_retry_abort(token, "r1", ("r3", 4)))
        assert fp not in spender.memory.foreign
        assert spender.memory.is_unknown(fp)
        assert spender.must_veto(_notice("spend", "r2", token))

    def test_the_spender_keeps_no_spend_of_its_own_as_anothers(self) -> None:
        """Swarm seeds 62442, 72135: the spender reads the retry's notices after it aborted
        its own spend (it was frozen, or its abort was slow). The spend retried is its own:
        remembered as another replica's under its own name, it vetoed every other spend of
        the token, and no abort notice of its own ever cleared that."""
        spender, token, fp = _bystander("r1")
        spender.memory.aborted("r1", 15, fp)
        spender.on_notice(_sent(token, "r4", 16, retry=True))
        spender.on_notice(_retry_abort(token, "r4", ("r1", 15)))
        assert fp not in spender.memory.foreign
        assert not spender.must_veto(_notice("spend", "r0", token))
        assert not spender.outcome_unknown(token)

    def test_the_spenders_own_unknown_spend_stays_unknown(self) -> None:
        """What it knows of its own spend stands: sent with no answer, it is never presented
        again, and every other replica's spend of it is vetoed."""
        spender, token, fp = _bystander("r1")
        spender.memory.our_unknown(fp, 0.0)
        spender.on_notice(_sent(token, "r4", 16, retry=True))
        spender.on_notice(_retry_abort(token, "r4", ("r1", 15)))
        assert spender.outcome_unknown(token)
        assert spender.must_veto(_notice("spend", "r0", token))

    def test_the_spend_of_the_refresher_a_reload_replaced(self) -> None:
        """After a config reload, an aborted spend of the old owner name handed over
        (`carry_over`) is ours too; a spend of that name we hold no abort of (its request may
        still be on the wire) is remembered as that name's, as before."""
        clock = FakeClock()
        store = MemoryStore(clock)
        token = _grant(clock)
        fp = token.refresh_fingerprint or ""
        old = _protocol(store, clock, "r1", token)
        old.memory.aborted("r1", 15, fp)
        new = _protocol(store, clock, "r1-1", token)
        new.carry_over(old, same_grant=True)
        new.on_notice(_sent(token, "r4", 16, retry=True))
        new.on_notice(_retry_abort(token, "r4", ("r1", 15)))
        assert fp not in new.memory.foreign
        assert not new.must_veto(_notice("spend", "r0", token))
        new.on_notice(_sent(token, "r4", 18, retry=True))
        new.on_notice(_retry_abort(token, "r4", ("r1", 17)))
        assert new.memory.foreign[fp][1] == "r1"
        assert new.memory.foreign_fences[fp] == ("r1", 17)

    def test_a_third_sender_keeps_it_nobodys(self) -> None:
        bystander, token, fp = _bystander("r0")
        bystander.on_notice(_sent(token, "r2", 1))
        bystander.on_notice(_sent(token, "r3", 3))
        bystander.on_notice(_sent(token, "r1", 4, retry=True))
        bystander.on_notice(_retry_abort(token, "r1", ("r2", 1)))
        assert bystander.memory.foreign[fp][1] is None  # r3's spend is as unknown as before
        assert bystander.must_veto(_notice("spend", "r2", token))

"""The refresher against a fake clock, a scripted token source and the in-memory store."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import cast

import pytest

from broker import events
from broker.errors import (
    NeedsAuthorization,
    PermanentTokenError,
    RateLimited,
    TokenUnavailable,
    TransientTokenError,
    UnreadableTokenSet,
)
from broker.fleetclock import FleetClock
from broker.metrics import Metrics
from broker.model import AppSpec, AppState, GrantType, RefreshPolicy, TokenSet
from broker.observe import Observer
from broker.refresher import AppRefresher
from broker.store import Lease, Notice, bound_name, client_binding
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock
from tests.support.fakes import FakeTokenSource

POLICY = RefreshPolicy(at_fraction=0.75, min_remaining=5, jitter=0.05, safety_margin=3)

MakeRefresher = Callable[..., AppRefresher]


@pytest.fixture
def store(fake_clock: FakeClock) -> MemoryStore:
    return MemoryStore(fake_clock)


@pytest.fixture
def source(fake_clock: FakeClock) -> FakeTokenSource:
    return FakeTokenSource(fake_clock, lifetime=60.0)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def running() -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def app_spec(grant: GrantType = GrantType.CLIENT_CREDENTIALS) -> AppSpec:
    """The app every refresher here serves."""
    return AppSpec(
        name="app1", token_url="http://127.0.0.1/token", grant_type=grant, refresh=POLICY
    )


def key(grant: GrantType = GrantType.CLIENT_CREDENTIALS) -> str:
    """The name the store knows app1's set by: the app and its client binding."""
    spec = app_spec(grant)
    return bound_name(spec.name, client_binding(spec, spec.client_id))


@pytest.fixture
def make(
    fake_clock: FakeClock,
    store: MemoryStore,
    metrics: Metrics,
    running: list[asyncio.Task[None]],
) -> MakeRefresher:
    def _make(
        src: FakeTokenSource,
        *,
        owner: str = "replica-1",
        grant: GrantType = GrantType.CLIENT_CREDENTIALS,
        start: bool = True,
        in_store: MemoryStore | None = None,
    ) -> AppRefresher:
        refresher = AppRefresher(
            app_spec(grant),
            src,
            in_store if in_store is not None else store,
            fake_clock,
            Observer(metrics),
            owner=owner,
            rng=random.Random(7),
        )
        if start:
            running.append(asyncio.create_task(refresher.run()))
        return refresher

    return _make


async def store_a_valid_set(store: MemoryStore, clock: FakeClock) -> TokenSet:
    """A set with 50 s left, stored as app1's (its first version)."""
    now = clock.time()
    stored = TokenSet("stored-access-token-000000000", "Bearer", now - 10, now + 50)
    assert (await store.commit(key(), stored)).version == 1
    return stored


async def served_token(refresher: AppRefresher, clock: FakeClock) -> TokenSet:
    token = await refresher.get()
    assert token.expires_at - clock.time() > 0, "served an expired token"
    return token


class TestStartup:
    async def test_first_token_is_fetched_at_startup(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """The loop fetches a token before any caller asks for one."""
        refresher = make(source)
        await fake_clock.settle()
        assert len(source.calls) == 1
        assert refresher.servable() is not None
        assert refresher.status().state is AppState.FRESH

    async def test_warm_start_uses_the_stored_token(
        self,
        make: MakeRefresher,
        source: FakeTokenSource,
        store: MemoryStore,
        fake_clock: FakeClock,
    ) -> None:
        """A valid token in the store is served without calling the token endpoint."""
        stored = await store_a_valid_set(store, fake_clock)
        refresher = make(source)
        await fake_clock.settle()
        assert source.calls == []
        assert (await refresher.get()).access_token == stored.access_token

    async def test_concurrent_callers_share_one_refresh(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """Callers arriving before the first token trigger no second request."""
        source.delay = 1.0
        refresher = make(source, start=False)
        getters = [asyncio.create_task(refresher.get()) for _ in range(10)]
        await fake_clock.advance(1.0)
        tokens = await asyncio.gather(*getters)
        assert len(source.calls) == 1
        assert len({t.access_token for t in tokens}) == 1


class TestRefreshCycle:
    async def test_refreshes_before_expiry_over_many_lifetimes(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """Over eight lifetimes every served token is valid and a new one arrives each cycle."""
        refresher = make(source)
        await fake_clock.settle()
        seen: set[str] = set()
        for _ in range(8 * 60):
            token = await served_token(refresher, fake_clock)
            assert token.expires_at - fake_clock.time() > POLICY.safety_margin
            seen.add(token.access_token)
            await fake_clock.advance(1.0)
        assert len(seen) >= 8
        # One refresh per ~0.75 lifetime: 480 s / 45 s ~ 10-11 fetches, not more.
        assert 9 <= len(source.calls) <= 13

    async def test_refresh_time_follows_policy(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """The second fetch happens at 0.75 of the lifetime, within the jitter."""
        make(source)
        await fake_clock.settle()
        start = fake_clock.time()
        while len(source.calls) < 2:
            await fake_clock.advance(0.5)
        elapsed = fake_clock.time() - start
        assert 45 - 3 - 0.5 <= elapsed <= 45 + 3 + 0.5


class TestFailures:
    async def test_transient_errors_keep_serving_the_valid_token(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """While the server answers 500, the current token is served until its margin, never after."""
        refresher = make(source)
        await fake_clock.settle()
        first = refresher.token
        assert first is not None
        source.failure = TransientTokenError("500", status=500)
        served_after_expiry = 0
        unavailable = 0
        for _ in range(120):
            try:
                token = await refresher.get()
                if token.expires_at <= fake_clock.time():
                    served_after_expiry += 1
            except TokenUnavailable as exc:
                unavailable += 1
                assert exc.retry_after >= 1
            await fake_clock.advance(1.0)
        assert served_after_expiry == 0
        assert unavailable > 0  # the token did run out
        assert refresher.status().state is AppState.FAILING
        source.failure = None
        await fake_clock.advance(61.0)
        assert refresher.servable() is not None
        assert refresher.status().state is AppState.FRESH

    async def test_backoff_grows_between_attempts(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """Consecutive transient failures are retried with growing, capped gaps."""
        source.failure = TransientTokenError("503", status=503)
        make(source)
        for _ in range(600):
            await fake_clock.advance(1.0)
        # 1, 2, 4, 8, 16, then 30 s gaps (jitter halves at most): 20-45 attempts in 10 min,
        # against 600 if every second were retried.
        assert 18 <= len(source.calls) <= 45

    async def test_retry_after_is_honoured(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """A 429 with Retry-After: 20 delays the next attempt by at least 20 s."""
        source.script.append(TransientTokenError("429", status=429, retry_after=20))
        make(source)
        await fake_clock.settle()
        assert len(source.calls) == 1
        await fake_clock.advance(19.0)
        assert len(source.calls) == 1
        await fake_clock.advance(2.0)
        assert len(source.calls) == 2

    async def test_permanent_error_stops_hammering(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """invalid_client is retried every few minutes, not every second."""
        source.failure = PermanentTokenError("invalid_client", status=401, error="invalid_client")
        refresher = make(source)
        for _ in range(3600):
            await fake_clock.advance(1.0)
        assert len(source.calls) <= 13
        assert refresher.last_error is not None and "invalid_client" in refresher.last_error
        with pytest.raises(TokenUnavailable):
            await refresher.get()


class TestShownState:
    """The state the API shows is settled when an attempt starts and ends, when a person is
    asked to authorize, and when a set from the store is adopted between attempts (a warm
    start, another replica's refresh): not recomputed at every look."""

    async def test_a_warm_started_app_shows_fresh_before_its_first_attempt(
        self,
        make: MakeRefresher,
        source: FakeTokenSource,
        store: MemoryStore,
        fake_clock: FakeClock,
    ) -> None:
        """A stored set adopted at start is served and shown fresh at once, not refreshing
        until the first attempt (a wait of most of a lifetime)."""
        await store_a_valid_set(store, fake_clock)
        refresher = make(source)
        await fake_clock.settle()
        assert refresher.servable() is not None and source.calls == []
        assert refresher.status().state is AppState.FRESH
        await fake_clock.advance(refresher.schedule.at - fake_clock.monotonic())
        assert len(source.calls) == 1
        assert refresher.status().state is AppState.FRESH

    async def test_a_set_adopted_between_attempts_shows_fresh(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """A failing app that adopts another replica's set from its notice shows fresh at
        once, with no error and no failure counted; its own next failure shows failing."""
        source.failure = TransientTokenError("503", status=503)
        refresher = make(source)
        await fake_clock.settle()
        assert refresher.status().state is AppState.FAILING
        now = fake_clock.time()
        newer = TokenSet("notice-access-token-00000000", "Bearer", now, now + 60, generation=2)
        refresher.on_notice(Notice(key(), "token", 1, newer.rank, token=newer))
        assert refresher.token is newer
        assert refresher.failures == 0 and refresher.last_error is None
        assert refresher.status().state is AppState.FRESH
        await fake_clock.advance(refresher.schedule.at - fake_clock.monotonic())
        assert refresher.status().state is AppState.FAILING
        source.failure = None
        await fake_clock.advance(refresher.schedule.at - fake_clock.monotonic())
        assert refresher.status().state is AppState.FRESH

    async def test_a_set_adopted_during_an_attempt_waits_for_its_end(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """While this replica's own attempt is in flight the state stays refreshing, though
        another replica's set comes in: the attempt's end settles it."""
        source.delay = 2.0
        refresher = make(source, start=False)
        attempt = asyncio.create_task(refresher.get())
        await fake_clock.advance(0.5)
        assert refresher.status().state is AppState.REFRESHING
        now = fake_clock.time()
        newer = TokenSet("notice-access-token-00000000", "Bearer", now, now + 60, generation=2)
        refresher.on_notice(Notice(key(), "token", 1, newer.rank, token=newer))
        assert refresher.status().state is AppState.REFRESHING
        await fake_clock.advance(2.0)
        await attempt
        assert refresher.status().state is AppState.FRESH


class TestCallerRequests:
    async def test_min_ttl_longer_than_lifetime_is_rejected(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """Asking for more time than a token ever has is a caller error."""
        refresher = make(source)
        await fake_clock.settle()
        with pytest.raises(ValueError, match="lifetime"):
            await refresher.get(min_ttl=61)

    async def test_min_ttl_refreshes_first(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """A token with too little left for min_ttl is replaced before answering."""
        refresher = make(source)
        await fake_clock.settle()
        await fake_clock.advance(30.0)
        token = await refresher.get(min_ttl=50)
        assert token.expires_at - fake_clock.time() >= 50
        assert len(source.calls) == 2

    async def test_forced_refresh_of_a_young_token_returns_it(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """A forced refresh within 5 s of issue answers with the current token."""
        refresher = make(source)
        await fake_clock.settle()
        before = refresher.token
        assert (await refresher.force()) is before
        assert len(source.calls) == 1

    async def test_forced_refreshes_are_rate_limited(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """The eleventh forced refresh within a minute is refused."""
        refresher = make(source)
        await fake_clock.settle()
        for _ in range(10):
            await fake_clock.advance(5.1)
            await refresher.force()
        await fake_clock.advance(5.1)
        with pytest.raises(RateLimited) as caught:
            await refresher.force()
        assert caught.value.retry_after > 0
        assert len(source.calls) == 11


class TestStore:
    async def test_refreshed_token_is_stored_with_a_version(
        self,
        make: MakeRefresher,
        source: FakeTokenSource,
        store: MemoryStore,
        fake_clock: FakeClock,
    ) -> None:
        """Every new token is written to the store (compare-and-set)."""
        refresher = make(source)
        await fake_clock.settle()
        stored = await store.load(key())
        assert stored is not None and refresher.token is not None
        assert stored.access_token == refresher.token.access_token
        assert stored.version == refresher.token.version >= 1

    async def test_keeps_refreshing_while_the_store_is_down_and_writes_back(
        self,
        make: MakeRefresher,
        source: FakeTokenSource,
        store: MemoryStore,
        fake_clock: FakeClock,
    ) -> None:
        """With the store down the broker refreshes alone, then catches the store up."""
        refresher = make(source)
        await fake_clock.settle()
        store.fail = True
        for _ in range(130):
            await served_token(refresher, fake_clock)
            await fake_clock.advance(1.0)
        assert len(source.calls) >= 3
        store.fail = False
        refresher.wake()
        await fake_clock.advance(1.0)
        stored = await store.load(key())
        assert stored is not None and refresher.token is not None
        assert stored.access_token == refresher.token.access_token

    async def test_two_replicas_refresh_once_per_lifetime(
        self, make: MakeRefresher, fake_clock: FakeClock
    ) -> None:
        """Two replicas sharing a store make about one request per cycle between them."""
        first = FakeTokenSource(fake_clock)
        second = FakeTokenSource(fake_clock)
        a = make(first, owner="a")
        await fake_clock.settle()
        b = make(second, owner="b")
        await fake_clock.settle()
        for _ in range(8 * 60):
            await served_token(a, fake_clock)
            await served_token(b, fake_clock)
            await fake_clock.advance(1.0)
        single = 11  # what one broker makes over the same time (see the cycle test)
        assert len(first.calls) + len(second.calls) <= single * 1.25

    async def test_a_waiter_without_notices_adopts_the_holders_set_soon(
        self, make: MakeRefresher, store: MemoryStore, fake_clock: FakeClock
    ) -> None:
        """A replica that finds the lease busy and hears no notice looks again within ~1 s."""
        first = FakeTokenSource(fake_clock, rotate=True)
        second = FakeTokenSource(fake_clock, rotate=True)
        first.delay = second.delay = 3.0  # a slow server: the lease stays busy 3 s or more
        await seed_grant(store, fake_clock)
        # No core runs here, so no notice reaches either replica: only the store tells.
        a = make(first, owner="a", grant=GrantType.AUTHORIZATION_CODE)
        b = make(second, owner="b", grant=GrantType.AUTHORIZATION_CODE)
        for _ in range(400):
            stored = await store.load(key(GrantType.AUTHORIZATION_CODE))
            if stored is not None and stored.generation > 1:
                break
            await fake_clock.advance(0.25)
        await fake_clock.advance(1.25)
        assert a.token is not None and b.token is not None
        assert a.token.generation == b.token.generation == 2
        assert len(first.calls) + len(second.calls) == 1


class TestLeaseNotices:
    """Issue 20, the fleet's cost: a replica that hears another's lease granted waits for that
    holder's notice instead of asking for the lease at the same due time (and every second)."""

    async def _due_while_another_holds_the_lease(
        self, make: MakeRefresher, store: CountingStore, fake_clock: FakeClock, deaf: bool
    ) -> tuple[AppRefresher, FakeTokenSource, TokenSet, asyncio.Task[None]]:
        source = FakeTokenSource(fake_clock)
        b = make(source, owner="b", in_store=store)
        await fake_clock.settle()
        assert b.token is not None and len(source.calls) == 1
        # b hears the channel (the core's watcher does this): with `deaf`, no token notice.
        updates = cast(AsyncGenerator[Notice, None], store.updates())

        async def hear() -> None:
            async for notice in updates:
                if not (deaf and notice.kind in ("token", "release")):
                    b.on_notice(notice)

        listener = asyncio.create_task(hear())
        await fake_clock.advance(b.schedule.at - fake_clock.monotonic() - 1.0)
        await store.acquire_lease(key(), "a", 12.0)  # a's grant is heard, 1 s before b is due
        await fake_clock.advance(5.0)
        now = fake_clock.time()
        newer = replace(
            b.token,
            access_token="newer-access-token-0000",
            generation=2,
            issued_at=now,
            expires_at=now + 60.0,
        )
        await store.commit(key(), newer)
        return b, source, newer, listener

    async def test_it_adopts_the_holders_commit_without_asking(
        self, make: MakeRefresher, fake_clock: FakeClock
    ) -> None:
        """Due while another replica holds the lease: no lease request, no token request; the
        set the holder's notice carries is adopted as it comes."""
        store = CountingStore(fake_clock)
        b, source, newer, listener = await self._due_while_another_holds_the_lease(
            make, store, fake_clock, deaf=False
        )
        await fake_clock.advance(1.0)
        listener.cancel()
        assert b.token is not None and b.token.rank == newer.rank
        assert store.lease_requests["b"] == 1  # its first token's only
        assert len(source.calls) == 1

    async def test_a_lost_commit_notice_is_read_by_the_leases_end(
        self, make: MakeRefresher, fake_clock: FakeClock
    ) -> None:
        """The holder's commit and release notices lost (pub/sub is at most once): the replica
        reads the store when the lease it waited on ends (sooner with little servable time),
        not at its 30 s look; it still asks for no lease the store's newer set makes needless."""
        store = CountingStore(fake_clock)
        b, source, newer, listener = await self._due_while_another_holds_the_lease(
            make, store, fake_clock, deaf=True
        )
        assert b.token is not None and b.token.rank < newer.rank
        await fake_clock.advance(7.5)  # the lease, granted 5 s ago for 12 s, has ended
        listener.cancel()
        assert b.token is not None and b.token.rank == newer.rank
        assert store.lease_requests["b"] == 1
        assert len(source.calls) == 1


class CountingStore(MemoryStore):
    """A MemoryStore that counts lease requests per owner."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.lease_requests: collections.Counter[str] = collections.Counter()

    async def acquire_lease(self, app: str, owner: str, ttl: float) -> Lease:
        self.lease_requests[owner] += 1
        return await super().acquire_lease(app, owner, ttl)


class UnreadableStore(MemoryStore):
    """A store whose set was written under a key this replica lacks, while `unreadable`."""

    unreadable = True

    async def load(self, app: str) -> TokenSet | None:
        stored = await super().load(app)
        if stored is not None and self.unreadable:
            raise UnreadableTokenSet(
                "written under unknown key id 'k2'", rank=stored.rank, version=stored.version
            )
        return stored


async def seed_grant(store: MemoryStore, clock: FakeClock) -> None:
    """Store an authorized token set, as `token-broker authorize` would."""
    now = clock.time()
    seed = TokenSet(
        "seed-access-000000000000",
        "Bearer",
        now,
        now + 60,
        None,
        "seed-refresh-0000000000",
        lineage=1,
        generation=1,
    )
    await store.commit(key(GrantType.AUTHORIZATION_CODE), seed)


class TestAuthorizationCode:
    async def test_without_a_stored_grant_the_app_needs_authorization(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """An authorization_code app with nothing stored asks for authorization, not the server."""
        refresher = make(source, grant=GrantType.AUTHORIZATION_CODE)
        await fake_clock.settle()
        assert source.calls == []
        assert refresher.state is AppState.NEEDS_AUTHORIZATION
        with pytest.raises(NeedsAuthorization):
            await refresher.get()

    async def test_rotated_refresh_token_is_stored_before_serving(
        self,
        make: MakeRefresher,
        store: MemoryStore,
        fake_clock: FakeClock,
    ) -> None:
        """Each refresh spends the newest refresh token, and the store holds the rotated one."""
        source = FakeTokenSource(fake_clock, rotate=True)
        await seed_grant(store, fake_clock)
        refresher = make(source, grant=GrantType.AUTHORIZATION_CODE)
        await fake_clock.settle()
        for _ in range(200):
            await fake_clock.advance(1.0)
        assert source.calls[0] == "seed-refresh-0000000000"
        assert len(set(source.calls)) == len(source.calls), "a refresh token was spent twice"
        stored = await store.load(key(GrantType.AUTHORIZATION_CODE))
        assert stored is not None and refresher.token is not None
        assert stored.refresh_token == refresher.token.refresh_token

    async def test_a_dpop_bound_refresh_is_proved_with_its_sets_key(
        self,
        make: MakeRefresher,
        store: MemoryStore,
        fake_clock: FakeClock,
    ) -> None:
        """The refresh of a DPoP-bound set names that set's key to the token source."""
        source = FakeTokenSource(fake_clock, rotate=True)
        now = fake_clock.time()
        bound = TokenSet(
            "seed-access-000000000000",
            "DPoP",
            now,
            now + 60,
            None,
            "seed-refresh-0000000000",
            lineage=1,
            generation=1,
            dpop_jkt="jkt-of-the-grant",
        )
        await store.commit(key(GrantType.AUTHORIZATION_CODE), bound)
        make(source, grant=GrantType.AUTHORIZATION_CODE)
        await fake_clock.settle()
        for _ in range(60):
            await fake_clock.advance(1.0)
        assert source.calls[0] == "seed-refresh-0000000000"
        assert source.dpop_jkts[0] == "jkt-of-the-grant"

    async def test_invalid_grant_enters_needs_authorization(
        self,
        make: MakeRefresher,
        store: MemoryStore,
        fake_clock: FakeClock,
    ) -> None:
        """A dead grant stops calls to the token endpoint until the app is authorized again."""
        source = FakeTokenSource(fake_clock, rotate=True)
        await seed_grant(store, fake_clock)
        source.failure = PermanentTokenError("invalid_grant", status=400, error="invalid_grant")
        refresher = make(source, grant=GrantType.AUTHORIZATION_CODE)
        for _ in range(600):
            await fake_clock.advance(1.0)
        assert refresher.state is AppState.NEEDS_AUTHORIZATION
        assert len(source.calls) == 1

    async def test_a_set_under_an_unknown_key_blocks_and_asks_no_one_to_authorize(
        self, make: MakeRefresher, fake_clock: FakeClock
    ) -> None:
        """Started without the key of the stored set: no spend, 503 (not 409), serves once readable."""
        source = FakeTokenSource(fake_clock, rotate=True)
        unreadable = UnreadableStore(fake_clock)
        await seed_grant(unreadable, fake_clock)
        refresher = make(source, grant=GrantType.AUTHORIZATION_CODE, in_store=unreadable)
        for _ in range(20):
            await fake_clock.advance(1.0)
        assert source.calls == []
        assert refresher.status().state is AppState.FAILING
        assert "refresh blocked" in (refresher.last_error or "")
        with pytest.raises(TokenUnavailable):
            await refresher.get()
        unreadable.unreadable = False
        await fake_clock.advance(6.0)
        await served_token(refresher, fake_clock)
        assert source.calls == []

    async def test_started_while_the_store_is_down_it_blocks_then_serves(
        self, make: MakeRefresher, store: MemoryStore, fake_clock: FakeClock
    ) -> None:
        """A store outage at start is not a missing grant: 503 until the stored set is read."""
        source = FakeTokenSource(fake_clock, rotate=True)
        await seed_grant(store, fake_clock)
        store.fail = True
        refresher = make(source, grant=GrantType.AUTHORIZATION_CODE)
        await fake_clock.advance(1.0)
        with pytest.raises(TokenUnavailable):
            await refresher.get()
        assert refresher.status().state is not AppState.NEEDS_AUTHORIZATION
        store.fail = False
        await fake_clock.advance(1.0)
        await served_token(refresher, fake_clock)
        assert source.calls == []

    async def test_a_lost_reply_turns_to_needs_authorization_when_the_token_runs_out(
        self,
        make: MakeRefresher,
        store: MemoryStore,
        fake_clock: FakeClock,
    ) -> None:
        """After an unknown outcome the valid token is served, then the state is needs_auth."""
        source = FakeTokenSource(fake_clock, rotate=True)
        await seed_grant(store, fake_clock)
        source.failure = TransientTokenError("reset", outcome_unknown=True)
        refresher = make(source, grant=GrantType.AUTHORIZATION_CODE)
        while not source.calls:
            await fake_clock.advance(1.0)
        assert refresher.status().state is AppState.FAILING
        await served_token(refresher, fake_clock)
        # The seed runs out at 60 s, and is not served in its last 3 s (the safety margin).
        while refresher.servable() is not None:
            await fake_clock.advance(0.5)
        await fake_clock.advance(0.5)
        assert refresher.status().state is AppState.NEEDS_AUTHORIZATION
        with pytest.raises(NeedsAuthorization):
            await refresher.get()
        assert len(source.calls) == 1


@pytest.mark.faults
class TestClockJumps:
    async def test_wall_clock_jumping_forward_never_serves_an_expired_token(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """After the wall clock jumps past expiry, the old token is not served; a new one is."""
        refresher = make(source)
        await fake_clock.settle()
        old = refresher.token
        assert old is not None
        fake_clock.jump_wall(120.0)
        token = await refresher.get()
        assert token is not old
        assert token.expires_at > fake_clock.time()

    async def test_wall_clock_jumping_back_does_not_stretch_a_token(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """After the wall clock steps back an hour, a token is still replaced on time."""
        refresher = make(source)
        await fake_clock.settle()
        first = refresher.token
        assert first is not None
        fake_clock.jump_wall(-3600.0)
        for _ in range(58):
            await fake_clock.advance(1.0)
            token = refresher.servable()
            # Never served past its real (monotonic) lifetime of 60 s minus the margin.
            assert token is not first or fake_clock.monotonic() < 1000.0 + 60 - POLICY.safety_margin
        assert refresher.token is not first
        assert len(source.calls) >= 2


class TestBackoffIsRespected:
    async def test_min_ttl_callers_do_not_bypass_the_backoff(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """While failing, a caller asking min_ttl gets 'unavailable', not a new token request."""
        refresher = make(source)
        await fake_clock.settle()
        source.failure = TransientTokenError("503", status=503)
        await fake_clock.advance(49.0)  # due at ~45 s: the refresh fails, a backoff starts
        assert refresher.failures >= 1
        calls = len(source.calls)
        for _ in range(20):
            with pytest.raises(TokenUnavailable):
                await refresher.get(min_ttl=30)
        assert len(source.calls) == calls


class TestServableUntil:
    async def test_servable_until_is_when_servable_turns_none(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """servable_until() is the monotonic time at which servable() stops answering a token."""
        refresher = make(source)
        await fake_clock.settle()
        source.failure = TransientTokenError("down", outcome_unknown=False)  # no new token
        until = refresher.servable_until()
        await fake_clock.advance(until - fake_clock.monotonic() - 0.01)
        assert refresher.servable() is not None
        await fake_clock.advance(0.02)
        assert refresher.servable() is None

    async def test_servable_until_follows_a_wall_clock_step(
        self, make: MakeRefresher, source: FakeTokenSource, fake_clock: FakeClock
    ) -> None:
        """After the wall clock steps forward, the deadline is earlier by the step."""
        refresher = make(source)
        await fake_clock.settle()
        before = refresher.servable_until()
        fake_clock.jump_wall(10.0)
        assert refresher.servable_until() == pytest.approx(before - 10.0)

    def test_no_token_no_deadline(self, make: MakeRefresher, source: FakeTokenSource) -> None:
        """Without a token the deadline is -inf."""
        assert make(source, start=False).servable_until() == float("-inf")


class ShiftedClock:
    """The fleet's frame as a pod keeps it: `base` shifted by `offset` (what it measured of the
    store's clock); `offset` changes when the store's clock steps or is measured again."""

    def __init__(self, base: FakeClock, offset: float = 0.0) -> None:
        self.base = base
        self.offset = offset

    def time(self) -> float:
        """The base clock's wall time plus the offset."""
        return self.base.time() + self.offset

    def monotonic(self) -> float:
        """The base clock's monotonic time."""
        return self.base.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the base clock."""
        await self.base.sleep(seconds)


class TestEveryClockMustAgree:
    """M3: a token is served only while the fleet's clock, the pod's own clock and the monotonic
    guard all allow it. The fake clock is true time and the pod's own clock unless said."""

    @contextlib.asynccontextmanager
    async def serving(
        self,
        store: MemoryStore,
        metrics: Metrics,
        stored: TokenSet,
        fleet: ShiftedClock,
        host: ShiftedClock,
    ) -> AsyncIterator[AppRefresher]:
        """A refresher on `fleet` and `host` clocks, started on `stored` (no new token can be
        had), once it has adopted it."""
        clock = fleet.base
        await store.commit(key(), stored)
        source = FakeTokenSource(clock, lifetime=60.0)
        source.failure = TransientTokenError("down", outcome_unknown=False)
        refresher = AppRefresher(
            app_spec(),
            source,
            store,
            fleet,
            Observer(metrics),
            owner="r",
            rng=random.Random(7),
            host_clock=host,
        )
        task = asyncio.create_task(refresher.run())
        try:
            await clock.settle()
            assert refresher.token is not None
            assert refresher.token.access_token == stored.access_token
            yield refresher
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @pytest.mark.parametrize(
        ("fleet_offset", "host_offset", "served"),
        [
            # A pod that starts after Redis's clock stepped back 40 s reads a set written
            # before the step: by the fleet's clock alone it has 40 s more; its own clock ends
            # it on time.
            pytest.param(-40.0, 0.0, 60.0 - POLICY.safety_margin, id="store-stepped-back"),
            # A pod whose own clock is 40 s behind stops on time by the fleet's clock.
            pytest.param(0.0, -40.0, 60.0 - POLICY.safety_margin, id="pod-behind"),
            # The price of agreeing: a pod whose own clock is 20 s ahead serves 20 s less.
            pytest.param(0.0, 20.0, 60.0 - POLICY.safety_margin - 20.0, id="pod-ahead"),
        ],
    )
    async def test_a_stored_token_is_served_until_the_earliest_clock_says_stop(
        self,
        store: MemoryStore,
        metrics: Metrics,
        fake_clock: FakeClock,
        fleet_offset: float,
        host_offset: float,
        served: float,
    ) -> None:
        """A set stored at true time: no clock behind stretches it, a pod's clock ahead
        shortens it by as much."""
        clock = fake_clock
        fleet, host = ShiftedClock(clock, fleet_offset), ShiftedClock(clock, host_offset)
        stored = TokenSet("at-stored", "Bearer", clock.time(), clock.time() + 60.0, None)
        async with self.serving(store, metrics, stored, fleet, host) as refresher:
            started = clock.monotonic()
            while refresher.servable() is not None and clock.monotonic() - started <= 200:
                await clock.advance(0.5)
            assert clock.monotonic() - started == pytest.approx(served, abs=0.5)

    async def test_a_set_stamped_ahead_lives_at_most_its_lifetime_from_adoption(
        self, store: MemoryStore, metrics: Metrics, fake_clock: FakeClock
    ) -> None:
        """A set stamped by a replica whose fleet clock ran 20 s ahead of Redis's (it looks
        issued 20 s in the future), read at once by a pod whose clocks are right: it was
        issued before it was read, so it is served its lifetime from then, not 20 s more."""
        clock = fake_clock
        ahead = TokenSet("at-ahead", "Bearer", clock.time() + 20.0, clock.time() + 80.0, None)
        fleet, host = ShiftedClock(clock), ShiftedClock(clock)
        async with self.serving(store, metrics, ahead, fleet, host) as refresher:
            assert refresher.remaining() == pytest.approx(60.0)

    async def test_a_reckoning_seen_once_holds_after_the_clock_steps_back(
        self, store: MemoryStore, metrics: Metrics, fake_clock: FakeClock
    ) -> None:
        """The pod's own clock is 40 s behind and it starts unmeasured (fleet time = its own):
        the token looks 40 s longer (here its lifetime from adoption caps that: it was just
        issued). The first measurement puts the fleet's clock right; then
        Redis's clock steps back 40 s. The deadline seen while the fleet's clock was right
        holds: the monotonic guard is re-derived from every reckoning, and only ever lowered."""
        fleet, host = ShiftedClock(fake_clock, -40.0), ShiftedClock(fake_clock, -40.0)
        clock = fake_clock
        stored = TokenSet("at-stored", "Bearer", clock.time(), clock.time() + 60.0, None)
        async with self.serving(store, metrics, stored, fleet, host) as refresher:
            started = clock.monotonic()
            # 100 s by both clocks, but never more than its lifetime from adoption.
            assert refresher.remaining() == pytest.approx(60.0)
            await clock.advance(10.0)
            fleet.offset = 0.0  # measured: the fleet's clock is right
            assert refresher.remaining() == pytest.approx(50.0)
            await clock.advance(10.0)
            fleet.offset = -40.0  # Redis's clock steps back
            assert refresher.remaining() == pytest.approx(40.0)
            while refresher.servable() is not None:
                await clock.advance(0.5)
            assert clock.monotonic() - started == pytest.approx(
                60.0 - POLICY.safety_margin, abs=0.5
            )


class SteppingServer:
    """Implements ServerClock: the true (fake) clock, plus any step the store's clock took."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.step = 0.0

    async def server_time(self) -> float:
        """The store's wall time."""
        return self.clock.time() + self.step


class TestLowerStoredExpiry:
    """M3: a replica whose fleet clock sees the store's clock step back lowers the stored set's
    expiry to its own deadline in the new frame (the fleet clock's, not the pod's own)."""

    async def test_a_jump_back_lowers_the_stored_expiry_retried_after_an_outage(
        self, store: MemoryStore, fake_clock: FakeClock
    ) -> None:
        """The store's clock steps back 20 s: the round that holds the jump finds the store
        down (nothing lowered, nothing lost); the next round, which takes the jump, lowers the
        stored expiry by the 20 s and no more, though the pod's own clock is 15 s ahead."""
        clock = fake_clock
        stored = TokenSet("at-stored", "Bearer", clock.time(), clock.time() + 60.0, None)
        await store.commit(key(), stored)
        server = SteppingServer(clock)
        fleet = FleetClock(clock)
        await fleet.measure(server)
        source = FakeTokenSource(clock, lifetime=60.0)
        source.failure = TransientTokenError("down", outcome_unknown=False)
        heard: list[events.Event] = []
        refresher = AppRefresher(
            app_spec(),
            source,
            store,
            fleet,
            heard.append,
            owner="r",
            rng=random.Random(7),
            host_clock=ShiftedClock(clock, 15.0),
        )
        task = asyncio.create_task(refresher.run())
        try:
            await clock.settle()
            assert refresher.token is not None and refresher.token.access_token == "at-stored"
            await clock.advance(10.0)
            server.step = -20.0
            store.fail = True
            assert await fleet.measure(server) == "held"
            await clock.settle()
            store.fail = False
            assert (await store.load(key())).expires_at == stored.expires_at  # type: ignore[union-attr]
            assert await fleet.measure(server) == "stepped"
            await clock.settle()
            lowered = await store.load(key())
            assert lowered is not None and lowered.rank == stored.rank
            assert lowered.expires_at == pytest.approx(stored.expires_at - 20.0, abs=0.01)
            assert [e.by for e in heard if isinstance(e, events.ExpiryLowered)] == [
                pytest.approx(20.0, abs=0.01)
            ]
            # Its own serving deadline did not move (its own clock is 15 s ahead: 35 s left).
            assert refresher.remaining() == pytest.approx(35.0, abs=0.01)
            assert await fleet.measure(server) == "smoothed"  # (nothing more to lower)
            await clock.settle()
            assert len([e for e in heard if isinstance(e, events.ExpiryLowered)]) == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await refresher.stop()

    @pytest.mark.parametrize("heard", [True, False], ids=["notice", "look"])
    async def test_a_bound_the_store_lost_is_asked_again_when_the_set_is_written_back(
        self, store: MemoryStore, fake_clock: FakeClock, heard: bool
    ) -> None:
        """Swarm seed 120513: the store's clock steps back 20 s while the set is evicted. The
        round that holds the jump finds no set to lower; the store's clock is put right and
        the next round drops the jump. A replica that never saw the step writes the set back,
        stamped in the frame before the step: a pod that measured the stepped clock reads it
        20 s too long. The replica that saw the step asks again for the bound it asked
        before, on the write-back's notice or at its next look at the store."""
        clock = fake_clock
        stored = TokenSet("at-stored", "Bearer", clock.time(), clock.time() + 60.0, None)
        await store.commit(key(), stored)
        server = SteppingServer(clock)
        fleet = FleetClock(clock)
        await fleet.measure(server)
        source = FakeTokenSource(clock, lifetime=60.0)
        source.failure = TransientTokenError("down", outcome_unknown=False)
        refresher = AppRefresher(
            app_spec(),
            source,
            store,
            fleet,
            lambda event: None,
            owner="r",
            rng=random.Random(7),
        )
        updates = cast(AsyncGenerator[Notice, None], store.updates())

        async def dispatch() -> None:
            try:
                async for notice in updates:
                    if heard:
                        refresher.on_notice(notice)
            finally:
                await updates.aclose()

        listener = asyncio.create_task(dispatch())
        task = asyncio.create_task(refresher.run())
        try:
            await clock.settle()
            assert refresher.token is not None and refresher.token.access_token == "at-stored"
            await clock.advance(10.0)
            del store.state.tokens[key()]  # (evicted)
            server.step = -20.0
            assert await fleet.measure(server) == "held"
            await clock.settle()
            server.step = 0.0
            assert await fleet.measure(server) == "smoothed"  # (the jump is dropped)
            await clock.settle()
            assert await store.load(key()) is None
            await store.commit(key(), stored)  # (another replica writes it back)
            await clock.settle()
            if not heard:
                back = await store.load(key())
                assert back is not None and back.expires_at == stored.expires_at
                refresher.take_lowered_expiry(back)  # (its look at the store)
                await clock.settle()
            lowered = await store.load(key())
            assert lowered is not None and lowered.rank == stored.rank
            assert lowered.expires_at == pytest.approx(stored.expires_at - 20.0, abs=0.01)
            # Its own deadline did not move: the jump back was not confirmed.
            assert refresher.remaining() == pytest.approx(50.0, abs=0.01)
        finally:
            task.cancel()
            listener.cancel()
            await asyncio.gather(task, listener, return_exceptions=True)
            await refresher.stop()


class TestLoweredExpiryAnnounced:
    """A replica that lowered the stored expiry announces it (LOWERED): a replica that holds the
    set takes it at once, counted on the store's own clock (`TIME`)."""

    async def started(
        self, store: MemoryStore, clock: FakeClock, host_offset: float
    ) -> tuple[AppRefresher, asyncio.Task[None], asyncio.Task[None]]:
        """A refresher on `store` (its token source down, its fleet clock measured against the
        store's), fed the store's notices."""
        fleet = FleetClock(clock)
        assert await fleet.measure(store) == "first"
        source = FakeTokenSource(clock, lifetime=120.0)
        source.failure = TransientTokenError("down", outcome_unknown=False)
        refresher = AppRefresher(
            app_spec(),
            source,
            store,
            fleet,
            lambda event: None,
            owner="r",
            rng=random.Random(7),
            host_clock=ShiftedClock(clock, host_offset),
        )
        updates = cast(AsyncGenerator[Notice, None], store.updates())

        async def dispatch() -> None:
            try:
                async for notice in updates:
                    refresher.on_notice(notice)
            finally:
                await updates.aclose()

        return refresher, asyncio.create_task(dispatch()), asyncio.create_task(refresher.run())

    async def test_a_holder_that_read_the_stamp_at_face_value_takes_it_at_once(
        self, fake_clock: FakeClock
    ) -> None:
        """Swarm seeds 68595 and 80253: a pod starts while Redis's clock is 20 s back, before
        any replica's round saw the step, its own clock 25 s behind: every clock it has says
        the set, stamped right, lives 20 s longer than it does. Another replica's round then
        sees the step and lowers the stored expiry; the pod takes it from the notice, not at
        its periodic look (30 s later, past the true expiry)."""
        clock = fake_clock
        stored = TokenSet("at-stored", "Bearer", clock.time() - 40.0, clock.time() + 80.0, None)
        store = MemoryStore(ShiftedClock(clock, -20.0))  # (Redis's clock: 20 s back)
        await store.commit(key(), stored)
        refresher, listener, task = await self.started(store, clock, -25.0)
        try:
            await clock.settle()
            assert refresher.token is not None and refresher.token.access_token == "at-stored"
            assert refresher.remaining() == pytest.approx(100.0, abs=0.01)  # (true: 80 s)
            await clock.advance(5.0)
            assert await store.lower_expiry(key(), stored, stored.expires_at - 20.0, owner="a")
            await clock.settle()
            assert refresher.remaining() == pytest.approx(75.0, abs=0.01)
        finally:
            task.cancel()
            listener.cancel()
            await asyncio.gather(task, listener, return_exceptions=True)
            await refresher.stop()

    async def test_a_holder_whose_round_has_not_seen_the_step_keeps_its_deadline(
        self, fake_clock: FakeClock
    ) -> None:
        """A replica that adopted the set before Redis's clock stepped back 20 s holds the
        right deadline; its round has not seen the step yet. The lowering (20 s, in the new
        frame) counted on its fleet clock, still in the old frame, would look 20 s earlier
        than it is, and its own lowering at its next round would write that back: counted on
        the store's clock it changes nothing."""
        clock = fake_clock
        redis = ShiftedClock(clock, 0.0)
        stored = TokenSet("at-stored", "Bearer", clock.time() - 40.0, clock.time() + 80.0, None)
        store = MemoryStore(redis)
        await store.commit(key(), stored)
        refresher, listener, task = await self.started(store, clock, 0.0)
        try:
            await clock.settle()
            assert refresher.remaining() == pytest.approx(80.0, abs=0.01)
            await clock.advance(5.0)
            redis.offset = -20.0  # Redis's clock steps back; another replica's round sees it
            assert await store.lower_expiry(key(), stored, stored.expires_at - 20.0, owner="a")
            await clock.settle()
            assert refresher.remaining() == pytest.approx(75.0, abs=0.01)
        finally:
            task.cancel()
            listener.cancel()
            await asyncio.gather(task, listener, return_exceptions=True)
            await refresher.stop()

    async def test_the_periodic_look_counts_the_bound_on_the_store_clock_too(
        self, fake_clock: FakeClock
    ) -> None:
        """The same holder finds the lowered expiry at its periodic look (no notice heard): it
        keeps its deadline too. Counted on its fleet clock, still in the frame before the
        step, it lost the step (and wrote that back at its next round: the fleet's token cut
        by the step once more for each such replica)."""
        clock = fake_clock
        redis = ShiftedClock(clock, 0.0)
        stored = TokenSet("at-stored", "Bearer", clock.time() - 40.0, clock.time() + 80.0, None)
        store = MemoryStore(redis)
        await store.commit(key(), stored)
        refresher, listener, task = await self.started(store, clock, 0.0)
        listener.cancel()  # (deaf: only its look at the store tells it)
        try:
            await clock.settle()
            await clock.advance(5.0)
            redis.offset = -20.0
            assert await store.lower_expiry(key(), stored, stored.expires_at - 20.0, owner="a")
            lowered = await store.load(key())
            assert lowered is not None
            refresher.take_lowered_expiry(lowered)
            await clock.settle()
            assert refresher.remaining() == pytest.approx(75.0, abs=0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, listener, return_exceptions=True)
            await refresher.stop()

"""Warm start after the access token expired: the stored refresh token is used, not forgotten."""

from __future__ import annotations

import asyncio
import random

from broker.metrics import Metrics
from broker.model import AppSpec, AppState, GrantType, RefreshPolicy, TokenSet
from broker.observe import Observer
from broker.refresher import AppRefresher
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock
from tests.support.fakes import FakeTokenSource

REFRESH_TOKEN = "stored-refresh-token-" + "r" * 24


async def test_expired_access_token_with_refresh_token_is_refreshed(
    fake_clock: FakeClock,
) -> None:
    """A broker started after the stored access token expired refreshes with the stored grant."""
    store = MemoryStore(fake_clock)
    now = fake_clock.time()
    expired = TokenSet(
        "old-access-" + "a" * 24,
        "Bearer",
        now - 120,
        now - 60,
        "scim",
        REFRESH_TOKEN,
        lineage=1,
        generation=1,
    )
    source = FakeTokenSource(fake_clock, rotate=True)
    spec = AppSpec(
        name="app1",
        token_url="http://127.0.0.1/token",
        grant_type=GrantType.AUTHORIZATION_CODE,
        authorize_url="http://127.0.0.1/authorize",
        redirect_uri="http://127.0.0.1/cb",
        refresh=RefreshPolicy(min_remaining=5, safety_margin=3),
    )
    refresher = AppRefresher(
        spec, source, store, fake_clock, Observer(Metrics()), owner="r1", rng=random.Random(1)
    )
    await store.commit(refresher.store_name, expired)
    task = asyncio.create_task(refresher.run())
    try:
        await fake_clock.advance(10.0)  # the spend's objection window passes on the fake clock
        token = await refresher.get()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert source.calls == [REFRESH_TOKEN]
    assert token.expires_at > fake_clock.time()
    assert refresher.state is not AppState.NEEDS_AUTHORIZATION

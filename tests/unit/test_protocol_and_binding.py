"""Protocol versions (issue 20, M5) and client bindings (M6) in the fleet protocol.

A replica never spends a set a newer protocol version stored, nor anything while it sees a
replica of a newer version in the fleet (notices, a busy lease), for `newer_protocol_for`;
it keeps serving and says why. A set's client binding names where the store keeps it.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from broker.fleet import Blocked, Fetched, FleetProtocol, Timing
from broker.model import PROTOCOL_VERSION, AppSpec, GrantType, TokenSet
from broker.store import Notice, bound_name, client_binding
from broker.store.memory import MemoryStore
from tests.support.fake_clock import FakeClock
from tests.support.fakes import (
    FLEET_APP,
    CurrentSet,
    FakeTokenSource,
    fleet_protocol,
    spendable_grant,
)

APP = FLEET_APP
NEWER = PROTOCOL_VERSION + 1


def _grant(clock: FakeClock) -> TokenSet:
    return spendable_grant(clock, "at-version-1", "rt-version-1", issued_ago=10, expires_in=50)


def _protocol(store: MemoryStore, clock: FakeClock, holder: CurrentSet) -> FleetProtocol:
    return fleet_protocol(store, clock, holder, timing=Timing(newer_protocol_for=300.0))


async def _refresh(fleet: FleetProtocol, clock: FakeClock, source: FakeTokenSource) -> object:
    task = asyncio.ensure_future(
        fleet.refresh(source.fetch, is_due=lambda token: True, servable_left=40.0)
    )
    for _ in range(100):
        if task.done():
            break
        await clock.advance(0.1)
    return task.result()


class TestNewerProtocol:
    async def test_a_newer_replicas_notice_stops_spending(self) -> None:
        """After a notice from a replica of a newer version, nothing is spent: Blocked, with a
        reason naming both versions; the refresh token is not presented."""
        clock = FakeClock()
        store = MemoryStore(clock)
        token = _grant(clock)
        await store.commit(APP, token)
        fleet = _protocol(store, clock, CurrentSet(token))
        fleet.on_notice(
            Notice(APP, "spend", rank=(1, 2), refresh_fp="x", owner="r9", protocol=NEWER)
        )
        source = FakeTokenSource(clock, rotate=True)
        outcome = await _refresh(fleet, clock, source)
        assert isinstance(outcome, Blocked)
        assert f"protocol version {NEWER}" in outcome.reason
        assert f"speaks version {PROTOCOL_VERSION}" in outcome.reason
        assert source.calls == []

    async def test_spending_resumes_when_the_newer_replica_is_gone(self) -> None:
        """The sign of a newer replica lapses after `newer_protocol_for` (a rollback removed
        it): the set of this version is spent again."""
        clock = FakeClock()
        store = MemoryStore(clock)
        token = _grant(clock)
        await store.commit(APP, token)
        fleet = _protocol(store, clock, CurrentSet(token))
        fleet.on_notice(Notice(APP, "token", rank=(0, 1), protocol=NEWER))
        await clock.advance(301.0)
        source = FakeTokenSource(clock, rotate=True)
        outcome = await _refresh(fleet, clock, source)
        assert isinstance(outcome, Fetched)
        assert source.calls == ["rt-version-1"]

    async def test_a_set_stored_by_a_newer_version_is_never_spent(self) -> None:
        """A set a newer version stored is served but not spent, however long ago it came."""
        clock = FakeClock()
        store = MemoryStore(clock)
        store.protocol = NEWER
        await store.commit(APP, _grant(clock))
        store.protocol = PROTOCOL_VERSION
        holder = CurrentSet(replace(_grant(clock), generation=1))
        fleet = _protocol(store, clock, holder)
        await fleet.sync()  # adopts the newer set (to serve it)
        assert holder.token is not None and holder.token.protocol == NEWER
        await clock.advance(1000.0)
        source = FakeTokenSource(clock, rotate=True)
        outcome = await _refresh(fleet, clock, source)
        assert isinstance(outcome, Blocked)
        assert "stored by a replica of fleet protocol version" in outcome.reason
        assert source.calls == []

    async def test_a_lease_held_by_a_newer_replica_is_noted(self) -> None:
        """A busy lease whose holder speaks a newer version stops the next spend too."""
        clock = FakeClock()
        store = MemoryStore(clock)
        token = _grant(clock)
        await store.commit(APP, token)
        store.protocol = NEWER
        await store.acquire_lease(APP, "r9", 5.0)
        store.protocol = PROTOCOL_VERSION
        fleet = _protocol(store, clock, CurrentSet(token))
        source = FakeTokenSource(clock, rotate=True)
        await _refresh(fleet, clock, source)  # busy
        await clock.advance(6.0)  # the newer replica's lease lapsed
        outcome = await _refresh(fleet, clock, source)
        assert isinstance(outcome, Blocked)
        assert source.calls == []

    async def test_a_newer_replica_announcing_during_the_objection_window(self) -> None:
        """A spend already announced is abandoned unsent when a newer replica's notice comes
        during its objection window."""
        clock = FakeClock()
        store = MemoryStore(clock)
        token = _grant(clock)
        await store.commit(APP, token)
        fleet = _protocol(store, clock, CurrentSet(token))
        source = FakeTokenSource(clock, rotate=True)
        task = asyncio.ensure_future(
            fleet.refresh(source.fetch, is_due=lambda t: True, servable_left=40.0)
        )
        for _ in range(100):
            if APP in store.state.spends:
                break
            await clock.advance(0.01)
        assert store.state.spends[APP].state == "announced"
        fleet.on_notice(
            Notice(APP, "spend", rank=(1, 2), refresh_fp="x", owner="r9", protocol=NEWER)
        )
        for _ in range(100):
            if task.done():
                break
            await clock.advance(0.1)
        assert isinstance(task.result(), Blocked)
        assert source.calls == []
        assert APP not in store.state.spends  # ended as aborted: nobody waits on it

    async def test_an_older_or_equal_version_changes_nothing(self) -> None:
        """Notices of this version (and sets without a version: 1) leave spending alone."""
        clock = FakeClock()
        store = MemoryStore(clock)
        token = _grant(clock)
        await store.commit(APP, token)
        fleet = _protocol(store, clock, CurrentSet(token))
        fleet.on_notice(Notice(APP, "token", rank=(0, 1), protocol=PROTOCOL_VERSION))
        fleet.on_notice(Notice.decode('{"app": "scim", "kind": "token"}') or Notice(APP, "x"))
        source = FakeTokenSource(clock, rotate=True)
        assert isinstance(await _refresh(fleet, clock, source), Fetched)


SPEC = AppSpec(
    name="app1",
    token_url="https://idp.example/token",
    grant_type=GrantType.AUTHORIZATION_CODE,
    client_id="client-a",
    scopes=("read", "write"),
    audience="https://api.example",
    extra_params={"resource": "https://api.example/v1"},
)


class TestClientBinding:
    @pytest.mark.parametrize(
        "changed",
        [
            {"token_url": "https://other.example/token"},
            {"grant_type": GrantType.CLIENT_CREDENTIALS},
            {"scopes": ("read",)},
            {"audience": "https://other.example"},
            {"extra_params": {"resource": "https://api.example/v2"}},
        ],
    )
    def test_each_setting_of_the_binding_changes_it(self, changed: dict[str, object]) -> None:
        """Token URL, grant, scopes, audience and resource each make another binding."""
        assert client_binding(replace(SPEC, **changed), "client-a") != client_binding(  # type: ignore[arg-type]
            SPEC, "client-a"
        )

    def test_the_client_id_changes_it(self) -> None:
        """Another client id (inline or read from its file) is another binding."""
        assert client_binding(SPEC, "client-b") != client_binding(SPEC, "client-a")

    def test_what_does_not_change_it(self) -> None:
        """Scope order, other extra parameters and the refresh policy are not the binding."""
        same = replace(
            SPEC,
            scopes=("write", "read"),
            extra_params={"resource": "https://api.example/v1", "x": "1"},
        )
        assert client_binding(same, "client-a") == client_binding(SPEC, "client-a")

    def test_the_store_name(self) -> None:
        """The store knows a set by `app@binding`: 16 hex digits, no secret in it."""
        name = bound_name("app1", client_binding(SPEC, "client-a"))
        app, _, binding = name.partition("@")
        assert app == "app1" and len(binding) == 16
        assert int(binding, 16) >= 0

"""The simulation catches the old protocol's doors: each test puts one back and expects a violation.

Issue 10 listed the ways the old refresher lost or double-spent a refresh token. Each mutation
below reintroduces one of them into the new protocol; the simulation must find a schedule that
breaks an invariant within a bounded number of seeds. A simulation that passes every mutant
would prove nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from broker.errors import TransientTokenError
from broker.fleet import Blocked, Fetch, Fetched, FleetProtocol, Outcome
from broker.model import TokenSet
from broker.refresher import AppRefresher
from tests.simulation.schedule import Result, make_schedule, run

# At most this many schedules (with a relevant fault) are tried per mutant.
BUDGET = 200


def first_violation(kinds: set[str], seeds: int = 5000) -> Result | None:
    """The first schedule with one of the fault `kinds` that breaks an invariant."""
    tried = 0
    for seed in range(seeds):
        schedule = make_schedule(seed)
        if not kinds & {fault.kind for fault in schedule.faults}:
            continue
        result = run(schedule)
        if not result.ok:
            return result
        tried += 1
        if tried >= BUDGET:
            return None
    return None


@pytest.fixture
def mutate(monkeypatch: pytest.MonkeyPatch) -> Callable[[object, str, object], None]:
    """Replace an attribute for one test (monkeypatch undoes it)."""

    def apply(target: object, name: str, value: object) -> None:
        monkeypatch.setattr(target, name, value)

    return apply


class TestTheSimulationFindsTheOldDoors:
    def test_spending_alone_when_the_store_is_unreachable(
        self, mutate: Callable[[object, str, object], None]
    ) -> None:
        """Door 1: a replica that cannot reach the store spends the refresh token alone."""
        original = FleetProtocol.refresh

        async def alone_when_blocked(self: FleetProtocol, fetch: Fetch, **kw: object) -> Outcome:
            outcome = await original(self, fetch, **kw)  # type: ignore[arg-type]
            current = self._current()
            if isinstance(outcome, Blocked) and current is not None and current.refresh_token:
                fresh = await fetch(current.refresh_token)
                token = replace(
                    fresh,
                    lineage=current.lineage,
                    generation=current.generation + 1,
                    refresh_token=fresh.refresh_token or current.refresh_token,
                )
                return Fetched(token, False, self._clock.monotonic())
            return outcome

        mutate(FleetProtocol, "refresh", alone_when_blocked)
        found = first_violation({"store_partition", "store_outage"})
        assert found is not None, "the simulation missed refreshing alone during an outage"

    def test_retrying_a_lost_reply_with_the_spent_token(
        self, mutate: Callable[[object, str, object], None]
    ) -> None:
        """Door 5: a reply lost after the server rotated is retried as a plain transient error."""
        original = FleetProtocol._fetch_within

        async def forget_unknown(
            self: FleetProtocol, fetch: Fetch, refresh_token: str | None, budget: float
        ) -> TokenSet:
            try:
                return await original(self, fetch, refresh_token, budget)
            except TransientTokenError as exc:
                raise TransientTokenError(str(exc)) from None

        mutate(FleetProtocol, "_fetch_within", forget_unknown)
        found = first_violation({"server_lossy"})
        assert found is not None, "the simulation missed a lost reply retried with a spent token"

    def test_never_repairing_a_store_that_forgot(
        self, mutate: Callable[[object, str, object], None]
    ) -> None:
        """Door 4: replicas holding a newer set never write it back after a rollback."""
        original = FleetProtocol.sync

        async def adopt_only(self: FleetProtocol) -> bool:
            current = self._current()
            stored = await self._store.load(self.app)
            if stored is not None and (current is None or stored.rank > current.rank):
                self._adopt(stored)
            return True

        mutate(FleetProtocol, "sync", adopt_only)
        assert original is not adopt_only
        found = first_violation({"rollback", "empty_restart"})
        assert found is not None, "the simulation missed a rollback that was never repaired"

    def test_shutdown_cancelling_a_spend_in_flight(
        self, mutate: Callable[[object, str, object], None]
    ) -> None:
        """Door 6: SIGTERM cancels the refresh in flight and drops the rotated token."""

        async def cancel_inflight(self: AppRefresher) -> None:
            self._stopping = True
            if self._inflight is not None:
                self._inflight.cancel()

        mutate(AppRefresher, "stop", cancel_inflight)
        found = first_violation({"sigterm"}, seeds=20000)
        assert found is not None, "the simulation missed a shutdown that drops a rotated token"

"""DPoP apps in the simulation (issue 23): the server binds the grant to the fleet's key and
refuses a refresh proved with another; the fleet protocol is unchanged, so every invariant
holds. DPoP is drawn from a stream of its own, so no earlier draw of any seed changed."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from broker.dpop import ProofKey, ProofKeys, generate_key
from broker.model import DpopAlgorithm, TokenSet
from tests.simulation import world as world_module
from tests.simulation.schedule import make_schedule, run

# sha256 over seeds 0 to 1,499 of every field make_schedule drew before DPoP, computed with
# main's make_schedule (a430a90) before this change.
DRAWS_BEFORE_DPOP = "405a9b84acc8f81f7a895fb53b8b81ec292cc2c77c5bfcca35d0134938e53f76"


def dpop_seeds(count: int, *, fault_free: bool | None = None) -> list[int]:
    """The first `count` seeds whose schedule has a DPoP app."""
    found = []
    for seed in range(1500):
        schedule = make_schedule(seed)
        if schedule.config.dpop and (fault_free is None or schedule.fault_free is fault_free):
            found.append(seed)
            if len(found) == count:
                break
    return found


def test_earlier_draws_are_unchanged() -> None:
    """Every field drawn before DPoP is what main drew, for all 1,500 CI seeds; about a
    quarter of the schedules have a DPoP app."""
    digest = hashlib.sha256()
    dpop = 0
    for seed in range(1500):
        schedule = make_schedule(seed)
        c = schedule.config
        fields = (c.replicas, c.lifetime, c.grace, c.offsets, c.policy)
        digest.update(
            repr((*fields, schedule.faults, schedule.duration, schedule.enabled)).encode()
        )
        dpop += c.dpop
    assert digest.hexdigest() == DRAWS_BEFORE_DPOP
    assert 300 < dpop < 450


@pytest.fixture
def proved_with(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str | None, str | None]]:
    """(the grant's key, the proof's key) of every refresh a DPoP server was sent."""
    keys: list[tuple[str | None, str | None]] = []
    original = world_module.SimAuthServer.refresh

    def refresh(self: Any, refresh_token: str, *args: Any) -> TokenSet:
        if self.dpop_jkt is not None:  # not the baseline's bearer world
            keys.append((self.dpop_jkt, args[2] if len(args) > 2 else None))
        return original(self, refresh_token, *args)

    monkeypatch.setattr(world_module.SimAuthServer, "refresh", refresh)
    return keys


@pytest.mark.parametrize("seed", dpop_seeds(2, fault_free=True) + dpop_seeds(4, fault_free=False))
def test_dpop_schedules_keep_every_invariant(
    seed: int, proved_with: list[tuple[str | None, str | None]]
) -> None:
    """A DPoP seed, with and without faults: every refresh proved with the fleet's key."""
    result = run(make_schedule(seed))
    assert result.ok, result.report()
    assert proved_with
    assert all(grant_key == proof_key for grant_key, proof_key in proved_with)


def own_key(self: Any, name_index: int) -> ProofKeys:
    """The design the fleet must not have: each replica makes its own key."""
    del self, name_index
    return ProofKeys((ProofKey(generate_key(DpopAlgorithm.ES256), DpopAlgorithm.ES256),))


def test_a_key_per_replica_never_sends_the_bound_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a key of its own, no replica holds the grant's key: none sends the refresh token
    (it would be refused), and the fleet waits for a person (invariant 5), nothing worse."""
    monkeypatch.setattr(world_module.World, "replica_dpop_keys", own_key)
    result = run(make_schedule(dpop_seeds(1, fault_free=True)[0]))
    assert not result.ok
    assert result.token_requests == 0
    assert all("invariant 5" in v for v in result.violations), result.report()


def test_a_refresh_proved_with_another_key_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys per replica and a client that ignores the set's key (proves with its own current
    one): the server refuses each refresh, and the schedule reports it."""
    monkeypatch.setattr(world_module.World, "replica_dpop_keys", own_key)
    monkeypatch.setattr(ProofKeys, "find", lambda self, jkt: self.current)
    result = run(make_schedule(dpop_seeds(1, fault_free=True)[0]))
    assert any("proved with a DPoP key" in v for v in result.violations), result.report()

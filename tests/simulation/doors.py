"""Named regression schedules: each door an adversarial review opened (issue 20), scripted.

Random seeds rarely draw these sequences: each needs faults at moments inside one spend (the
token on the wire, a replica replaced meanwhile). A door's script waits for those moments in
the simulated world and injects its faults then; `run(DOORS[name]())` checks the same
invariants as every seeded schedule. `python -m tests.simulation.doors NAME` replays one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from broker.store.memory import MemoryState
from tests.simulation.schedule import Schedule, run
from tests.simulation.world import World, WorldConfig

# How often a script looks at the world while it waits for a moment (simulated seconds).
POLL = 0.01


async def until(world: World, condition: Callable[[], object], limit: float = 600.0) -> None:
    """Wait on the world's clock until `condition()` is true (at most `limit` seconds)."""
    waited = 0.0
    while not condition():
        if waited >= limit:
            raise TimeoutError(f"the awaited moment did not come within {limit:.0f} s")
        await world.time.sleep(POLL)
        waited += POLL


def _index(world: World, name: str) -> int:
    return next(i for i, r in enumerate(world.replicas) if r.name == name)


def _replaced_pod_then_empty_store(replicas: int) -> Schedule:
    """C1: while r0's refresh token is on the wire (a 9 s server, inside the budget), another
    pod is replaced by one that never heard the `sent` notice, and Redis restarts empty; the
    others take 3 s to reconnect. The new pod writes its set back and spends the same refresh
    token unless someone objects in time."""

    async def script(world: World) -> None:
        world.server.faults.slow = 9.0
        await until(world, lambda: world.server.sends)
        spender = _index(world, world.server.sends[0][1])
        replaced = (spender + 1) % replicas
        await world.crash(replaced)
        world.start_replica(replaced)
        await until(world, lambda: world.replicas[replaced].refresher.token is not None)
        others = [i for i in range(replicas) if i != replaced]
        world.store.restore(MemoryState())
        world.restarts[0] += 1
        # Everyone else's reconnect after the restart takes a few seconds (backoff, DNS): more
        # than the short objection window.
        for index in others:
            world.replicas[index].view.faults.partitioned = True
        await world.time.sleep(3.0)
        for index in others:
            world.replicas[index].view.faults.partitioned = False
        await world.time.sleep(27.0)
        world.server.faults.slow = 0.0

    config = WorldConfig(replicas=replicas, lifetime=60.0, grace=0.0, offsets=[0.0] * replicas)
    return Schedule(
        seed=20_001,
        config=config,
        faults=(),
        duration=480.0,
        name=f"c1_replaced_pod_empty_restart_{replicas}",
        script=script,
        script_heals_by=120.0,
    )


def c1_replaced_pod_empty_restart_3() -> Schedule:
    """C1 with a bystander that heard the `sent` notice but re-subscribes too late to object
    within the short objection window."""
    return _replaced_pod_then_empty_store(3)


def c1_replaced_pod_empty_restart_2() -> Schedule:
    """C1 with no bystander: only the spender itself knows its token is on the wire."""
    return _replaced_pod_then_empty_store(2)


def h1_slow_answer_past_the_budget() -> Schedule:
    """H1: the server answers one refresh after 14 s (and acts on it), then is healthy: the
    spender must wait for the answer rather than abandon an intact grant at its 10 s budget."""

    async def script(world: World) -> None:
        world.server.faults.stall_next = 14.0

    config = WorldConfig(replicas=3, lifetime=60.0, grace=0.0, offsets=[0.0] * 3)
    return Schedule(
        seed=20_002,
        config=config,
        faults=(),
        duration=480.0,
        name="h1_slow_answer_past_the_budget",
        script=script,
        script_heals_by=120.0,
    )


DOORS: dict[str, Callable[[], Schedule]] = {
    "c1_replaced_pod_empty_restart_3": c1_replaced_pod_empty_restart_3,
    "c1_replaced_pod_empty_restart_2": c1_replaced_pod_empty_restart_2,
    "h1_slow_answer_past_the_budget": h1_slow_answer_past_the_budget,
}


if __name__ == "__main__":
    outcome = run(DOORS[sys.argv[1]]())
    print(outcome.report())
    sys.exit(0 if outcome.ok else 1)

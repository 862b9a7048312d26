"""The simulated loop's shortcuts (tests/simulation/world.py, SHORTCUTS) only save work: a seed
runs the same with them as without them (asyncio's way, a handle for every step), to the
simulated nanosecond and the last logged field.

The shortcuts: a reader of notices takes a heartbeat without being woken (`Inbox.heartbeat`),
a sleep's timer runs its task's step at once (`SimLoop._run_once`), a core's silence guard
whose wait ends only in another wait waits again without its task (`_guard_waits_again`), and
the arrivals of one notice at every subscriber run in one handle (`SimLoop.arrive_soon`). Each
is taken only where nothing could tell, and keeps every push and pop of the timer heap in the
same order (timers due at the same moment leave it in an order its shape decides).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog.testing

from tests.simulation import schedule as simulation
from tests.simulation import world as world_module
from tests.simulation.schedule import Schedule, legacy_schedule, make_schedule, run

# Swarm seeds whose faults reach the shortcuts' conditions: pauses (a frozen reader), half-open
# subscriptions, partitions, split brains, empty restarts, reloads, pods joining, crashes and
# SIGTERMs, late and lost writes; with 3 to 8 replicas and every token lifetime.
SWARM_SEEDS = [26, 51, 162, 250, 252, 271, 278, 281, 288]
LEGACY_SEEDS = [5, 914]  # regression seeds (tests/simulation/test_simulation.py)


def _recorded(schedule: Schedule, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run `schedule`; what happened: every presentation to the server with its exact time,
    the verdict and counts, the end time, and every event logged with its fields, in order."""
    worlds: list[world_module.World] = []
    logs: list[list[Any]] = []

    class Recorded(world_module.World):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            worlds.append(self)

    capture = structlog.testing.capture_logs

    @contextlib.contextmanager
    def recording() -> Iterator[list[Any]]:
        with capture() as captured:
            logs.append(captured)
            yield captured

    monkeypatch.setattr(simulation, "World", Recorded)
    monkeypatch.setattr(structlog.testing, "capture_logs", recording)
    result = run(schedule)
    world = worlds[-1]  # the schedule's own (a fault-free one first runs its baseline)
    return {
        "presentations": [
            (p.refresh_token, p.at, p.replica, p.outcome, p.reply_lost, p.lost_by)
            for p in world.server.presentations
        ],
        "violations": result.violations,
        "requests": result.token_requests,
        "announced": result.outcome_unknown_announced,
        "pairs": sorted(result.pairs),
        "aimed": result.aimed_fired,
        "end": world.time.now,
        "events": json.dumps(logs[-1], sort_keys=True, default=repr),
    }


@pytest.mark.parametrize(
    ("seed", "legacy"), [(s, False) for s in SWARM_SEEDS] + [(s, True) for s in LEGACY_SEEDS]
)
def test_the_loops_shortcuts_leave_every_run_as_it_was(
    seed: int, legacy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With and without the shortcuts, the seed's run is the same."""
    schedule = legacy_schedule(seed) if legacy else make_schedule(seed)
    monkeypatch.setattr(world_module, "SHORTCUTS", False)
    without = _recorded(schedule, monkeypatch)
    monkeypatch.setattr(world_module, "SHORTCUTS", True)
    with_them = _recorded(schedule, monkeypatch)
    assert without["presentations"], "the run refreshed nothing: it shows nothing"
    assert with_them == without


# Swarm seeds whose spender-aimed faults include a momentary one (scale_up) before a partition
# aimed at a later spender: they failed only after other seeds had run in the same process.
ID_SEEDS = [93084, 127482]


@pytest.mark.parametrize("seed", ID_SEEDS)
def test_a_run_does_not_depend_on_the_ids_of_its_faults(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault heals the connection it began on whatever id() its object has. A fault aimed at
    the spender is a copy that dies with its task, and CPython may give a later copy the same
    id: the harness once kept each fault's connection in a table keyed by id(fault), and a
    partition's heal then took a momentary fault's connection (never healed) instead of its
    own, so these seeds failed only after other seeds had run in the same process. Here every
    fault has the same id(), as such a reuse would give it; the run must be the same."""
    schedule = make_schedule(seed)
    alone = _recorded(schedule, monkeypatch)
    monkeypatch.setattr(
        simulation,
        "id",
        lambda value: 0 if isinstance(value, simulation.Fault) else id(value),
        raising=False,
    )
    reused = _recorded(schedule, monkeypatch)
    assert alone["presentations"], "the run refreshed nothing: it shows nothing"
    assert reused == alone

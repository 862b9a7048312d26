"""Run swarm seeds of one checkout's simulation and record, per seed, its cost and a digest.

    python bench/simulate_trace.py ROOT START COUNT [--facts]

ROOT is a checkout (this one, or another to compare with: `bench/simulate.py --baseline`).
Prints one JSON line per seed: the seed, its CPU seconds, its verdict (the violations) and a
digest of what happened (every presentation to the server with its time, replica and outcome,
the counts, the pair coverage) and one of the event names logged in order (`--facts`: what
the digest is of, to find where two checkouts part), so that two checkouts that should
behave alike can be compared seed by seed. Only the harness's public names are used, so an
older checkout runs too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def recorder(module: Any) -> Callable[[Any], dict[str, Any]]:
    """A function that runs one schedule of the simulation `module` (tests.simulation.schedule
    of some checkout) and returns what happened: the facts the digest is of (below), the
    result, the CPU seconds, and every event logged, in order (with its fields)."""
    import structlog.testing

    worlds: list[Any] = []
    logs: list[list[Any]] = []

    world_class: Any = module.__dict__["World"]

    class Recorded(world_class):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            worlds.append(self)

    capture = structlog.testing.capture_logs

    @contextlib.contextmanager
    def recording() -> Iterator[list[Any]]:
        with capture() as captured:
            logs.append(captured)
            yield captured

    module.__dict__["World"] = Recorded
    structlog.testing.capture_logs = recording  # type: ignore[assignment]

    def record(schedule: Any) -> dict[str, Any]:
        worlds.clear()
        logs.clear()
        started = time.process_time()
        result = module.run(schedule)
        seconds = time.process_time() - started
        world = worlds[-1]  # the schedule's own (a fault-free one first runs its baseline)
        trace = [
            (p.refresh_token, round(p.at, 9), p.replica, p.outcome, p.reply_lost, p.lost_by)
            for p in world.server.presentations
        ]
        facts = {
            "trace": trace,
            "violations": result.violations,
            "requests": result.token_requests,
            "announced": result.outcome_unknown_announced,
            "logged": result.outcome_unknown_logged,
            "lost": result.grant_lost_after_lost_reply,
            "pairs": sorted(result.pairs),
            "aimed": result.aimed_fired,
            "end": round(world.time.now, 9),
        }
        return {"facts": facts, "result": result, "cpu": seconds, "logs": logs[-1]}

    return record


def digest(value: object) -> str:
    """A short hash of `value` as JSON (anything not JSON as its repr)."""
    text = json.dumps(value, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main() -> int:
    """Run seeds START..START+COUNT-1 of the checkout at ROOT, one JSON line each."""
    root, start, count = Path(sys.argv[1]).resolve(), int(sys.argv[2]), int(sys.argv[3])
    sys.path.insert(0, str(root))

    from tests.simulation import schedule as module

    record = recorder(module)
    for seed in range(start, start + count):
        run = record(module.make_schedule(seed))
        facts, result = run["facts"], run["result"]
        # The same without any time: which tokens, by whom, with what outcome, in what order.
        story = {**facts, "trace": [(t[0], *t[2:]) for t in facts["trace"]], "end": None}
        names = [entry["event"] for entry in run["logs"]]
        line = {
            "seed": seed,
            "cpu": run["cpu"],
            "ok": not result.violations,
            "violations": result.violations,
            "digest": digest(facts),
            "story": digest(story),
            "events": hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16],
            **({"facts": facts} if "--facts" in sys.argv else {}),
        }
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

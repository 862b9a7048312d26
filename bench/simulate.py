"""Run many seeded fault schedules of the fleet simulation and print the counts.

    python bench/simulate.py --schedules 10000 [--start 0] [--workers 2]

Prints how many schedules ran, with which faults, how many broke an invariant (with their
seeds, to replay with `python -m tests.simulation.schedule SEED`), and the documented
unavoidable case (a grant lost after a lost reply, announced by grant.outcome_unknown).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.simulation.schedule import make_schedule, run


def _one(seed: int) -> tuple[int, list[str], list[str], int, bool, bool]:
    schedule = make_schedule(seed)
    result = run(schedule)
    return (
        seed,
        result.violations,
        [fault.kind for fault in schedule.faults],
        result.token_requests,
        result.grant_lost_after_lost_reply,
        schedule.fault_free,
    )


def main() -> int:
    """Run the schedules and print the counts; exit 1 when any invariant broke."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    started = time.monotonic()
    seeds = range(args.start, args.start + args.schedules)
    kinds: collections.Counter[str] = collections.Counter()
    invariants: collections.Counter[str] = collections.Counter()
    failing: list[int] = []
    lost = 0
    fault_free = 0
    requests = 0
    with multiprocessing.Pool(args.workers) as pool:
        for seed, violations, faults, token_requests, grant_lost, free in pool.imap_unordered(
            _one, seeds, chunksize=20
        ):
            kinds.update(set(faults))
            requests += token_requests
            fault_free += free
            lost += grant_lost
            if violations:
                failing.append(seed)
                invariants.update({v.split(":")[0] for v in violations})
    elapsed = time.monotonic() - started
    print(f"schedules: {args.schedules} (seeds {args.start}..{args.start + args.schedules - 1})")
    print(f"time: {elapsed:.0f} s ({elapsed / args.schedules * 1000:.0f} ms per schedule)")
    print(f"fault-free schedules: {fault_free}")
    print("schedules with each fault kind:")
    for kind, count in sorted(kinds.items()):
        print(f"  {kind:16} {count}")
    print(f"token requests in all: {requests}")
    print(f"grant lost after a lost reply (documented, announced): {lost}")
    print(f"schedules that broke an invariant: {len(failing)}")
    for name, count in sorted(invariants.items()):
        print(f"  {name}: {count}")
    if failing:
        print("failing seeds:", " ".join(str(s) for s in sorted(failing)[:50]))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())

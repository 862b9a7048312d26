"""Run many seeded fault schedules of the fleet simulation and print the counts.

    python bench/simulate.py --schedules 10000 [--start 0] [--workers 2]

Prints how many schedules ran, with which faults, how many broke an invariant (with their
seeds, to replay with `python -m tests.simulation.schedule SEED`), the documented
unavoidable case (a grant lost after a lost reply, announced by grant.outcome_unknown), and
the pair coverage: for every pair of fault kinds, in how many schedules both were active
inside one spend (and the pairs that never were).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.simulation.schedule import ALL_PAIRS, FAULT_KINDS, make_schedule, run

Outcome = tuple[int, list[str], list[str], int, bool, bool, set[tuple[str, str]], float]


def _one(seed: int) -> Outcome:
    started = time.process_time()
    schedule = make_schedule(seed)
    result = run(schedule)
    return (
        seed,
        result.violations,
        [fault.kind for fault in schedule.faults],
        result.token_requests,
        result.grant_lost_after_lost_reply,
        schedule.fault_free,
        result.pairs,
        time.process_time() - started,
    )


def _print_pairs(pairs: collections.Counter[tuple[str, str]]) -> None:
    """The pair-coverage table: row kind x column kind (by number), schedules with both."""
    print("pair coverage (schedules with both kinds active inside one spend):")
    for number, kind in enumerate(FAULT_KINDS):
        print(f"  {number:2} {kind}")
    print("     " + "".join(f"{n:>6}" for n in range(len(FAULT_KINDS))))
    for row, first in enumerate(FAULT_KINDS):
        cells = []
        for column, second in enumerate(FAULT_KINDS):
            if column >= row:
                cells.append(" " * 6)
            else:
                pair = (second, first) if (second, first) in ALL_PAIRS else (first, second)
                cells.append(f"{pairs[pair]:>6}")
        print(f"  {row:2} " + "".join(cells))
    never = sorted(ALL_PAIRS - set(pairs))
    print(f"pairs covered: {len(ALL_PAIRS) - len(never)} of {len(ALL_PAIRS)}")
    print(f"pairs never drawn inside a spend: {len(never)}")
    for pair in never:
        print(f"  {pair[0]} + {pair[1]}")


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
    pairs: collections.Counter[tuple[str, str]] = collections.Counter()
    lost = 0
    fault_free = 0
    requests = 0
    cpu = 0.0
    with multiprocessing.Pool(args.workers) as pool:
        for (
            seed,
            violations,
            faults,
            token_requests,
            grant_lost,
            free,
            met,
            seconds,
        ) in pool.imap_unordered(_one, seeds, chunksize=20):
            kinds.update(set(faults))
            pairs.update(met)
            cpu += seconds
            requests += token_requests
            fault_free += free
            lost += grant_lost
            if violations:
                failing.append(seed)
                invariants.update({v.split(":")[0] for v in violations})
    elapsed = time.monotonic() - started
    print(f"schedules: {args.schedules} (seeds {args.start}..{args.start + args.schedules - 1})")
    print(
        f"time: {elapsed:.0f} s ({elapsed / args.schedules * 1000:.0f} ms per schedule with "
        f"{args.workers} workers; {cpu / args.schedules * 1000:.0f} ms of CPU per schedule)"
    )
    print(f"fault-free schedules: {fault_free}")
    print("schedules with each fault kind:")
    for kind, count in sorted(kinds.items()):
        print(f"  {kind:24} {count}")
    print(f"token requests in all: {requests}")
    print(f"grant lost after a lost reply (documented, announced): {lost}")
    print(f"schedules that broke an invariant: {len(failing)}")
    for name, count in sorted(invariants.items()):
        print(f"  {name}: {count}")
    if failing:
        print("failing seeds:", " ".join(str(s) for s in sorted(failing)[:200]))
    _print_pairs(pairs)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())

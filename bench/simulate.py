"""Run many seeded fault schedules of the fleet simulation and print the counts.

    python bench/simulate.py --schedules 10000 [--start 0] [--workers 2]
    python bench/simulate.py --schedules 1500 --baseline /path/to/other/checkout
    python bench/simulate.py --schedules 3000 --digest FILE [--legacy] [--seeds 1,2,3]


Prints how many schedules ran, with which faults, how many broke an invariant (with their
seeds, to replay with `python -m tests.simulation.schedule SEED`), the documented
unavoidable case (a grant lost after a lost reply, announced by grant.outcome_unknown), and
the pair coverage: for every pair of fault kinds, in how many schedules both were active
inside one spend (and the pairs that never were). On stderr, a long run names each failing seed
as soon as it is found, and its progress every 5,000 schedules.

With --baseline, runs the same seeds in this checkout and in another one at the same time (one
worker each, so both see the same load) and prints the CPU per schedule of each (mean, p50,
p99, and their ratio), and every seed whose verdict, or digest of what happened (the server's
presentations with their times, the counts, the pairs), differs between them
(bench/simulate_trace.py).

With --digest FILE, also writes one JSON line per seed (sorted by seed) to FILE: its verdict and
a hash of everything the run recorded (the server's presentations with their times, the counts,
the pairs, the violations, and every event logged with its fields, in order), so that a change
meant to alter no behaviour is shown to by comparing two such files (`diff`). --legacy runs the
first generator's schedules (the regression seeds), --seeds a list of seeds instead of a range.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import multiprocessing.pool
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.simulate_trace import digest, recorder
from tests.simulation import schedule as simulation
from tests.simulation.schedule import (
    ALL_PAIRS,
    FAULT_KINDS,
    Schedule,
    legacy_schedule,
    make_schedule,
    run,
)

Outcome = tuple[
    int,
    list[str],
    list[str],
    int,
    bool,
    bool,
    set[tuple[str, str]],
    float,
    dict[str, object],
    bool,
    bool,
]

# How often a run reports its progress on stderr (failing seeds are reported as they come).
PROGRESS_EVERY = 5_000

# Set in each worker (`_setup`): how a seed becomes a schedule, and whether to digest its run.
_generate: Callable[[int], Schedule] = make_schedule
_record: Callable[[Schedule], dict[str, Any]] | None = None


def _setup(legacy: bool, digests: bool) -> None:
    global _generate, _record  # noqa: PLW0603 (a worker's settings, set once as it starts)
    _generate = legacy_schedule if legacy else make_schedule
    _record = recorder(simulation) if digests else None


def _one(seed: int) -> Outcome:
    started = time.process_time()
    schedule = _generate(seed)
    line: dict[str, object] = {}
    if _record is None:
        result = run(schedule)
    else:
        recorded = _record(schedule)
        result = recorded["result"]
        events = [dict(sorted(entry.items())) for entry in recorded["logs"]]
        line = {
            "seed": seed,
            "ok": not result.violations,
            "violations": result.violations,
            "digest": digest({"facts": recorded["facts"], "events": events}),
            "facts": digest(recorded["facts"]),
            "events": digest(events),
        }
    return (
        seed,
        result.violations,
        [fault.kind for fault in schedule.faults],
        result.token_requests,
        result.grant_lost_after_lost_reply,
        schedule.fault_free,
        result.pairs,
        time.process_time() - started,
        line,
        result.revoked_forgotten_while_alone or result.lost_evicted_while_alone,
        result.stranded_by_drain,
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


def _trace(root: Path, start: int, count: int, chunks: int) -> dict[int, dict[str, object]]:
    """Run seeds start..start+count-1 of checkout `root` in `chunks` processes one after the
    other (bench/simulate_trace.py); return each seed's line."""
    script = Path(__file__).resolve().parent / "simulate_trace.py"
    lines: dict[int, dict[str, object]] = {}
    size = -(-count // chunks)
    for first in range(start, start + count, size):
        out = subprocess.run(
            [
                sys.executable,
                str(script),
                str(root),
                str(first),
                str(min(size, start + count - first)),
            ],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for line in out.splitlines():
            entry = json.loads(line)
            lines[entry["seed"]] = entry
    return lines


def _costs(name: str, lines: dict[int, dict[str, object]]) -> list[float]:
    cpu = sorted(float(entry["cpu"]) * 1000 for entry in lines.values())  # type: ignore[arg-type]
    p99 = cpu[min(len(cpu) - 1, int(0.99 * len(cpu)))]
    print(
        f"{name:9} ms CPU per schedule: mean {statistics.fmean(cpu):6.1f}  "
        f"p50 {statistics.median(cpu):6.1f}  p99 {p99:6.1f}  (sum {sum(cpu) / 1000:.0f} s)"
    )
    return [statistics.fmean(cpu), statistics.median(cpu), p99]


def compare(baseline: Path, start: int, count: int) -> int:
    """This checkout against `baseline` over the same seeds: cost, verdicts, digests."""
    here = Path(__file__).resolve().parent.parent
    started = time.monotonic()
    with multiprocessing.pool.ThreadPool(2) as pool:
        old, new = pool.starmap(
            _trace, [(baseline.resolve(), start, count, 10), (here, start, count, 10)]
        )
    print(
        f"seeds {start}..{start + count - 1}, both checkouts at once: "
        f"{time.monotonic() - started:.0f} s"
    )
    before = _costs("baseline", old)
    after = _costs("this", new)
    print(
        "ratio     baseline/this: "
        + "  ".join(
            f"{name} {b / a:.1f}x"
            for name, b, a in zip(("mean", "p50", "p99"), before, after, strict=True)
        )
    )
    verdicts = [s for s in old if old[s]["ok"] != new[s]["ok"]]
    violations = [s for s in old if old[s]["violations"] != new[s]["violations"]]
    digests = [s for s in old if old[s]["digest"] != new[s]["digest"]]
    stories = [s for s in old if old[s].get("story") != new[s].get("story")]
    events = [s for s in old if old[s]["events"] != new[s]["events"]]
    for name, lines in (("baseline", old), ("this", new)):
        failing = sorted(s for s in lines if not lines[s]["ok"])
        print(f"failing seeds ({name}): {len(failing)}: {' '.join(map(str, failing))}")
    print(f"seeds whose verdict differs: {len(verdicts)} {verdicts[:50]}")
    print(f"seeds whose violations differ: {len(violations)} {violations[:50]}")
    print(
        f"seeds whose digest (presentations with their times, counts, pairs) differs: "
        f"{len(digests)} {digests[:50]}"
    )
    print(
        f"seeds whose presentations, counts or pairs differ (times aside): "
        f"{len(stories)} {stories[:50]}"
    )
    print(f"seeds whose logged events differ: {len(events)} {events[:50]}")
    return 1 if verdicts or violations else 0


def main() -> int:
    """Run the schedules and print the counts; exit 1 when any invariant broke."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--digest", type=Path, help="write each seed's digest to this file")
    parser.add_argument("--legacy", action="store_true", help="the first generator's schedules")
    parser.add_argument("--seeds", help="these seeds (comma-separated) instead of a range")
    args = parser.parse_args()
    if args.baseline is not None:
        return compare(args.baseline, args.start, args.schedules)
    started = time.monotonic()
    seeds: Sequence[int] = range(args.start, args.start + args.schedules)
    if args.seeds:
        seeds = [int(seed) for seed in args.seeds.split(",")]
        args.schedules = len(seeds)
    lines: list[dict[str, object]] = []
    kinds: collections.Counter[str] = collections.Counter()
    invariants: collections.Counter[str] = collections.Counter()
    failing: list[int] = []
    excused: list[int] = []
    stranded: list[int] = []
    pairs: collections.Counter[tuple[str, str]] = collections.Counter()
    lost = 0
    fault_free = 0
    requests = 0
    done = 0
    cpu = 0.0
    with multiprocessing.Pool(
        args.workers, initializer=_setup, initargs=(args.legacy, args.digest is not None)
    ) as pool:
        for (
            seed,
            violations,
            faults,
            token_requests,
            grant_lost,
            free,
            met,
            seconds,
            line,
            forgotten_alone,
            stranded_by_drain,
        ) in pool.imap_unordered(_one, seeds, chunksize=20):
            if line:
                lines.append(line)
            kinds.update(set(faults))
            pairs.update(met)
            cpu += seconds
            requests += token_requests
            fault_free += free
            lost += grant_lost
            if forgotten_alone:
                excused.append(seed)
            if stranded_by_drain:
                stranded.append(seed)
            if violations:
                failing.append(seed)
                invariants.update({v.split(":")[0] for v in violations})
                # As soon as found: a long run's failing seeds can be replayed before it ends.
                print(f"failing seed {seed}: {violations[0][:160]}", file=sys.stderr, flush=True)
            done += 1
            if done % PROGRESS_EVERY == 0:
                print(
                    f"{done} of {args.schedules} schedules, {time.monotonic() - started:.0f} s, "
                    f"{len(failing)} failing, {len(excused)} excused",
                    file=sys.stderr,
                    flush=True,
                )
    elapsed = time.monotonic() - started
    if args.digest is not None:
        with args.digest.open("w") as out:
            for line in sorted(lines, key=lambda line: int(line["seed"])):  # type: ignore[call-overload]
                out.write(json.dumps(line) + "\n")
    if args.seeds:
        print(f"schedules: {args.schedules} (seeds {args.seeds})")
    else:
        print(
            f"schedules: {args.schedules} (seeds {args.start}..{args.start + args.schedules - 1})"
        )
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
    # The documented limit (README, "What a crash can lose"): revoked after the store forgot
    # a `sent` record while every replica that knew could not speak, or lost after it evicted
    # the newest set while no running process held it; announced, not failing.
    print(
        f"revoked or lost by the documented limit (excused): {len(excused)}"
        + (": " + " ".join(str(s) for s in sorted(excused)) if excused else "")
    )
    # The drain's limit (README, "What a crash can lose"): a `sent` record of a spend never
    # sent outlived its spender's drain, cut off from the store; the grant intact, announced.
    print(
        f"stopped by the drain's limit (excused): {len(stranded)}"
        + (": " + " ".join(str(s) for s in sorted(stranded)) if stranded else "")
    )
    print(f"schedules that broke an invariant: {len(failing)}")
    for name, count in sorted(invariants.items()):
        print(f"  {name}: {count}")
    if failing:
        print("failing seeds:", " ".join(str(s) for s in sorted(failing)[:200]))
    _print_pairs(pairs)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())

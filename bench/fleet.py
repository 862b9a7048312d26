"""Fleet benchmark: token-endpoint requests per lifetime for 1, 8 and 20 replicas.

Run: `python bench/fleet.py [--sizes 8,20] [--lifetime 6] [--lifetimes 8] [--skew 5] [--down 3]
[--only fair,skew,rotating,down,ready]`.

Four scenarios, each with one broker (the baseline) and fleets of each size running at the
same time, every fleet with its own OAuth server and Redis, so all of them see the same
schedule and the same machine load:

- fair weather: requests per lifetime in steady state;
- skewed clocks: a third of each fleet's replicas 5 s ahead, a third 5 s behind (libfaketime);
- rotating grant: fair weather for an authorization-code grant onboarded with `token-broker
  authorize`, whose refresh token the OAuth server rotates on every use, refreshed at half its
  life (`ROTATING_AT`) so that the protocol's objection window fits a short token;
- endpoint down: the token endpoint answers 503 for `--down` lifetimes (past the tokens'
  expiry), then recovers; requests per lifetime over the whole schedule, the requests refused
  while it was down, and how soon after recovery each fleet had a token.

Last, one more replica starts against a warm Redis and is timed to /readyz.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.fleet import (
    Fleet,
    FleetRun,
    RunSpec,
    requests_per_lifetime,
    requests_since,
    side_by_side,
)
from tests.support.oauth_server import OAuthTestServer, Scripted
from tests.support.redis_server import RedisServer
from tests.support.skew import skewed_env

# Where in its life the rotating grant is refreshed: the spend first waits out the objection
# window (0.5 s, a quarter of the servable time left when that is shorter), which at the default
# 0.75 of a 6 s token leaves under half a second for the request itself.
ROTATING_AT = 0.5
SCENARIOS = ("fair", "skew", "rotating", "down", "ready")


def specs(sizes: list[int], skew: float = 0.0) -> list[RunSpec]:
    """The baseline broker and one fleet per size; with `skew`, thirds of each fleet skewed."""
    runs = [RunSpec("1", 1)]
    for size in sizes:
        envs: list[Mapping[str, str] | None] = []
        for i in range(size):
            shift = (0.0, skew, -skew)[i % 3]
            envs.append(skewed_env(shift) if shift else None)
        runs.append(RunSpec(str(size), size, envs))
    return runs


async def poll_all(runs: Mapping[str, FleetRun], seconds: float) -> dict[str, tuple[int, int]]:
    """Poll every fleet at once for `seconds`: (expired tokens served, 503s) per fleet."""
    stats = await asyncio.gather(*(run.poll(seconds, 0.25) for run in runs.values()))
    return {name: (s.expired, s.unavailable) for name, s in zip(runs, stats, strict=True)}


async def steady(
    root: Path, args: argparse.Namespace, skew: float, rotating: bool = False
) -> dict[str, Any]:
    """Fair weather (or skewed clocks, or a rotating grant): steady-state requests per lifetime."""
    policy = {"at_fraction": ROTATING_AT} if rotating else None
    async with side_by_side(root, args.lifetime, specs(args.sizes, skew), rotating=policy) as runs:
        if rotating:
            # The onboarded set was issued before the replicas started: start counting once
            # every run refreshes on its own schedule.
            await poll_all(runs, args.lifetime)
        since = time.time()
        served = await poll_all(runs, args.lifetime * args.lifetimes)
        times = {name: requests_since(run.oauth, since) for name, run in runs.items()}
    rates = {name: requests_per_lifetime(t, args.lifetime) for name, t in times.items()}
    return {
        name: {
            "requests": len(times[name]),
            "per_lifetime": round(rates[name], 3),
            "over_one_broker": round(rates[name] / rates["1"], 3),
            "expired_served": served[name][0],
            "503s": served[name][1],
        }
        for name in runs
    }


async def outage(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Endpoint down past expiry, then back: requests per lifetime over the whole schedule.

    Beside the whole schedule's count (the issue's measure), the requests the endpoint refused
    (what backing off costs, free of where each fleet's first refresh after recovery falls) and
    how long after recovery each fleet got its first token.
    """
    recover = args.lifetime * 4
    async with side_by_side(root, args.lifetime, specs(args.sizes)) as runs:
        await poll_all(runs, args.lifetime)
        since = time.time()
        for run in runs.values():
            run.oauth.mode = Scripted(status=503)
        during = await poll_all(runs, args.lifetime * args.down)
        up = time.time()
        for run in runs.values():
            run.oauth.mode = None
        after = await poll_all(runs, recover)
        requests = {
            name: [r for r in run.oauth.requests if r.at >= since] for name, run in runs.items()
        }
    counts = {name: len(r) for name, r in requests.items()}
    refused = {name: sum(1 for r in rs if r.status == 503) for name, rs in requests.items()}
    back: dict[str, float | None] = {}
    for name, rs in requests.items():
        tokens = [r.at - up for r in rs if r.status == 200]
        back[name] = round(min(tokens), 2) if tokens else None
    lifetimes = (args.lifetime * args.down + recover) / args.lifetime
    return {
        name: {
            "requests": counts[name],
            "per_lifetime": round(counts[name] / lifetimes, 3),
            "over_one_broker": round(counts[name] / counts["1"], 3),
            "refused": refused[name],
            "refused_over_one_broker": round(refused[name] / max(1, refused["1"]), 3),
            "first_token_after_recovery_s": back[name],
            "expired_served": during[name][0] + after[name][0],
        }
        for name in runs
    }


async def time_to_ready(root: Path) -> tuple[float, int]:
    """Seconds from starting one more replica (warm Redis) to /readyz 200, and its requests."""
    redis = RedisServer(directory=root / "redis")
    oauth = OAuthTestServer(lifetime=3600)
    await oauth.start()
    redis.start()
    try:
        warm = Fleet(root / "warm", oauth.token_url, redis.url, 1)
        await warm.start()
        warm.stop()
        before = oauth.count()
        fleet = Fleet(root / "new", oauth.token_url, redis.url, 1)
        replica = fleet.replicas[0]
        started = time.monotonic()
        replica.process.start()
        try:
            await replica.process.wait_ready(replica.files.metrics)
            return time.monotonic() - started, oauth.count() - before
        finally:
            fleet.stop()
    finally:
        await oauth.stop()
        redis.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every scenario; returns the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        figures: dict[str, Any] = {
            "lifetime_s": args.lifetime,
            "lifetimes": args.lifetimes,
            "skew_s": args.skew,
            "down_lifetimes": args.down,
        }
        if "fair" in args.only:
            figures["fair_weather"] = await steady(root / "fair", args, 0.0)
        if "skew" in args.only:
            figures["skewed_clocks"] = await steady(root / "skew", args, args.skew)
        if "rotating" in args.only:
            figures["rotating_grant"] = await steady(root / "rotating", args, 0.0, rotating=True)
        if "down" in args.only:
            figures["endpoint_down"] = await outage(root / "down", args)
        if "ready" in args.only:
            ready, requests = await time_to_ready(root / "ready")
            figures["new_replica_ready_s"] = round(ready, 3)
            figures["new_replica_token_requests"] = requests
    return figures


def main() -> int:
    """Parse arguments, run, print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="8,20", help="fleet sizes beside the one broker")
    parser.add_argument("--lifetime", type=float, default=6.0, help="token lifetime, seconds")
    parser.add_argument("--lifetimes", type=int, default=8, help="lifetimes per steady phase")
    parser.add_argument("--skew", type=float, default=5.0, help="clock skew, seconds")
    parser.add_argument("--down", type=float, default=3.0, help="outage, in lifetimes")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios to run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.only = set(args.only.split(","))
    if not args.only <= set(SCENARIOS):
        parser.error(f"--only: unknown scenario; choose from {','.join(SCENARIOS)}")
    figures = asyncio.run(run(args))
    if args.json:
        print(json.dumps(figures))
        return 0
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for name, row in value.items():
                cells = "  ".join(f"{k} {v}" for k, v in row.items())
                print(f"  {name:>3} replicas  {cells}")
        else:
            print(f"{key:28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

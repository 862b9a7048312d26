"""Fleet benchmark: token-endpoint requests per app per lifetime, one broker vs N replicas.

Run: `python bench/fleet.py [--replicas 20] [--lifetime 4] [--lifetimes 6]`. Starts a real
redis-server and a local OAuth server, runs one broker, then N broker processes sharing the
Redis, and counts token requests per token lifetime in each phase (same lifetime, same length,
same run). Last, it starts one more replica against the warm Redis and times it to /readyz.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.fleet import Fleet
from tests.support.oauth_server import OAuthTestServer
from tests.support.redis_server import RedisServer


async def phase(
    root: Path, oauth: OAuthTestServer, redis_url: str, replicas: int, seconds: float
) -> tuple[int, int, int]:
    """Run `replicas` brokers for `seconds` under polling: (token requests, expired, 503s)."""
    fleet = Fleet(root, oauth.token_url, redis_url, replicas)
    await fleet.start()
    try:
        before = oauth.count()
        stats = await fleet.poll(oauth, seconds, interval=0.25)
        return oauth.count() - before, stats.expired, stats.unavailable
    finally:
        fleet.stop()


async def time_to_ready(root: Path, oauth: OAuthTestServer, redis_url: str) -> float:
    """Seconds from starting one more replica (warm Redis) to its /readyz answering 200."""
    fleet = Fleet(root, oauth.token_url, redis_url, 1)
    replica = fleet.replicas[0]
    started = time.monotonic()
    replica.process.start()
    try:
        await replica.process.wait_ready(replica.files.metrics)
        return time.monotonic() - started
    finally:
        fleet.stop()


async def run(args: argparse.Namespace) -> dict[str, float]:
    """All phases; returns the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        redis = RedisServer(directory=root / "redis")
        redis.start()
        oauth = OAuthTestServer()
        oauth.lifetime = args.lifetime
        await oauth.start()
        try:
            seconds = args.lifetime * args.lifetimes
            single, single_expired, _ = await phase(root / "single", oauth, redis.url, 1, seconds)
            fleet, fleet_expired, fleet_503 = await phase(
                root / "fleet", oauth, redis.url, args.replicas, seconds
            )
            # Keep the store warm with a long-lived token, then time a new replica.
            oauth.lifetime = 3600
            warm = Fleet(root / "warm", oauth.token_url, redis.url, 1)
            await warm.start()
            warm.stop()
            requests_before = oauth.count()
            ready = await time_to_ready(root / "new", oauth, redis.url)
            warm_requests = oauth.count() - requests_before
        finally:
            await oauth.stop()
            redis.stop()
    return {
        "replicas": args.replicas,
        "lifetime_s": args.lifetime,
        "lifetimes": args.lifetimes,
        "single_requests_per_lifetime": round(single / args.lifetimes, 2),
        "fleet_requests_per_lifetime": round(fleet / args.lifetimes, 2),
        "fleet_over_single": round(fleet / single, 3) if single else float("nan"),
        "expired_served": single_expired + fleet_expired,
        "fleet_503s": fleet_503,
        "new_replica_ready_s": round(ready, 3),
        "new_replica_token_requests": warm_requests,
    }


def main() -> int:
    """Parse arguments, run, print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=20)
    parser.add_argument("--lifetime", type=float, default=4.0)
    parser.add_argument("--lifetimes", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:32} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

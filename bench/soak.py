"""Soak: a broker under load for N minutes with short token lifetimes and injected faults.

Run: `python bench/soak.py [--minutes 10]`. A real redis-server and a local OAuth server (which
rotates refresh tokens and revokes a grant whose old refresh token is reused) serve one broker
process with two apps: client credentials and authorization code. Callers hammer both apps
while a fault schedule repeats: token endpoint 500s, 429 with Retry-After, Redis killed and
restarted empty, a slow token endpoint. The report: requests served, errors, refreshes,
expired tokens served (must be 0), refresh tokens lost (must be 0), memory over time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from broker.authorize import authorization_request, exchange_and_store
from broker.config import load_config
from broker.credentials import Credentials
from tests.support.broker_process import BrokerFiles, BrokerProcess
from tests.support.oauth_server import OAuthTestServer, Scripted
from tests.support.redis_server import RedisServer

LIFETIME = 5.0


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Counters:
    """What the callers saw."""

    def __init__(self) -> None:
        self.ok = 0
        self.unavailable = 0
        self.errors: dict[str, int] = {}
        self.expired = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def caller(
    files: BrokerFiles, oauth: OAuthTestServer, app: str, stop: asyncio.Event, c: Counters
) -> None:
    """One caller asking for `app`'s token in a loop, checking each answer against the server."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            try:
                async with session.get(f"{files.api}/v1/token/{app}", headers=files.auth) as r:
                    body = await r.json()
                    if r.status == 200:
                        c.ok += 1
                        if oauth.expiry[body["access_token"]] <= time.time():
                            c.expired += 1
                    elif r.status == 503:
                        c.unavailable += 1
                    else:
                        c.error(str(r.status))
            except aiohttp.ClientError as exc:
                c.error(type(exc).__name__)
            await asyncio.sleep(0.005)


async def faults(
    oauth: OAuthTestServer, redis: RedisServer, stop: asyncio.Event, log: list[str]
) -> None:
    """The fault schedule, repeated every 60 s."""

    async def phase(name: str, seconds: float) -> None:
        log.append(f"{time.strftime('%H:%M:%S')} {name}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    while not stop.is_set():
        await phase("normal", 10)
        oauth.mode = Scripted(status=500, body=b"<html>oops</html>", content_type="text/html")
        await phase("token endpoint 500", 8)
        oauth.mode = None
        await phase("normal", 8)
        oauth.mode = Scripted(status=429, body=b"{}", headers={"Retry-After": "2"})
        await phase("token endpoint 429 Retry-After 2", 6)
        oauth.mode = None
        await phase("normal", 6)
        redis.stop()
        await phase("redis down", 10)
        redis.start()
        await phase("redis back (empty)", 6)
        oauth.delays = [3.0] * 3
        await phase("slow token endpoint", 6)


async def run(minutes: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        redis = RedisServer(directory=root / "redis")
        redis.start()
        oauth = OAuthTestServer()
        oauth.lifetime = LIFETIME
        await oauth.start()
        refresh = {"at_fraction": 0.75, "min_remaining": 1, "jitter": 0.05, "safety_margin": 1}
        files = BrokerFiles(
            directory=root / "broker",
            token_url=oauth.token_url,
            store_url=redis.url,
            apps={
                "cc": {
                    "token_url": oauth.token_url,
                    "client_id": "test-client",
                    "client_secret_file": "client_secret",
                    "refresh": refresh,
                },
                "scim": {
                    "grant_type": "authorization_code",
                    "token_url": oauth.token_url,
                    "authorize_url": oauth.authorize_url,
                    "redirect_uri": "http://127.0.0.1:9/callback",
                    "client_id": "test-client",
                    "client_secret_file": "client_secret",
                    "scopes": ["offline_access"],
                    "refresh": refresh,
                },
            },
        )
        config_path = files.write()
        # One-time onboarding of the authorization-code app, as `token-broker authorize` does it.
        config = load_config(config_path)
        spec = config.apps["scim"]
        request = authorization_request(spec, Credentials(spec).client_id())
        async with (
            aiohttp.ClientSession() as session,
            session.get(request.url, allow_redirects=False) as r,
        ):
            location = r.headers["Location"]
        code = location.split("code=")[1].split("&")[0]
        await exchange_and_store(config, spec, code, request.code_verifier)

        broker = BrokerProcess(config_path, root / "broker.log")
        broker.start()
        await broker.wait_ready(files.metrics)
        assert broker.process is not None
        pid = broker.process.pid
        stop = asyncio.Event()
        counters = Counters()
        fault_log: list[str] = []
        await asyncio.sleep(5)
        memory = [(0.0, rss_mib(pid))]
        started = time.monotonic()
        tasks = [
            asyncio.create_task(caller(files, oauth, app, stop, counters))
            for app in ("cc", "scim", "cc", "scim")
        ]
        tasks.append(asyncio.create_task(faults(oauth, redis, stop, fault_log)))
        deadline = started + minutes * 60
        while time.monotonic() < deadline:
            await asyncio.sleep(min(30, max(0.1, deadline - time.monotonic())))
            memory.append((round(time.monotonic() - started), rss_mib(pid)))
        stop.set()
        oauth.mode = None
        await asyncio.gather(*tasks)
        code_exit = broker.terminate()
        await oauth.stop()
        redis.stop()
        logs = broker.log_lines()
    refreshes = sum(1 for e in logs if e["event"] == "token.refreshed")
    failures = sum(1 for e in logs if e["event"] == "token.refresh_failed")
    return {
        "minutes": minutes,
        "requests_ok": counters.ok,
        "requests_503": counters.unavailable,
        "requests_other_errors": counters.errors,
        "expired_tokens_served": counters.expired,
        "refreshes": refreshes,
        "refresh_failures_logged": failures,
        "token_endpoint_requests": oauth.count(),
        "refresh_token_reuse_detected": oauth.reuse_detected,
        "grants_revoked": sum(1 for g in oauth.grants.values() if g.revoked),
        "needs_authorization_events": sum(
            1 for e in logs if e["event"] == "app.needs_authorization"
        ),
        "memory_mib_start": round(memory[1][1] if len(memory) > 1 else memory[0][1], 1),
        "memory_mib_end": round(memory[-1][1], 1),
        "memory_samples": [(t, round(m, 1)) for t, m in memory],
        "broker_exit_code": code_exit,
        "fault_cycles": sum(1 for f in fault_log if f.endswith("redis down")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    report = asyncio.run(run(args.minutes))
    print(json.dumps(report, indent=2))
    ok = report["expired_tokens_served"] == 0 and report["grants_revoked"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

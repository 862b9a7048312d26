"""What DPoP costs the proxy: the broker's CPU per proxied request with and without DPoP.

Run: `python bench/dpop_bench.py [--requests 2000] [--rounds 5]` (the test extra: it uses the
test OAuth server).

One run starts a `token-broker serve` (memory://) with two apps that proxy to the same small
API: `bearer` (a bearer token) and `bound` (`dpop: true`: `Authorization: DPoP` and a fresh
ES256 proof per request). The OAuth server (issuing DPoP-bound tokens to DPoP requests) and the
API run in this process, so the broker's own CPU time (utime + stime from /proc) is what is
measured: the same number of sequential keep-alive requests through each app, in alternating
batches, over several rounds; the figures are the medians. It also times one proof alone
(`ProofKey.proof` in a loop, in this process: one signature and the claims' JSON), which costs
less than the same proof in the request path, where it runs with cold caches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.dpop import ProofKey, generate_key
from broker.model import DpopAlgorithm
from tests.support.broker_process import BrokerFiles, BrokerProcess
from tests.support.dpop import DpopVerifier
from tests.support.oauth_server import OAuthTestServer

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proof_cost(algorithm: DpopAlgorithm, count: int = 5000) -> float:
    """Microseconds of CPU per proof in a loop (hot caches), the best of five rounds."""
    key = ProofKey(generate_key(algorithm), algorithm)
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(count):
            key.proof("GET", "https://api.example.com/v1/items/1", time.time(), access_token="t")
        best = min(best, (time.process_time() - started) / count)
    return best * 1e6


async def upstream() -> tuple[web.AppRunner, str]:
    """The API: 200 and a small JSON body to any request with a token (no checks: its CPU is
    this process's, not the broker's)."""
    body = json.dumps({"id": "1", "name": "widget", "description": "x" * 120}).encode()

    async def item(request: web.Request) -> web.Response:
        if not request.headers.get("Authorization"):
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/items/{id}", item)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def batch(session: aiohttp.ClientSession, url: str, auth: dict[str, str], n: int) -> None:
    for _ in range(n):
        async with session.get(url, headers=auth) as response:
            await response.read()
            assert response.status == 200, response.status


async def measure(requests: int, rounds: int, algorithm: DpopAlgorithm) -> dict[str, object]:
    oauth = OAuthTestServer(lifetime=3600.0)
    oauth.dpop = DpopVerifier(iat_window=3600.0)
    await oauth.start()
    api_runner, api = await upstream()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        base = {
            "token_url": oauth.token_url,
            "client_id": oauth.client_id,
            "client_secret_file": "client_secret",
            "proxy": {"upstream": api, "allowed_networks": ["127.0.0.0/8"]},
        }
        files = BrokerFiles(
            directory=directory,
            token_url=oauth.token_url,
            apps={
                "bearer": base,
                "bound": {**base, "dpop": True, "dpop_algorithm": algorithm.value},
            },
        )
        config = files.write()
        broker = BrokerProcess(config, directory / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics, timeout=60)
            per: dict[str, list[float]] = {"bearer": [], "bound": []}
            async with aiohttp.ClientSession() as session:
                for app in per:  # warm up: the token, the pools, the caches
                    await batch(session, f"{files.api}/v1/proxy/{app}/v1/items/1", files.auth, 200)
                for _ in range(rounds):
                    for app, costs in per.items():
                        url = f"{files.api}/v1/proxy/{app}/v1/items/1"
                        before = cpu_seconds(broker.pid)
                        await batch(session, url, files.auth, requests)
                        costs.append((cpu_seconds(broker.pid) - before) / requests * 1e6)
        finally:
            broker.terminate()
            await api_runner.cleanup()
            await oauth.stop()
    bearer, bound = statistics.median(per["bearer"]), statistics.median(per["bound"])
    return {
        "bearer_us_per_request": round(bearer, 1),
        "dpop_us_per_request": round(bound, 1),
        "dpop_extra_us_per_request": round(bound - bearer, 1),
        "algorithm": algorithm.value,
        "proof_us": round(proof_cost(algorithm), 1),
        "requests_per_batch": requests,
        "rounds": rounds,
        "bearer_rounds_us": [round(v) for v in per["bearer"]],
        "dpop_rounds_us": [round(v) for v in per["bound"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--algorithm", default="ES256", choices=[a.value for a in DpopAlgorithm])
    args = parser.parse_args()
    result = asyncio.run(measure(args.requests, args.rounds, DpopAlgorithm(args.algorithm)))
    print(json.dumps(result))
    print(
        f"broker CPU per proxied request: {result['bearer_us_per_request']} us bearer, "
        f"{result['dpop_us_per_request']} us DPoP (+{result['dpop_extra_us_per_request']} us); "
        f"one {result['algorithm']} proof in a loop {result['proof_us']} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

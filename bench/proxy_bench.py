"""The latency the injecting proxy adds: the same API called directly and through the broker.

Run: `python bench/proxy_bench.py` (needs `wrk` on PATH and the test extra for `trustme`).

One run starts, as separate processes on this machine: the dev OAuth server, a small API over
TLS (certificate from a throwaway trustme CA) that answers a 200-byte JSON body to a bearer
request, and a `token-broker serve` whose app proxies to that API. wrk then loads, with the
same settings, `GET /v1/items/1` on the API directly (with a token the broker handed out) and
`GET /v1/proxy/bench/v1/items/1` on the broker, at 1 and at 50 concurrent connections. The
ratios (through the broker / direct) of p50, p99 and throughput are the figures that matter:
both sides share the machine's two cores with wrk and each other.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import trustme
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import free_port, wait_port

REPO = Path(__file__).resolve().parents[1]
CLIENT_KEY = "bench-client-key-" + "b" * 32

UPSTREAM = textwrap.dedent(
    """
    import json, ssl, sys
    from aiohttp import web
    BODY = json.dumps({"id": "1", "name": "widget", "tags": ["a", "b", "c"],
                       "description": "x" * 120}).encode()
    async def item(request):
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.Response(body=BODY, content_type="application/json")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(sys.argv[2], sys.argv[3])
    app = web.Application()
    app.router.add_get("/v1/items/{id}", item)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), ssl_context=context,
                access_log=None, print=None)
    """
)

OAUTH = textwrap.dedent(
    """
    import asyncio, sys
    from broker.devserver import DevOAuthServer
    async def main():
        server = DevOAuthServer(client_id="bench", client_secret=sys.argv[2], lifetime=3600)
        await server.start(port=int(sys.argv[1]))
        await asyncio.Event().wait()
    asyncio.run(main())
    """
)


@dataclass
class LoadResult:
    """What one wrk run measured."""

    rps: float
    p50_ms: float
    p99_ms: float


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, authorization: str, connections: int, seconds: int) -> LoadResult:
    """Load `url` with wrk; requests/s and the 50th and 99th percentile latency."""
    threads = min(2, connections)
    argv = ["wrk", "-H", f"Authorization: {authorization}", f"-t{threads}", f"-c{connections}"]
    argv += [f"-d{seconds}s", "--latency", url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"errors during the load:\n{out}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    if rps is None or p50 is None or p99 is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return LoadResult(
        float(rps.group(1)), _ms(p50.group(1), p50.group(2)), _ms(p99.group(1), p99.group(2))
    )


def write_config(workdir: Path, oauth_port: int, upstream_port: int, ca_file: Path) -> Path:
    """A serve config: app `bench` against the dev OAuth server, proxied to the API."""
    (workdir / "secret").write_text("bench-secret-0123456789abcdef")
    (workdir / "client.key").write_text(CLIENT_KEY)
    config = {
        "server": {
            "listen": f"127.0.0.1:{free_port()}",
            "metrics_listen": f"127.0.0.1:{free_port()}",
        },
        "store": {"url": "memory://"},
        "apps": {
            "bench": {
                "token_url": f"http://127.0.0.1:{oauth_port}/token",
                "client_id": "bench",
                "client_secret_file": "secret",
                "proxy": {
                    "upstream": f"https://127.0.0.1:{upstream_port}",
                    "ca_file": str(ca_file),
                    "path_prefixes": ["/v1/"],
                    "max_concurrent": 64,
                    "allowed_networks": ["127.0.0.0/8"],  # the bench API is on loopback
                },
            }
        },
        "clients": {"svc": {"key_file": "client.key", "apps": ["bench"]}},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fetch_token(api: str) -> str:
    """The app's current access token, from the broker's token API."""
    request = urllib.request.Request(
        f"{api}/v1/token/bench", headers={"Authorization": f"Bearer {CLIENT_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        token: str = json.load(response)["access_token"]
        return token


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, float]]:
    """Start everything, load both paths at each concurrency, stop everything."""
    ca = trustme.CA()
    ca_file = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
    cert.private_key_pem.write_to_path(str(workdir / "key.pem"))
    oauth_port, upstream_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OAUTH, str(oauth_port), "bench-secret-0123456789abcdef"],
            env=env,
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                UPSTREAM,
                str(upstream_port),
                str(workdir / "cert.pem"),
                str(workdir / "key.pem"),
            ],
            env=env,
        ),
    ]
    try:
        wait_port(oauth_port)
        wait_port(upstream_port)
        config = write_config(workdir, oauth_port, upstream_port, ca_file)
        listen = yaml.safe_load(config.read_text())["server"]["listen"]
        broker = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(config)],
            stdout=(workdir / "serve.log").open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        processes.append(broker)
        wait_port(int(listen.rsplit(":", 1)[1]))
        api = f"http://{listen}"
        token = fetch_token(api)
        direct_url = f"https://127.0.0.1:{upstream_port}/v1/items/1"
        proxy_url = f"{api}/v1/proxy/bench/v1/items/1"
        results: dict[str, dict[str, float]] = {}
        for connections in args.connections:
            run_wrk(direct_url, f"Bearer {token}", connections, 2)  # warm-up
            run_wrk(proxy_url, f"Bearer {CLIENT_KEY}", connections, 2)
            direct = run_wrk(direct_url, f"Bearer {token}", connections, args.seconds)
            proxied = run_wrk(proxy_url, f"Bearer {CLIENT_KEY}", connections, args.seconds)
            results[str(connections)] = {
                "direct_rps": round(direct.rps, 1),
                "proxy_rps": round(proxied.rps, 1),
                "direct_p50_ms": round(direct.p50_ms, 3),
                "proxy_p50_ms": round(proxied.p50_ms, 3),
                "direct_p99_ms": round(direct.p99_ms, 3),
                "proxy_p99_ms": round(proxied.p99_ms, 3),
                "p50_ratio": round(proxied.p50_ms / direct.p50_ms, 2),
                "p99_ratio": round(proxied.p99_ms / direct.p99_ms, 2),
                "throughput_ratio": round(proxied.rps / direct.rps, 3),
                "added_p50_ms": round(proxied.p50_ms - direct.p50_ms, 3),
            }
        return results
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> int:
    """Measure and print the figures (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("need wrk on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(args, Path(tmp))
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"wrk, {args.seconds} s per run; direct = the API over TLS, proxy = through the broker")
    for connections, r in results.items():
        print(f"{connections:>3} connection(s):")
        print(
            f"    direct  {r['direct_rps']:9.1f} req/s  p50 {r['direct_p50_ms']:7.3f} ms  "
            f"p99 {r['direct_p99_ms']:7.3f} ms"
        )
        print(
            f"    proxy   {r['proxy_rps']:9.1f} req/s  p50 {r['proxy_p50_ms']:7.3f} ms  "
            f"p99 {r['proxy_p99_ms']:7.3f} ms"
        )
        print(
            f"    ratio (proxy / direct): p50 {r['p50_ratio']:.2f}  p99 {r['p99_ratio']:.2f}  "
            f"throughput {r['throughput_ratio']:.3f}   (proxy adds {r['added_p50_ms']:.3f} ms "
            "at p50)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The proxy listener's own CPU per request in one process, without sockets.

Run: `python bench/proxy_inprocess.py [--requests 20000] [--rounds 5] [--profile]
[--baseline DIR]`. A broker is built from a memory:// config with app `bench` proxied to an
upstream that is never dialled: its proxy listener (`server.proxy_listen`'s
`ProxyListener`, broker/api/proxy_listener.py) gets one caller connection whose transport
swallows what is written, and a pool of upstream connections whose transports answer each
request, on the loop's next turn, with the bytes nginx answers in `bench/proxy_bench.py`
(200 bytes of JSON). Each request is fed to the caller protocol as the bytes wrk sends
and awaited until its answer is written: `data_received` on both sides, the parsers, the
fast path, the metrics, one loop turn for the upstream's answer. What is left out is the
kernel, TLS and uvloop's socket work, the same for any version of the listener, so this
isolates what the listener's own Python costs, steadier than `bench/proxy_bench.py` on a
shared machine, which remains the measurement that counts. Each round runs in a child process
of its own; `--baseline DIR` adds another source tree (e.g. a checkout of main), in alternating
rounds.
`--profile` prints cProfile's top functions by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, os.environ.get("PROXY_INPROCESS_TREE") or str(Path(__file__).parents[1]))

CLIENT_KEY = "bench-client-key-" + "b" * 32
SECRET = "bench-secret-0123456789abcdef"
BODY = json.dumps(
    {"id": "1", "name": "widget", "tags": ["a", "b", "c"], "description": "x" * 120}
).encode()
REQUEST_BODY = json.dumps({"name": "widget", "description": "y" * 1000}).encode()
# What Debian's nginx answers in bench/proxy_bench.py (its Date is a fixed one here).
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 07:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
    % len(BODY)
) + BODY
TARGET = b"/v1/proxy/bench/v1/items/1"


def wrk_request(post: bool) -> bytes:
    """The bytes wrk sends for one request of proxy_bench's GET or POST scenario."""
    head = b"POST " if post else b"GET "
    head += TARGET + b" HTTP/1.1\r\nHost: 127.0.0.1:18411\r\n"
    head += b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"
    if post:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(REQUEST_BODY)
    return head + b"\r\n" + (REQUEST_BODY if post else b"")


class CallerTransport(asyncio.Transport):
    """The caller's side: keeps the last answer and wakes whoever waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.written: asyncio.Future[bytes] | None = None
        self.last = b""
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """A loopback peer, as a TCP connection would have."""
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 18411)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Keep the answer; wake the waiter."""
        self.last = bytes(data)
        if self.written is not None and not self.written.done():
            self.written.set_result(self.last)

    def is_closing(self) -> bool:
        """Open until closed."""
        return self._closing

    def close(self) -> None:
        """Mark closed."""
        self._closing = True

    def pause_reading(self) -> None:
        """Nothing to pause."""

    def resume_reading(self) -> None:
        """Nothing to resume."""

    def get_write_buffer_size(self) -> int:
        """Everything is written at once."""
        return 0


class UpstreamTransport(CallerTransport):
    """The upstream's side: every request written is answered with ANSWER on the next turn."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.Protocol | None = None
        self.sent = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Answer the request on the loop's next turn, as a socket's readiness would."""
        self.sent = bytes(data)
        assert self.protocol is not None
        asyncio.get_running_loop().call_soon(self.protocol.data_received, ANSWER)


async def per_request_cpu(protocol: Any, request: bytes, count: int) -> tuple[float, bytes]:
    """CPU µs per request of the listener answering `request` `count` times on one
    connection."""
    loop = asyncio.get_running_loop()
    transport = CallerTransport()
    protocol.connection_made(transport)
    used = 0.0
    for warm_up in (True, False):
        started = time.process_time()
        for _ in range(200 if warm_up else count):
            transport.written = loop.create_future()
            protocol.data_received(request)
            await transport.written
        used = time.process_time() - started
    protocol.connection_lost(None)
    return used / count * 1e6, transport.last


def write_config(directory: Path, oauth_port: int) -> Path:
    """A serve config: app `bench` on memory://, proxied to an upstream never dialled."""
    (directory / "secret").write_text(SECRET)
    (directory / "client.key").write_text(CLIENT_KEY)
    config = {
        "server": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
        "store": {"url": "memory://"},
        "apps": {
            "bench": {
                "token_url": f"http://127.0.0.1:{oauth_port}/token",
                "client_id": "bench",
                "client_secret_file": "secret",
                "proxy": {
                    "upstream": "https://127.0.0.1:9",
                    "path_prefixes": ["/v1/"],
                    "max_concurrent": 64,
                    "allowed_networks": ["127.0.0.0/8"],
                },
            }
        },
        "clients": {"svc": {"key_file": "client.key", "apps": ["bench"]}},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def measure(oauth_port: int, requests: int, rounds: int, profile: bool) -> dict[str, Any]:
    """Per scenario, CPU µs per request in each round (and cProfile's text with `profile`)."""
    from broker.api import ApiDependencies, build_proxy_listener
    from broker.api.proxy_listener import LeanPool, UpstreamConnection
    from broker.app import build_broker
    from broker.config import load_config

    directory = Path(tempfile.mkdtemp(prefix="proxy-inprocess-"))
    broker = await build_broker(load_config(write_config(directory, oauth_port)))
    results: dict[str, Any] = {}
    try:
        await broker.core.refreshers["bench"].get()
        listener = build_proxy_listener(
            ApiDependencies(
                broker.core, broker.authenticator, broker.metrics, broker.clock, broker.upstreams
            )
        )
        upstream = broker.upstreams.select("bench", TARGET.decode())
        pool = upstream.lean_pool = LeanPool(upstream, broker.clock)
        for _ in range(4):
            connection = UpstreamConnection(pool)
            transport = UpstreamTransport()
            transport.protocol = connection
            connection.connection_made(transport)
            pool.put(connection)
        for name, post in (("get", False), ("post1k", True)):
            request = wrk_request(post)
            _, answer = await per_request_cpu(listener.protocol(), request, 10)
            if not answer.startswith(b"HTTP/1.1 200") or not answer.endswith(BODY):
                raise RuntimeError(f"unexpected answer: {answer[:300]!r}")
            results[name] = [
                (await per_request_cpu(listener.protocol(), request, requests))[0]
                for _ in range(rounds)
            ]
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await per_request_cpu(listener.protocol(), wrk_request(False), requests)
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
            results["profile"] = out.getvalue()
    finally:
        await broker.session.close()
    return results


def child(args: argparse.Namespace, oauth_port: int) -> int:
    """One measurement (in this process), printed as JSON: what --baseline runs."""
    import uvloop  # the broker's loop in bench/proxy_bench.py

    results = uvloop.run(measure(oauth_port, args.requests, args.rounds, args.profile))
    print(json.dumps(results))
    return 0


def run_tree(tree: Path, args: argparse.Namespace, oauth_port: int, rounds: int) -> Any:
    """One measurement of `tree`'s listener in a child process (its own interpreter state)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "PROXY_INPROCESS_TREE": str(tree),
        "TOKEN_BROKER_LOG_LEVEL": "WARNING",
    }
    argv = [sys.executable, __file__, "--child", str(oauth_port)]
    argv += ["--requests", str(args.requests), "--rounds", str(rounds)]
    if args.profile:
        argv.append("--profile")
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    """Parse the options, start the OAuth server child, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--baseline", type=Path, help="another source tree, measured alike")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKEN_BROKER_LOG_LEVEL", "WARNING")
    if args.child is not None:
        return child(args, args.child)
    from bench.procs import free_port, start_oauth_child, stop

    oauth_port = free_port()
    oauth = start_oauth_child(oauth_port, "bench", SECRET, 3600)
    trees = {"listener": Path(__file__).resolve().parents[1]}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    profiles: dict[str, str] = {}
    try:
        for _ in range(args.rounds):  # alternating, one round each per child
            for name, tree in trees.items():
                result = run_tree(tree, args, oauth_port, 1)
                for scenario in ("get", "post1k"):
                    runs[name].setdefault(scenario, []).extend(result[scenario])
                if "profile" in result:
                    profiles[name] = result["profile"]
    finally:
        stop(oauth)
    print(f"{args.requests} requests per run, {args.rounds} alternating rounds; CPU µs/request")
    for scenario in ("get", "post1k"):
        for name in trees:
            values = runs[name][scenario]
            print(
                f"  {scenario:7} {name:9} median {statistics.median(values):6.2f} "
                f"[{min(values):6.2f}..{max(values):6.2f}]"
            )
    if args.profile:
        for name, text in profiles.items():
            print(f"\n---- {name}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

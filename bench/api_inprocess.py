"""The token route's server-side CPU in one process, without sockets: broker against bare app.

Run: `python bench/api_inprocess.py [--requests 20000] [--rounds 5] [--profile]`. Both servers
run in this process on one event loop, each behind aiohttp's real HTTP protocol (parser, request,
handler, response writer) with a transport that swallows what is written; each request is fed
as bytes and awaited until its answer is written. What is left out is the kernel's share (the
socket system calls), which is the same for both, so the difference per request is what the
broker's own code costs beyond (or below) a bare `web.Application` returning a prebuilt body of
the same size. It answers in seconds and is steadier than `bench/api_bench.py` on a shared
machine; `bench/api_bench.py` remains the measurement that counts. `--profile` prints the
broker's cProfile (top functions by own time).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import (
    DEMO_CLIENT_KEY,
    DEMO_SECRET,
    free_port,
    start_oauth_child,
    stop,
    write_demo_config,
)
from broker.api import ApiDependencies, build_api
from broker.api.server import api_server_options
from broker.app import build_broker
from broker.config import load_config

CLIENT_KEY = DEMO_CLIENT_KEY
TOKEN_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Type": "application/json",
}


class SinkTransport(asyncio.Transport):
    """A transport that counts what is written and tells a waiter when an answer went out."""

    def __init__(self) -> None:
        super().__init__()
        self.written: asyncio.Future[bytes] | None = None
        self.last = b""
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """A loopback peer, as a TCP connection would have."""
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8411)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Keep the last answer; wake whoever waits for it."""
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


async def per_request_cpu(server: web.Server, request: bytes, count: int) -> tuple[float, bytes]:
    """CPU µs per request of `server` answering `request` `count` times on one connection."""
    loop = asyncio.get_running_loop()
    protocol = server()
    transport = SinkTransport()
    protocol.connection_made(transport)
    for warm_up in (True, False):
        started = time.process_time()
        for _ in range(200 if warm_up else count):
            transport.written = loop.create_future()
            protocol.data_received(request)
            await transport.written
        used = time.process_time() - started
    protocol.connection_lost(None)
    return used / count * 1e6, transport.last


async def bare_server(size: int) -> tuple[web.AppRunner, web.Server]:
    """A bare `web.Application` answering a prebuilt body of `size` bytes (as api_bench's),
    set up as `web.run_app` does; returns its runner (to clean up) and its server."""
    prefix, suffix = b'{"access_token": "', b'", "token_type": "Bearer"}'
    body = prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix

    async def token(_: web.Request) -> web.Response:
        return web.Response(body=body, headers=TOKEN_HEADERS)

    app = web.Application()
    app.router.add_get("/v1/token/{app}", token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    return runner, runner.server


async def run(args: argparse.Namespace, oauth_port: int) -> int:
    """Build the broker from a memory:// config, then alternate the two servers."""
    directory = Path(tempfile.mkdtemp(prefix="api-inprocess-"))
    config = write_demo_config(directory, oauth_port, "127.0.0.1:0", "127.0.0.1:0")
    broker = await build_broker(load_config(config))
    try:
        await broker.core.refreshers["demo"].get()
        server = web.Server(
            build_api(
                ApiDependencies(
                    broker.core,
                    broker.authenticator,
                    broker.metrics,
                    broker.clock,
                    broker.upstreams,
                )
            ),
            **api_server_options(),
        )
        request = (
            b"GET /v1/token/demo HTTP/1.1\r\nHost: 127.0.0.1:8411\r\n"
            b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n\r\n"
        )
        _, answer = await per_request_cpu(server, request, 10)
        size = len(answer.partition(b"\r\n\r\n")[2])
        bare_runner, bare = await bare_server(size)
        bare_request = b"GET /v1/token/demo HTTP/1.1\r\nHost: 127.0.0.1:8411\r\n\r\n"
        results: dict[str, list[float]] = {"broker": [], "bare": []}
        for _ in range(args.rounds):
            results["broker"].append((await per_request_cpu(server, request, args.requests))[0])
            results["bare"].append((await per_request_cpu(bare, bare_request, args.requests))[0])
        print(f"{args.requests} requests per run, {args.rounds} alternating rounds, body {size} B")
        for name, values in results.items():
            print(
                f"{name:8} CPU µs/req  min {min(values):6.2f}  median {statistics.median(values):6.2f}"
            )
        ratios = [b / a for b, a in zip(results["broker"], results["bare"], strict=True)]
        print(
            f"broker/bare per round: median {statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}-{max(ratios):.3f}]"
        )
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            await per_request_cpu(server, request, args.requests)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        await bare_runner.cleanup()
    finally:
        await broker.session.close()
    return 0


def main() -> int:
    """Parse the options, start the OAuth server child, run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TOKEN_BROKER_LOG_LEVEL", "WARNING")
    oauth_port = free_port()
    oauth = start_oauth_child(oauth_port, "bench", DEMO_SECRET, 3600)
    try:
        return asyncio.run(run(args, oauth_port))
    finally:
        stop(oauth)


if __name__ == "__main__":
    sys.exit(main())

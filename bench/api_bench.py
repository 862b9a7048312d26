"""Throughput and p99 of `GET /v1/token/{app}` against a bare aiohttp handler, plus idle memory.

Run: `python bench/api_bench.py` (needs `wrk`, or `hey`, on PATH). Both servers run as single
processes on this machine, loaded by the same tool with the same settings in the same run, so the
ratio is what matters. Then a broker with 10 apps idles and its resident memory is read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

BARE_SERVER = textwrap.dedent(
    """
    import json, sys, time
    from aiohttp import web
    BODY = json.dumps({"access_token": "x" * 400, "token_type": "Bearer",
                       "expires_at": int(time.time()) + 3600, "expires_in": 3600,
                       "scope": "demo.read"})
    async def token(request):
        return web.Response(text=BODY, content_type="application/json",
                            headers={"Cache-Control": "no-store"})
    app = web.Application()
    app.router.add_get("/v1/token/{app}", token)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
    """
)


@dataclass
class LoadResult:
    """What one load run measured."""

    rps: float
    p99_ms: float


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Wait until something accepts connections on `port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _ms(value: str, unit: str) -> float:
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return float(value) * scale


def run_wrk(url: str, key: str | None, connections: int, seconds: int) -> LoadResult:
    """Load `url` with wrk; parse requests/s and the 99th percentile latency."""
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if key:
        argv[1:1] = ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    if "Non-2xx" in out:
        raise RuntimeError(f"non-2xx answers during the load:\n{out}")
    assert p99 is not None
    return LoadResult(rps, _ms(p99.group(1), p99.group(2)))


def run_hey(url: str, key: str | None, connections: int, seconds: int) -> LoadResult:
    """Load `url` with hey; parse requests/s and the 99th percentile latency."""
    argv = ["hey", "-z", f"{seconds}s", "-c", str(connections), url]
    if key:
        argv[1:1] = ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+in\s+([\d.]+)\s+secs", out)
    assert p99 is not None
    return LoadResult(rps, float(p99.group(1)) * 1000)


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_dev_broker(port: int, workdir: Path) -> tuple[subprocess.Popen[str], str]:
    """`token-broker dev` on `port`, with hour-long tokens; returns it and its client key."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "dev", "--port", str(port), "--lifetime", "3600"],
        stdout=subprocess.PIPE,
        stderr=(workdir / "dev.log").open("w"),
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(r"client key:\s+(\S+)", line)
        if match:
            wait_port(port)
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError("token-broker dev did not print a client key")


def ten_app_config(workdir: Path, token_url: str, client_id: str, secret: str) -> Path:
    """A serve config with 10 apps against the dev OAuth server and one client."""
    (workdir / "secret").write_text(secret)
    (workdir / "client.key").write_text("c" * 40)
    apps = {
        f"app{i}": {
            "token_url": token_url,
            "client_id": client_id,
            "client_secret_file": "secret",
            "scopes": [f"scope.{i}"],
        }
        for i in range(10)
    }
    config = {
        "server": {
            "listen": f"127.0.0.1:{free_port()}",
            "metrics_listen": f"127.0.0.1:{free_port()}",
        },
        "store": {"url": "memory://"},
        "apps": apps,
        "clients": {"svc": {"key_file": "client.key", "apps": sorted(apps)}},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def idle_memory(workdir: Path, idle_seconds: float) -> float:
    """Start the dev OAuth server (in a child) and a broker with 10 apps; RSS after idling."""
    oauth_port = free_port()
    oauth = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import asyncio
                from broker.devserver import DevOAuthServer
                async def main():
                    s = DevOAuthServer(client_id="bench",
                                       client_secret="bench-secret-0123456789abcdef",
                                       lifetime=3600)
                    await s.start(port={oauth_port})
                    await asyncio.Event().wait()
                asyncio.run(main())
                """
            ),
        ],
        cwd=REPO,
    )
    try:
        wait_port(oauth_port)
        config = ten_app_config(
            workdir,
            f"http://127.0.0.1:{oauth_port}/token",
            "bench",
            "bench-secret-0123456789abcdef",
        )
        metrics_port = yaml.safe_load(config.read_text())["server"]["metrics_listen"].split(":")[1]
        broker = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(config)],
            stdout=(workdir / "serve.log").open("w"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            wait_port(int(metrics_port))
            time.sleep(idle_seconds)
            if broker.poll() is not None:
                raise RuntimeError((workdir / "serve.log").read_text())
            return rss_mib(broker.pid)
        finally:
            broker.send_signal(signal.SIGTERM)
            broker.wait(timeout=20)
    finally:
        oauth.terminate()
        oauth.wait(timeout=10)


def main() -> int:
    """Run both loads and the memory check; print figures and ratios (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tool = "wrk" if shutil.which("wrk") else "hey" if shutil.which("hey") else None
    if tool is None:
        print("need wrk or hey on PATH (apt-get install wrk)", file=sys.stderr)
        return 2
    load = run_wrk if tool == "wrk" else run_hey

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        bare_port = free_port()
        bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_port)])
        try:
            wait_port(bare_port)
            load(f"http://127.0.0.1:{bare_port}/v1/token/demo", None, args.connections, 2)
            baseline = load(
                f"http://127.0.0.1:{bare_port}/v1/token/demo", None, args.connections, args.seconds
            )
        finally:
            bare.terminate()
            bare.wait(timeout=10)

        port = free_port()
        broker, key = start_dev_broker(port, workdir)
        try:
            url = f"http://127.0.0.1:{port}/v1/token/demo"
            load(url, key, args.connections, 2)  # warm-up
            measured = load(url, key, args.connections, args.seconds)
        finally:
            broker.send_signal(signal.SIGINT)
            broker.wait(timeout=20)

        memory = idle_memory(workdir, args.idle_seconds)

    ratio = measured.rps / baseline.rps
    report = {
        "tool": tool,
        "connections": args.connections,
        "seconds": args.seconds,
        "bare_rps": round(baseline.rps, 1),
        "bare_p99_ms": round(baseline.p99_ms, 3),
        "broker_rps": round(measured.rps, 1),
        "broker_p99_ms": round(measured.p99_ms, 3),
        "throughput_ratio": round(ratio, 3),
        "p99_ratio": round(measured.p99_ms / baseline.p99_ms, 3),
        "idle_rss_mib_10_apps": round(memory, 1),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"load: {tool}, {args.connections} connections, {args.seconds} s each")
        print(f"bare aiohttp handler: {baseline.rps:10.1f} req/s  p99 {baseline.p99_ms:.3f} ms")
        print(f"token-broker:         {measured.rps:10.1f} req/s  p99 {measured.p99_ms:.3f} ms")
        print(f"throughput ratio (broker / bare): {ratio:.3f}   (goal >= 0.7)")
        print(f"p99 ratio (broker / bare):        {measured.p99_ms / baseline.p99_ms:.3f}")
        print(f"broker p99: {measured.p99_ms:.3f} ms   (goal < 3 ms)")
        print(f"idle resident memory, 10 apps: {memory:.1f} MiB   (goal < 60 MiB)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    sys.exit(main())

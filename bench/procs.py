"""What the benchmarks read about processes: CPU time and memory from /proc, ports, readiness."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts connections on `port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing listens on {port}")


def wait_ready(metrics_port: int, timeout: float = 60.0, poll: float = 0.005) -> float:
    """Wait until the broker's /readyz answers 200; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{metrics_port}/readyz"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(poll)
    raise RuntimeError(f"not ready within {timeout} s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (children excluded), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command name: state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_oauth_child(
    port: int, client_id: str, secret: str, lifetime: float
) -> subprocess.Popen[bytes]:
    """The dev OAuth server in a child process (so its CPU is not the broker's), counting requests.

    `GET /count` on it answers the number of token requests served so far.
    """
    code = textwrap.dedent(
        f"""
        import asyncio
        from aiohttp import web
        from broker.devserver import DevOAuthServer

        async def main():
            server = DevOAuthServer(client_id={client_id!r}, client_secret={secret!r},
                                    lifetime={lifetime!r})
            app = server.app()

            async def count(_):
                return web.Response(text=str(server.issued))

            app.router.add_get("/count", count)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", {port}).start()
            await asyncio.Event().wait()

        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    wait_port(port)
    return proc


def oauth_count(port: int) -> int:
    """Token requests the child OAuth server has served."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5) as r:
        return int(r.read())


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """SIGTERM `proc` and wait; SIGKILL when it does not stop in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


DEMO_CLIENT_KEY = "bench-client-key-" + "k" * 32
DEMO_SECRET = "bench-secret-0123456789abcdef"  # client `bench`'s secret at the OAuth child


def write_demo_config(directory: Path, oauth_port: int, listen: str, metrics_listen: str) -> Path:
    """A broker directory with one client-credentials app `demo` on memory:// for client `svc`
    (key DEMO_CLIENT_KEY); returns its config file."""
    (directory / "secret").write_text(DEMO_SECRET)
    (directory / "client.key").write_text(DEMO_CLIENT_KEY)
    config = {
        "server": {"listen": listen, "metrics_listen": metrics_listen},
        "store": {"url": "memory://"},
        "apps": {
            "demo": {
                "token_url": f"http://127.0.0.1:{oauth_port}/token",
                "client_id": "bench",
                "client_secret_file": "secret",
                "scopes": ["demo.read"],
            }
        },
        "clients": {"svc": {"key_file": "client.key", "apps": ["demo"]}},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path

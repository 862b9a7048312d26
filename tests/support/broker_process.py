"""Run the real broker: as a `python -m broker serve` subprocess, or in-process for fine control."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from broker.app import Broker, serve
from broker.clock import Clock
from broker.config import load_config
from broker.store import TokenStore
from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT_KEY = "k" * 20 + "client-key-for-tests-0123456789"


# The refresh policy of the default app: 1 s margins suit the few-second lifetimes of these tests.
DEFAULT_REFRESH: Mapping[str, float] = {
    "at_fraction": 0.75,
    "min_remaining": 1,
    "jitter": 0.05,
    "safety_margin": 1,
}


@dataclass
class BrokerFiles:
    """A config directory for one broker: config.yaml, secrets, client key, store key."""

    directory: Path
    token_url: str
    store_url: str = "memory://"
    client_id: str = "test-client"
    client_secret: str = "test-secret-0123456789-abcdefghij"
    client_key: str = CLIENT_KEY
    apps: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    app_overrides: Mapping[str, Any] = field(default_factory=dict)
    api_port: int = 0
    metrics_port: int = 0
    server_overrides: Mapping[str, Any] = field(default_factory=dict)
    # The proxy listener's port (`server.proxy_listen`); 0: none, the API serves the proxy.
    proxy_port: int = 0

    def write(self) -> Path:
        """Write every file and return the config path."""
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        (d / "client_secret").write_text(self.client_secret + "\n")
        (d / "client.key").write_text(self.client_key + "\n")
        (d / "store.key").write_text("k1 " + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n")
        self.api_port = self.api_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        apps = dict(self.apps) or {
            "app1": {
                "token_url": self.token_url,
                "client_id": self.client_id,
                "client_secret_file": "client_secret",
                "refresh": dict(DEFAULT_REFRESH),
                **self.app_overrides,
            }
        }
        store: dict[str, Any] = {"url": self.store_url, "key_prefix": "tb-test"}
        if not self.store_url.startswith("memory://"):
            store["encryption_key_file"] = "store.key"
        config = {
            "server": {
                "listen": f"127.0.0.1:{self.api_port}",
                "metrics_listen": f"127.0.0.1:{self.metrics_port}",
                **({"proxy_listen": f"127.0.0.1:{self.proxy_port}"} if self.proxy_port else {}),
                **self.server_overrides,
            },
            "store": store,
            "apps": apps,
            "clients": {"svc": {"key_file": "client.key", "apps": sorted(apps)}},
        }
        path = d / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    @property
    def api(self) -> str:
        """Base URL of the local API."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def proxy(self) -> str:
        """Base URL of the proxy: the proxy listener when there is one, else the API."""
        return f"http://127.0.0.1:{self.proxy_port}" if self.proxy_port else self.api

    @property
    def metrics(self) -> str:
        """Base URL of the metrics listener."""
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def auth(self) -> dict[str, str]:
        """The Authorization header of the configured client."""
        return {"Authorization": f"Bearer {self.client_key}"}


class BrokerProcess:
    """`python -m broker serve` in a subprocess, its stdout (JSON log lines) kept in a file.

    `wrapper` is a command the broker runs under (e.g. setpriv, to take a capability away).
    """

    def __init__(
        self,
        config: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.log_path = log_path
        self.env = env
        self.wrapper = tuple(wrapper)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the broker."""
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(self.env or {})}
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    *self.wrapper,
                    *(sys.executable, "-m", "broker", "serve", "--config", str(self.config)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=env,
            )

    async def wait_ready(self, metrics_url: str, timeout: float = 20.0) -> None:
        """Wait until /readyz answers 200; fail with the broker's output if it does not."""

        def exited() -> bool:
            return self.process is not None and self.process.poll() is not None

        try:
            await wait_until_ready(metrics_url, timeout, give_up=exited)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.output()[-4000:]}") from None

    @property
    def pid(self) -> int:
        """The process id (0 before the first start)."""
        return self.process.pid if self.process is not None else 0

    def signal(self, signum: int) -> None:
        """Send `signum` if the process is running."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code. One that does not stop in time is killed."""
        self.signal_stop()
        return self.wait_stopped(timeout)

    async def terminate_async(self, timeout: float = 20.0) -> int:
        """`terminate()` from a test's event loop, without blocking it: a draining broker may
        wait for the answer to a request it sent to an OAuth server running on that loop (a
        blocked loop answers nothing, and the broker waits past `timeout`)."""
        return await asyncio.to_thread(self.terminate, timeout)

    def signal_stop(self) -> None:
        """Send SIGTERM (a graceful stop) if the broker is running."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 20.0) -> int:
        """Wait for the exit after signal_stop(); kill and fail when it takes over `timeout`."""
        if self.process is None:
            return 0
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"the broker did not stop within {timeout}s of SIGTERM; killed it. "
                f"Its last log lines ({self.log_path}):\n{self._tail(12)}"
            ) from None

    def _tail(self, lines: int) -> str:
        """The last `lines` lines the broker wrote, for a failure's message."""
        return "\n".join(self.output().splitlines()[-lines:])

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the exit; returns the exit code (0 when never started)."""
        if self.process is None:
            return 0
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def output(self) -> str:
        """Everything the broker wrote."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        """The broker's JSON log lines; fails on any line that is not JSON (e.g. a bare traceback)."""
        lines = []
        for raw in self.output().splitlines():
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except ValueError as exc:
                    raise AssertionError(f"non-JSON output line: {raw!r}") from exc
        return lines


def wall_time(line: Mapping[str, Any]) -> float:
    """The wall time of one of the broker's JSON log lines."""
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


@contextlib.asynccontextmanager
async def running_broker(
    config_path: Path, *, clock: Clock | None = None, store: TokenStore | None = None
) -> AsyncIterator[Broker]:
    """Run a broker in this event loop; yields it once its listeners are bound."""
    config = load_config(config_path)
    started: asyncio.Future[Broker] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def ready(broker: Broker) -> None:
        started.set_result(broker)

    task = asyncio.create_task(serve(config, ready=ready, stop=stop, clock=clock, store=store))
    waiters: set[asyncio.Future[object]] = {task, started}  # type: ignore[arg-type]
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
        raise AssertionError("broker stopped before it was ready")
    try:
        yield started.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def wait_until_ready(
    metrics_url: str, timeout: float = 20.0, give_up: Callable[[], bool] | None = None
) -> None:
    """Poll /readyz until it answers 200 (or `give_up()` says the broker is gone)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if give_up is not None and give_up():
                raise AssertionError("the broker exited before it was ready")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{metrics_url}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError(f"not ready within {timeout}s")


async def wait_until_answering(url: str, timeout: float = 20.0) -> None:
    """Poll `url` until the broker answers it at all (any status): its listener is up.

    A test that must see the broker's first state (before any refresh) waits for this instead
    of sleeping a fixed time, which a loaded machine outlasts.
    """
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    await response.read()
                    return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {timeout}s")

"""Composition root: builds every part from the config, wires them, owns startup and shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from broker.api import build_api_app, build_metrics_app
from broker.api.auth import ClientAuthenticator
from broker.clock import Clock, SystemClock
from broker.core import BrokerCore
from broker.credentials import Credentials
from broker.logs import get_logger
from broker.metrics import Metrics
from broker.model import Config
from broker.oauth.client import OAuthClient
from broker.refresher import AppRefresher
from broker.store import TokenStore
from broker.store.factory import open_store

log = get_logger(__name__)

# How long in-flight API requests get to finish on shutdown.
SHUTDOWN_GRACE = 10.0


def replica_id() -> str:
    """This process's lease owner id: host, pid and a random suffix (unique across restarts)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def is_loopback_listen(listen: str) -> bool:
    """True for a unix socket or a loopback host (127.0.0.0/8, ::1, localhost)."""
    if listen.startswith("unix:"):
        return True
    host, _ = split_host_port(listen)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(listen: str) -> tuple[str, int]:
    """'127.0.0.1:8411' or '[::1]:8411' → (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _site(runner: web.AppRunner, listen: str) -> web.BaseSite:
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return web.UnixSite(runner, path)
    host, port = split_host_port(listen)
    return web.TCPSite(runner, host, port)


@dataclass
class Broker:
    """Every part of a running broker, built from one Config."""

    config: Config
    core: BrokerCore
    store: TokenStore
    metrics: Metrics
    session: aiohttp.ClientSession
    authenticator: ClientAuthenticator
    clock: Clock
    api_runner: web.AppRunner | None = None
    metrics_runner: web.AppRunner | None = None
    api_addresses: list[str] = field(default_factory=list)
    metrics_addresses: list[str] = field(default_factory=list)


async def build_broker(
    config: Config,
    *,
    clock: Clock | None = None,
    metrics: Metrics | None = None,
    store: TokenStore | None = None,
    owner: str | None = None,
) -> Broker:
    """Build (but do not start) every part of the broker from `config`."""
    clock = clock if clock is not None else SystemClock()
    metrics = metrics if metrics is not None else Metrics()
    store = store if store is not None else open_store(config.store, metrics, clock)
    owner = owner if owner is not None else replica_id()
    session = aiohttp.ClientSession(
        headers={"User-Agent": "token-broker"},
        connector=aiohttp.TCPConnector(limit_per_host=8),
    )
    refreshers = {}
    for name, spec in config.apps.items():
        source = OAuthClient(spec, Credentials(spec), session, clock, metrics)
        refreshers[name] = AppRefresher(
            spec,
            source,
            store,
            clock,
            metrics,
            owner=owner,
            rng=random.Random(),  # noqa: S311
        )
    core = BrokerCore(refreshers, store, clock, metrics)
    authenticator = ClientAuthenticator(config.clients)
    return Broker(config, core, store, metrics, session, authenticator, clock)


async def start_listeners(broker: Broker) -> None:
    """Bind the local API and the metrics listener."""
    api = build_api_app(broker.core, broker.authenticator, broker.metrics, broker.clock)
    broker.api_runner = web.AppRunner(
        api, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE
    )
    await broker.api_runner.setup()
    api_site = _site(broker.api_runner, broker.config.server.listen)
    await api_site.start()
    broker.api_addresses = _addresses(broker.api_runner)

    metrics_app = build_metrics_app(broker.core, broker.metrics)
    broker.metrics_runner = web.AppRunner(metrics_app, access_log=None, handle_signals=False)
    await broker.metrics_runner.setup()
    metrics_site = _site(broker.metrics_runner, broker.config.server.metrics_listen)
    await metrics_site.start()
    broker.metrics_addresses = _addresses(broker.metrics_runner)


async def shutdown(broker: Broker, core_task: asyncio.Task[None]) -> None:
    """Readiness goes false, in-flight requests finish, then the loops stop and connections close."""
    broker.core.draining = True
    log.info("broker.draining")
    if broker.api_runner is not None:
        await broker.api_runner.cleanup()
    core_task.cancel()
    await asyncio.gather(core_task, return_exceptions=True)
    if broker.metrics_runner is not None:
        await broker.metrics_runner.cleanup()
    await broker.store.close()
    await broker.session.close()
    log.info("broker.stopped")


async def serve(
    config: Config,
    *,
    ready: Callable[[Broker], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
    clock: Clock | None = None,
    store: TokenStore | None = None,
) -> None:
    """Run the broker until SIGTERM/SIGINT (or `stop` is set), then shut down gracefully."""
    broker = await build_broker(config, clock=clock, store=store)
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    core_task = asyncio.create_task(broker.core.run(), name="broker-core")
    try:
        await start_listeners(broker)
        log.info(
            "broker.started",
            api=broker.api_addresses,
            metrics=broker.metrics_addresses,
            apps=sorted(config.apps),
            store=_safe_store_name(config.store.url),
        )
        if ready is not None:
            await ready(broker)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({stopper, core_task}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if core_task.done():
            core_task.result()  # surfaces the loop's crash as a runtime failure
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await shutdown(broker, core_task)


def _safe_store_name(url: str) -> str:
    """The store URL's scheme and host, without credentials."""
    scheme, _, rest = url.partition("://")
    host = rest.rpartition("@")[2].split("/")[0]
    return f"{scheme}://{host}" if host else f"{scheme}://"


def _addresses(runner: web.AppRunner) -> list[str]:
    """The bound addresses as `http://host:port` (or the unix socket path)."""
    found = []
    for address in runner.addresses:
        if isinstance(address, tuple | list) and len(address) >= 2:
            host = str(address[0])
            host = f"[{host}]" if ":" in host else host
            found.append(f"http://{host}:{address[1]}")
        else:
            found.append(f"unix:{address}")
    return found

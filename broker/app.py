"""Composition root: builds every part from the config, wires them, owns startup and shutdown."""

from __future__ import annotations

import asyncio
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

from broker.api import build_api_server, build_metrics_app
from broker.api.auth import ClientAuthenticator
from broker.clock import Clock, SystemClock
from broker.config import load_config
from broker.core import BrokerCore
from broker.credentials import Credentials
from broker.errors import ConfigError
from broker.logs import audit, get_logger
from broker.metrics import Metrics
from broker.model import AppSpec, Config
from broker.oauth.client import OAuthClient
from broker.refresher import AppRefresher
from broker.store import TokenStore
from broker.store.factory import open_store

log = get_logger(__name__)

# How long in-flight API requests get to finish on shutdown.
SHUTDOWN_GRACE = 10.0
# How long closing the store and HTTP connections may take on shutdown.
CLOSE_TIMEOUT = 3.0
# How often secret and client key files are checked for a change.
FILE_CHECK_INTERVAL = 2.0


def replica_id() -> str:
    """This process's lease owner id: host, pid and a random suffix (unique across restarts)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def split_host_port(listen: str) -> tuple[str, int]:
    """'127.0.0.1:8411' or '[::1]:8411' → (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _site(runner: web.BaseRunner, listen: str) -> web.BaseSite:
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
    owner: str
    credentials: dict[str, Credentials] = field(default_factory=dict)
    api_runner: web.ServerRunner | None = None
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
    core = BrokerCore({}, store, clock, metrics)
    authenticator = ClientAuthenticator(config.clients)
    broker = Broker(config, core, store, metrics, session, authenticator, clock, owner)
    for spec in config.apps.values():
        core.add_app(new_refresher(broker, spec))
    return broker


def new_refresher(broker: Broker, spec: AppSpec) -> AppRefresher:
    """An app's refresher, its credentials wired to the metrics and the audit trail."""
    credentials = Credentials(
        spec,
        on_change=lambda app, which: _credential_changed(broker, app, which),
        on_reload=lambda app, which, ok: broker.metrics.credential_reloads.labels(
            app=app, outcome="reloaded" if ok else "error"
        ).inc(),
    )
    broker.credentials[spec.name] = credentials
    source = OAuthClient(spec, credentials, broker.session, broker.clock, broker.metrics)
    return AppRefresher(
        spec,
        source,
        broker.store,
        broker.clock,
        broker.metrics,
        owner=broker.owner,
        rng=random.Random(),  # noqa: S311 - jitter, not cryptography
    )


def _credential_changed(broker: Broker, app: str, which: str) -> None:
    if which in ("client_secret", "client_secret_previous", "private_key"):
        audit(log, "app.secret_rotated", app=app, file=which)
    else:
        log.info("credentials.changed", app=app, file=which)


async def watch_files(broker: Broker) -> None:
    """Re-read changed secret and client key files every few seconds (Kubernetes swaps them)."""
    while True:
        await broker.clock.sleep(FILE_CHECK_INTERVAL)
        for credentials in list(broker.credentials.values()):
            credentials.check_all()
        for client in broker.authenticator.reload_changed():
            audit(log, "client.key_rotated", client=client)


# Settings whose change means a token fetched under the old ones must not be kept.
_IDENTITY_FIELDS = (
    "token_url",
    "client_id",
    "client_id_file",
    "grant_type",
    "scopes",
    "audience",
    "extra_params",
)


async def reload_config(broker: Broker, path: Path) -> bool:
    """Apply a changed config file (SIGHUP): apps and clients added, changed or removed.

    A config that does not validate is refused with the reason; the running one stays. Listener
    and store settings need a restart; a change to them is logged and otherwise ignored.
    """
    try:
        new = load_config(path)
        broker.authenticator.replace(new.clients)
    except ConfigError as exc:
        log.error("config.reload_failed", setting=exc.key, reason=exc.reason)
        return False
    old = broker.config
    if new.server != old.server or new.store != old.store:
        log.warning("config.restart_needed", reason="server and store settings apply on restart")
    for name in sorted(set(old.apps) - set(new.apps)):
        await broker.core.remove_app(name)
        broker.credentials.pop(name, None)
        audit(log, "app.removed", app=name)
    for name, spec in sorted(new.apps.items()):
        before = old.apps.get(name)
        if before == spec:
            continue
        fresh = before is not None and any(
            getattr(before, f) != getattr(spec, f) for f in _IDENTITY_FIELDS
        )
        if before is not None:
            await broker.core.remove_app(name)
        broker.core.add_app(new_refresher(broker, spec), fresh=fresh)
        audit(log, "app.updated" if before is not None else "app.added", app=name)
    broker.config = Config(server=old.server, store=old.store, apps=new.apps, clients=new.clients)
    log.info("config.reloaded", apps=sorted(new.apps), clients=sorted(new.clients))
    return True


async def start_listeners(broker: Broker) -> None:
    """Bind the local API and the metrics listener."""
    api = build_api_server(broker.core, broker.authenticator, broker.metrics, broker.clock)
    broker.api_runner = web.ServerRunner(api, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE)
    await broker.api_runner.setup()
    api_site = _site(broker.api_runner, broker.config.server.listen)
    await api_site.start()
    broker.api_addresses = _addresses(broker.api_runner)

    metrics_app = build_metrics_app(broker.core, broker.metrics)
    broker.metrics_runner = web.AppRunner(
        metrics_app, access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
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
    done, _ = await asyncio.wait({core_task}, timeout=CLOSE_TIMEOUT)
    if not done:
        log.warning("broker.loops_did_not_stop")
    if broker.metrics_runner is not None:
        await broker.metrics_runner.cleanup()
    # Closing connections must not hold the exit back (a Redis that stopped answering).
    for closing in (broker.store.close(), broker.session.close()):
        try:
            await asyncio.wait_for(closing, CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("broker.close_timed_out")
    log.info("broker.stopped")


async def serve(
    config: Config,
    *,
    config_path: Path | None = None,
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
    reloads: set[asyncio.Task[bool]] = set()
    if config_path is not None:

        def on_sighup() -> None:
            task = asyncio.create_task(reload_config(broker, config_path))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    core_task = asyncio.create_task(broker.core.run(), name="broker-core")
    watcher = asyncio.create_task(watch_files(broker), name="file-watcher")
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
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        watcher.cancel()
        await asyncio.gather(watcher, *reloads, return_exceptions=True)
        await shutdown(broker, core_task)


def _safe_store_name(url: str) -> str:
    """The store URL's scheme and host, without credentials."""
    scheme, _, rest = url.partition("://")
    host = rest.rpartition("@")[2].split("/")[0]
    return f"{scheme}://{host}" if host else f"{scheme}://"


def _addresses(runner: web.BaseRunner) -> list[str]:
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

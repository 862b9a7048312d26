"""Composition root: builds every part from the config, wires them, owns startup and shutdown."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
from aiohttp import web

from broker import tracing
from broker.api import ApiDependencies, build_api, build_proxy_listener, serve_proxy
from broker.api.auth import ClientAuthenticator
from broker.api.health import build_metrics_app
from broker.api.proxy import Upstreams
from broker.api.server import api_server_options
from broker.api.unix_socket import UnixListener, bind_unix_socket
from broker.clock import Clock, SystemClock
from broker.config import load_config
from broker.core import BrokerCore
from broker.credentials import Credentials
from broker.errors import ConfigError, ConfigErrors, ListenError, StoreUnavailable
from broker.fleetclock import FleetClock
from broker.logs import audit, get_logger
from broker.metrics import Metrics
from broker.model import AppSpec, Config
from broker.oauth.client import OAuthClient
from broker.observe import Observer
from broker.refresher import AppRefresher
from broker.sinks import SinkSet
from broker.status import AppTarget, ReplicaView, collect
from broker.store import TokenStore
from broker.store.factory import open_store
from broker.store.facts import StoreInspector
from broker.store.memory import MemoryStore

if TYPE_CHECKING:
    from broker.api.proxy_listener import ProxyListener
    from broker.dpop import AppDpop

log = get_logger(__name__)

# How long in-flight API requests get to finish on shutdown.
SHUTDOWN_GRACE = 10.0
# How long a refresh in flight gets to finish and persist on shutdown is the core's
# `drain_bound()`: the lease plus the read timeout (137.5 s with the defaults), counted on the
# injected clock (broker/refresher.py `drain_bound`). terminationGracePeriodSeconds fits it.
# How long closing the store and HTTP connections may take on shutdown.
CLOSE_TIMEOUT = 3.0
# How often secret and client key files are checked for a change.
FILE_CHECK_INTERVAL = 2.0
# How long startup waits for the first measurement of the fleet clock before the refreshers
# start (on the local clock, if the store does not answer in time).
CLOCK_STARTUP_WAIT = 3.0


def replica_id() -> str:
    """This process's lease owner id: host, pid and a random suffix (unique across restarts)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def split_host_port(listen: str) -> tuple[str, int]:
    """'127.0.0.1:8411' or '[::1]:8411' → (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _tcp_site(runner: web.BaseRunner, listen: str) -> web.BaseSite:
    host, port = split_host_port(listen)
    return web.TCPSite(runner, host, port)


@dataclass
class Broker:
    """Every part of a running broker, built from one Config.

    `clock` is this host's clock; `fleet_clock` keeps time in the store's frame and is the one
    the refreshers, the core and the token endpoint client use, so every `expires_at` written to
    or read from the store is in one frame for the whole fleet.
    """

    config: Config
    core: BrokerCore
    store: TokenStore
    metrics: Metrics
    session: aiohttp.ClientSession
    authenticator: ClientAuthenticator
    clock: Clock
    owner: str
    sinks: SinkSet
    fleet_clock: FleetClock
    upstreams: Upstreams = field(default_factory=Upstreams)
    credentials: dict[str, Credentials] = field(default_factory=dict)
    # The DPoP of each app with `dpop: true` (read by the token client, the proxy and the API).
    dpop: dict[str, AppDpop] = field(default_factory=dict)
    api_runner: web.ServerRunner | None = None
    api_socket: UnixListener | None = None
    # The proxy listener (`server.proxy_listen`), its unix socket and addresses.
    proxy_listener: ProxyListener | None = None
    proxy_socket: UnixListener | None = None
    proxy_addresses: list[str] = field(default_factory=list)
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
    # A store in this process's memory has no other clock to agree with.
    fleet_clock = FleetClock(clock, local=isinstance(store, MemoryStore))
    if tracing.enabled():
        # Imported here: only a broker with traces on notes the protocol's steps as events.
        from broker.store.traced import TracedStore

        store = cast(TokenStore, TracedStore(store))
    metrics.track_clock(fleet_clock.offset, fleet_clock.offset_age, lambda: fleet_clock.measured)
    core = BrokerCore({}, store, fleet_clock, Observer(metrics))
    metrics.track_readiness(core.readiness)
    authenticator = ClientAuthenticator(config.clients)
    sinks = SinkSet(clock, metrics)
    broker = Broker(
        config, core, store, metrics, session, authenticator, clock, owner, sinks, fleet_clock
    )
    for spec in config.apps.values():
        refresher = new_refresher(broker, spec)
        core.add_app(refresher)
        await sinks.attach(refresher)
    broker.upstreams.update(config.apps)
    return broker


def new_refresher(broker: Broker, spec: AppSpec, *, owner: str | None = None) -> AppRefresher:
    """An app's refresher, its credentials wired to the metrics and the audit trail.

    `owner` is its lease owner name (default: the broker's). Its client binding (issue 20, M6)
    takes the client id in use now: from client_id_file when the app has one (read without the
    reload hooks, which count and announce changes).
    """
    credentials = Credentials(
        spec,
        on_change=lambda app, which: _credential_changed(broker, app, which),
        on_reload=lambda app, which, ok: broker.metrics.credential_reloads.labels(
            app=app, outcome="reloaded" if ok else "error"
        ).inc(),
    )
    broker.credentials[spec.name] = credentials
    source = OAuthClient(
        spec,
        credentials,
        broker.session,
        broker.fleet_clock,
        broker.metrics,
        dpop=_dpop_for(broker, spec),
    )
    return AppRefresher(
        spec,
        source,
        broker.store,
        broker.fleet_clock,
        broker.core.on_event,  # one Observer for the broker: every event names its app
        owner=owner if owner is not None else broker.owner,
        rng=random.Random(),  # noqa: S311 - jitter, not cryptography
        client_id=Credentials(spec).client_id(),
        host_clock=broker.clock,
    )


def _dpop_for(broker: Broker, spec: AppSpec) -> AppDpop | None:
    """The app's DPoP (kept in `broker.dpop`), or None without `dpop: true`.

    A key made at start (memory://, no key file) is kept across a reload: the app's set stays
    bound to it.
    """
    if not spec.dpop:
        broker.dpop.pop(spec.name, None)
        return None
    # Imported here: only DPoP apps load pyjwt and cryptography (about 9 MiB).
    from broker.dpop import AppDpop, app_dpop

    before = broker.dpop.get(spec.name)
    if (
        before is not None
        and before.keys.generated
        and spec.dpop_key_file is None
        and before.keys.current.algorithm is spec.dpop_algorithm
    ):
        dpop = AppDpop(spec.name, before.keys, broker.clock.time, before.counted)
    else:
        dpop = app_dpop(spec, broker.metrics, broker.clock.time)
    broker.dpop[spec.name] = dpop
    return dpop


def _credential_changed(broker: Broker, app: str, which: str) -> None:
    if which in ("client_secret", "client_secret_previous", "private_key", "tls_client_cert"):
        audit(log, "app.secret_rotated", app=app, file=which)
    else:
        log.info("credentials.changed", app=app, file=which)
    refresher = broker.core.refreshers.get(app)
    if refresher is not None:
        refresher.credentials_changed()


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


# The settings in an app's client binding (broker/store client_binding), by their config keys.
_BINDING_FIELDS = ("token_url", "client_id", "grant_type", "scopes", "audience")


def _binding_changes(before: AppSpec, after: AppSpec) -> str:
    """Which binding settings differ between two versions of an app, as `a, b` ('' if none)."""
    changed = [f for f in _BINDING_FIELDS if getattr(before, f) != getattr(after, f)]
    if before.client_id_file != after.client_id_file and "client_id" not in changed:
        changed.append("client_id_file")
    if before.extra_params.get("resource") != after.extra_params.get("resource"):
        changed.append("extra_params.resource")
    return ", ".join(changed)


async def reload_config(broker: Broker, path: Path) -> bool:
    """Apply a changed config file (SIGHUP): apps and clients added, changed or removed.

    A config that does not validate is refused with the reason; the running one stays. Listener
    and store settings need a restart; a change to them is logged and otherwise ignored.
    """
    try:
        new = load_config(path)
        broker.authenticator.replace(new.clients)
    except ConfigError as exc:
        for error in exc.errors if isinstance(exc, ConfigErrors) else (exc,):
            log.error("config.reload_failed", setting=error.key, reason=error.reason)
        return False
    old = broker.config
    if new.server != old.server or new.store != old.store:
        log.warning("config.restart_needed", reason="server and store settings apply on restart")
    for name in sorted(set(old.apps) - set(new.apps)):
        await broker.core.remove_app(name)
        await broker.sinks.detach(name)
        broker.credentials.pop(name, None)
        broker.dpop.pop(name, None)
        audit(log, "app.removed", app=name)
    retired = broker.upstreams.update(new.apps)
    for name, spec in sorted(new.apps.items()):
        before = old.apps.get(name)
        if before is not None and replace(before, proxy=None) == replace(spec, proxy=None):
            if before != spec:
                audit(log, "app.updated", app=name)
            continue  # only the proxy changed (or nothing): the token and its refresher stay
        fresh = before is not None and any(
            getattr(before, f) != getattr(spec, f) for f in _IDENTITY_FIELDS
        )
        previous = broker.core.refreshers.get(name)
        if before is not None:
            await broker.core.remove_app(name)
        if previous is None:
            refresher = new_refresher(broker, spec)
        else:
            # A new owner name for the app's new refresher: the old one may still see a sent
            # request through (its drain bound ran out), and the store's records under the
            # old name must not pass for the new refresher's own. What the old one knew of
            # spends is carried over, so the reload forgets nothing (issue 20, Low).
            refresher = new_refresher(broker, spec, owner=f"{broker.owner}-{secrets.token_hex(2)}")
        rebound = previous is not None and previous.binding != refresher.binding
        if before is not None and rebound:
            # A new binding is a new name in the store: the old set is not used, and an
            # authorization-code app must be authorized again (its 409 names what changed).
            # (A client id read from a file may change with the same settings.)
            refresher.binding_changed = _binding_changes(before, spec) or "client_id_file contents"
            log.warning("app.binding_changed", app=name, changed=refresher.binding_changed)
        if previous is not None:
            refresher.carry_over(previous, same_grant=not fresh and not rebound)
        if previous is not None and not rebound:
            # Keep the set it held: it may be the only copy of a rotated set the store could
            # not take yet (swarm-found: a reload while the answer was unstored).
            refresher.take_over(previous)
        broker.core.add_app(refresher, fresh=fresh)
        await broker.sinks.attach(refresher)
        audit(log, "app.updated" if before is not None else "app.added", app=name)
    broker.config = Config(server=old.server, store=old.store, apps=new.apps, clients=new.clients)
    log.info("config.reloaded", apps=sorted(new.apps), clients=sorted(new.clients))
    # Requests in flight through a changed or removed proxy finish on its old pool.
    await asyncio.gather(*(upstream.close(SHUTDOWN_GRACE) for upstream in retired))
    return True


async def start_fleet_clock(broker: Broker) -> asyncio.Task[None]:
    """Measure the fleet clock once (bounded wait), then keep measuring it in a task."""
    clock = broker.fleet_clock
    if not clock.local and not await clock.measure_within(broker.store, CLOCK_STARTUP_WAIT):
        log.warning(
            "clock.offset_unmeasured",
            reason="the store did not answer; the local clock is used until it does",
        )
    return asyncio.create_task(clock.run(broker.store), name="fleet-clock")


async def check_store_settings(broker: Broker) -> None:
    """Warn at start about store settings that break the fleet protocol's assumptions.

    Only a Redis store has any (its `maxmemory-policy`); the check is looked up rather than
    imported so that redis-py stays unimported for memory://.
    """
    check = getattr(broker.store, "check_eviction_policy", None)
    if check is None:
        return
    # Bounded on the injected clock, as every timeout is (asyncio.wait_for counts the loop's).
    checking = asyncio.ensure_future(check())
    timer = asyncio.ensure_future(broker.clock.sleep(CLOCK_STARTUP_WAIT))
    try:
        await asyncio.wait({checking, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        if not checking.done():
            checking.cancel()
        await asyncio.gather(checking, timer, return_exceptions=True)
    if checking.cancelled():
        log.info("store.eviction_policy_unchecked", reason="no answer in time")
    elif checking.exception() is not None:  # a check must not stop the broker from starting
        log.error("store.eviction_policy_unchecked", exc_info=checking.exception())


async def start_listeners(broker: Broker) -> None:
    """Bind the local API (TCP, or a unix socket with peer identity) and the metrics listener;
    ListenError names the setting that failed."""
    server = broker.config.server
    deps = ApiDependencies(
        service=broker.core,
        authenticator=broker.authenticator,
        metrics=broker.metrics,
        clock=broker.clock,
        upstreams=broker.upstreams,
        peer_identity=server.unix_path is not None,
        dpop=broker.dpop,
    )
    api = web.Server(build_api(deps), **api_server_options())
    broker.api_runner = web.ServerRunner(api, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE)
    await broker.api_runner.setup()
    api_runner = broker.api_runner

    def api_site() -> web.BaseSite:
        if server.unix_path is None:
            return _tcp_site(api_runner, server.listen)
        broker.api_socket = bind_unix_socket(server)
        return web.SockSite(api_runner, broker.api_socket.sock)

    await _bind("server.listen", server.listen, api_site)
    broker.api_addresses = _addresses(broker.api_runner)
    if server.proxy_listen is not None:
        await _start_proxy_listener(broker, deps)

    status = (lambda: fleet_status(broker)) if server.status_endpoint else None
    metrics_app = build_metrics_app(broker.core, broker.metrics, status=status)
    broker.metrics_runner = web.AppRunner(
        metrics_app, access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await broker.metrics_runner.setup()
    metrics_runner = broker.metrics_runner
    await _bind(
        "server.metrics_listen",
        server.metrics_listen,
        lambda: _tcp_site(metrics_runner, server.metrics_listen),
    )
    broker.metrics_addresses = _addresses(broker.metrics_runner)


async def _start_proxy_listener(broker: Broker, deps: ApiDependencies) -> None:
    """Bind `server.proxy_listen`: TCP, or a unix socket (with peer identity, the API's socket
    mode and group)."""
    server = broker.config.server
    listen = server.proxy_listen
    assert listen is not None
    unix = server.proxy_unix_path is not None
    listener = build_proxy_listener(replace(deps, peer_identity=unix))
    broker.proxy_listener = listener
    try:
        if unix:
            broker.proxy_socket = bind_unix_socket(replace(server, listen=listen))
            await serve_proxy(listener, sock=broker.proxy_socket.sock)
            broker.proxy_addresses = [listen]
        else:
            host, port = split_host_port(listen)
            started = await serve_proxy(listener, host=host, port=port)
            broker.proxy_addresses = _socket_addresses(started)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE and not unix:
            reason += " (another process listens there; stop it or change the setting)"
        raise ListenError("server.proxy_listen", listen, reason) from None


def _socket_addresses(server: asyncio.Server) -> list[str]:
    found = []
    for sock in server.sockets:
        host, port = sock.getsockname()[:2]
        found.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
    return found


async def fleet_status(broker: Broker) -> dict[str, Any]:
    """`GET /v1/status`: the store's view of every app (read commands only) with this
    replica's own (broker/status.py). Raises StoreUnavailable when the store cannot be read."""
    store = broker.store
    if not isinstance(store, StoreInspector):
        raise StoreUnavailable("this store cannot describe its contents")
    refreshers = broker.core.refreshers
    targets = [AppTarget(r.spec, r.store_name) for r in refreshers.values()]
    views = {
        name: ReplicaView(
            state=r.state.value,
            ready=broker.core.app_ready(name),
            next_refresh_at=r.next_refresh_at(),
            last_error=r.last_error,
        )
        for name, r in refreshers.items()
    }
    return await collect(store, targets, views, source="replica")


async def _bind(setting: str, listen: str, site: Callable[[], web.BaseSite]) -> None:
    try:
        await site().start()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE and not listen.startswith("unix:"):
            # (A unix socket's own message already names the path another process listens on.)
            reason += " (another process listens there; stop it or change the setting)"
        raise ListenError(setting, listen, reason) from None


async def shutdown(broker: Broker, core_task: asyncio.Task[None], *, started: bool = True) -> None:
    """Readiness goes false, in-flight requests finish, then the loops stop and connections close.

    A broker that never `started` (a listener could not bind) cleans up without announcing a
    drain or a stop: it never served.
    """
    broker.core.draining = True
    if started:
        log.info("broker.draining")
    if broker.api_socket is not None:
        broker.api_socket.remove()  # no new callers; in-flight requests finish below
    if broker.proxy_socket is not None:
        broker.proxy_socket.remove()
    # In-flight API requests and in-flight refreshes finish side by side; a refresh token that
    # was sent is answered and stored before the loops stop.
    cleanups = [broker.core.drain()]
    if broker.api_runner is not None:
        cleanups.append(broker.api_runner.cleanup())
    if broker.proxy_listener is not None:
        cleanups.append(broker.proxy_listener.close(SHUTDOWN_GRACE))
    await asyncio.gather(*cleanups)
    core_task.cancel()
    done, _ = await asyncio.wait({core_task}, timeout=CLOSE_TIMEOUT)
    if not done:
        log.warning("broker.loops_did_not_stop")
    try:
        # Nobody will empty the token files at their deadline once the broker is gone.
        await asyncio.wait_for(broker.sinks.close(), CLOSE_TIMEOUT)
    except TimeoutError:
        log.warning("sinks.close_timed_out")
    if broker.metrics_runner is not None:
        await broker.metrics_runner.cleanup()
    await broker.upstreams.close(grace=0.0)
    # Closing connections must not hold the exit back (a Redis that stopped answering).
    for closing in (broker.store.close(), broker.session.close()):
        try:
            await asyncio.wait_for(closing, CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("broker.close_timed_out")
    if started:
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
    clock_task = await start_fleet_clock(broker)
    await check_store_settings(broker)
    core_task = asyncio.create_task(broker.core.run(), name="broker-core")
    broker.sinks.start()
    watcher = asyncio.create_task(watch_files(broker), name="file-watcher")
    started = False
    try:
        await start_listeners(broker)
        started = True
        log.info(
            "broker.started",
            api=broker.api_addresses,
            **({"proxy": broker.proxy_addresses} if broker.proxy_addresses else {}),
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
        # A repeated SIGTERM or SIGINT during the drain is ignored: its default action would
        # kill the process while a refresh in flight may still carry a rotated refresh token.
        loop.remove_signal_handler(signal.SIGHUP)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: None)
        watcher.cancel()
        clock_task.cancel()
        await asyncio.gather(watcher, clock_task, *reloads, return_exceptions=True)
        try:
            await shutdown(broker, core_task, started=started)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)


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

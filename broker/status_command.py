"""`token-broker status`: read every app's record from the store, print a table or JSON.

It opens the store the config names (or `--store-url`, a replica of Redis) and reads it with
read commands only (`StoreInspector.inspect`), with the config's encryption key to learn a
set's expiry and the shared failure. When the config turns on `server.status_endpoint`, it
also asks this host's broker for its own view (`GET /v1/status` on the metrics listener).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TextIO

import aiohttp

from broker.clock import Clock, SystemClock
from broker.credentials import SecretFile
from broker.errors import ConfigError
from broker.metrics import Metrics
from broker.model import AppSpec, Config
from broker.status import AppTarget, ReplicaView, collect, render_detail, render_table
from broker.store import bound_name, client_binding
from broker.store.facts import StoreInspector

# How long the broker's own view may take before the table is printed without it.
REPLICA_TIMEOUT = 2.0


def store_name(spec: AppSpec) -> str:
    """The name the store knows the app by: the app and its client binding (broker/store)."""
    client_id = spec.client_id
    if spec.client_id_file is not None:
        path_key = f"apps.{spec.name}.client_id_file"
        client_id = SecretFile(spec.client_id_file, path_key).value.decode()
    return bound_name(spec.name, client_binding(spec, client_id))


async def read_status(
    config: Config,
    *,
    store_url: str | None = None,
    app: str | None = None,
    clock: Clock | None = None,
) -> dict[str, Any]:
    """The status document of `config`'s apps (or of `app`), read from the store."""
    from broker.store.factory import open_store

    if app is not None and app not in config.apps:
        raise ConfigError("--app", f"no app {app!r} in the config")
    spec = replace(config.store, url=store_url) if store_url else config.store
    if spec.url.startswith("memory://"):
        raise ConfigError(
            "store.url",
            "status reads a shared store, and memory:// lives inside one broker process: set "
            "server.status_endpoint: true and read GET /v1/status on its metrics listener",
        )
    store = open_store(spec, Metrics(), clock if clock is not None else SystemClock())
    apps = [config.apps[app]] if app is not None else list(config.apps.values())
    targets = [AppTarget(a, store_name(a)) for a in apps]
    try:
        assert isinstance(store, StoreInspector)
        replica = await replica_views(config) if config.server.status_endpoint else None
        return await collect(store, targets, replica, source="store")
    finally:
        await store.close()


async def replica_views(config: Config) -> dict[str, ReplicaView] | None:
    """This host's broker's own view of its apps, or None when it does not answer."""
    host, _, port = config.server.metrics_listen.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    url = f"http://{host}:{port}/v1/status"
    try:
        timeout = aiohttp.ClientTimeout(total=REPLICA_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url) as response,
        ):
            if response.status != 200:
                return None
            document = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    views: dict[str, ReplicaView] = {}
    for row in document.get("apps", []):
        seen = row.get("replica")
        if isinstance(seen, Mapping):
            views[str(row["app"])] = ReplicaView(
                state=str(seen["state"]),
                ready=bool(seen["ready"]),
                next_refresh_at=seen.get("next_refresh_at"),
                last_error=seen.get("last_error"),
            )
    return views


def print_status(
    document: Mapping[str, Any], *, as_json: bool, app: str | None, out: TextIO = sys.stdout
) -> None:
    """The document as JSON, one app in full (`app`), or the table."""
    if as_json:
        out.write(json.dumps(document, indent=2) + "\n")
    elif app is not None:
        out.write(render_detail(document["apps"][0], float(document["now"])) + "\n")
    else:
        out.write(render_table(document) + "\n")

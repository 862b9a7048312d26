"""`token-broker dev`: a local OAuth server, an echo API, a store, two apps and one client.

App `demo` (client credentials) serves tokens at once and proxies to the echo API; app
`demo-scim` (authorization code) waits for `token-broker authorize`, which needs the shared
store: with `--redis URL` the dev broker uses it and writes its config (`dev.yaml`) for
`authorize` to read. `--socket PATH` serves the API on a unix socket with the current user
mapped to the client.

`--oauth-only` runs just the local OAuth server, with the files `examples/local.yaml` reads, so
`serve` can be tried on a laptop against a local Redis before pointing it at a real provider.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shlex
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from broker.app import Broker, serve
from broker.config import load_config
from broker.devserver import DevOAuthServer
from broker.errors import ListenError

DEV_APP = "demo"
# The authorization-code app: onboarded with `token-broker authorize`, as in production.
DEV_CODE_APP = "demo-scim"
DEV_CLIENT = "demo-client"
# The OAuth server's port with --oauth-only: examples/local.yaml's token_url names it.
OAUTH_ONLY_PORT = 8412
# Keys of a dev broker on a shared Redis: apart from any real fleet's.
DEV_KEY_PREFIX = "token-broker-dev"

# Files in the dev directory.
CLIENT_ID_FILE = "client_id"
CLIENT_SECRET_FILE = "client_secret"
CLIENT_KEY_FILE = "client.key"
STORE_KEY_FILE = "store.key"
CONFIG_FILE = "dev.yaml"


def dev_config(
    *,
    oauth: DevOAuthServer,
    client_id: str,
    listen: str,
    store_url: str,
    echo_url: str,
    peer_uid: int | None,
) -> dict[str, Any]:
    """The dev broker's config file: app `demo` (client credentials, proxied to the echo API)
    and, on a shared store, app `demo-scim` (authorization code, not required) on the local
    server; client `demo-client` (its key file; and the current user, over a unix socket)."""
    refresh = {"min_remaining": 10, "safety_margin": 5}
    common = {
        "token_url": oauth.token_url,
        "client_id": client_id,
        "client_secret_file": CLIENT_SECRET_FILE,
        "client_auth": "client_secret_post",
        "refresh": refresh,
    }
    store: dict[str, Any] = {"url": store_url}
    apps: dict[str, Any] = {
        DEV_APP: {
            **common,
            "scopes": ["demo.read"],
            # The echo API listens on loopback, which the egress guard refuses unless allowed.
            "proxy": {"upstream": echo_url, "allowed_networks": ["127.0.0.0/8"]},
        }
    }
    # An authorization-code app needs the shared store `authorize` writes to (memory:// is
    # refused for one): only with --redis.
    if not store_url.startswith("memory://"):
        store.update(key_prefix=DEV_KEY_PREFIX, encryption_key_file=STORE_KEY_FILE)
        apps[DEV_CODE_APP] = {
            **common,
            "grant_type": "authorization_code",
            # Not required: the broker is ready before anyone has onboarded it.
            "required": False,
            "authorize_url": oauth.authorize_url,
            "redirect_uri": oauth.redirect_uri,
            "scopes": ["scim", "offline_access"],
        }
    client: dict[str, Any] = {"key_file": CLIENT_KEY_FILE, "apps": sorted(apps)}
    if peer_uid is not None:
        client["uids"] = [peer_uid]
    return {
        "server": {"listen": listen, "metrics_listen": "127.0.0.1:0"},
        "store": store,
        "apps": apps,
        "clients": {DEV_CLIENT: client},
    }


async def run_dev(
    workdir: Path,
    *,
    port: int,
    lifetime: float,
    oauth_port: int = 0,
    redis_url: str | None = None,
    socket_path: Path | None = None,
) -> None:
    """Start the local OAuth server, an echo API and a broker in front of them; print how to
    call each path (token, proxy, authorization code). `socket_path` is absolute."""
    client_id = "dev-" + secrets.token_hex(8)
    client_secret = secrets.token_urlsafe(32)
    client_key = secrets.token_urlsafe(32)
    _write_private(workdir / CLIENT_SECRET_FILE, client_secret)
    _write_private(workdir / CLIENT_KEY_FILE, client_key)
    if redis_url is not None:
        _write_private(workdir / STORE_KEY_FILE, _new_store_key() + "\n")

    oauth = DevOAuthServer(client_id=client_id, client_secret=client_secret, lifetime=lifetime)
    token_url = await _start_oauth(oauth, oauth_port)
    echo = EchoUpstream(oauth)
    try:
        echo_url = await echo.start()
        listen = f"unix:{socket_path}" if socket_path else f"127.0.0.1:{port}"
        document = dev_config(
            oauth=oauth,
            client_id=client_id,
            listen=listen,
            store_url=redis_url or "memory://",
            echo_url=echo_url,
            peer_uid=os.getuid() if socket_path else None,
        )
        config_path = workdir / CONFIG_FILE
        config_path.write_text(yaml.safe_dump(document, sort_keys=False))
        config = load_config(config_path)

        async def banner(broker: Broker) -> None:
            print(
                dev_banner(
                    api=broker.api_addresses[0],
                    metrics=broker.metrics_addresses[0],
                    token_url=token_url,
                    echo_url=echo_url,
                    lifetime=lifetime,
                    client_key=client_key,
                    key_file=workdir / CLIENT_KEY_FILE,
                    config_file=config_path if redis_url is not None else None,
                ),
                flush=True,
            )

        await serve(config, ready=banner)
    finally:
        await echo.stop()
        await oauth.stop()


def dev_banner(
    *,
    api: str,
    metrics: str,
    token_url: str,
    lifetime: float,
    client_key: str,
    key_file: Path,
    echo_url: str = "",
    config_file: Path | None = None,
) -> str:
    """What `dev` prints once it listens: what runs where, and how to try every path at once.

    `api` is `http://host:port` or `unix:/path` (then the current user needs no key);
    `config_file` is the dev config on a shared store, which `authorize` can use (None: the
    store is memory://, which `authorize` cannot write to).
    """
    unix = api.startswith("unix:")
    if unix:
        socket = shlex.quote(api.removeprefix("unix:"))
        curl = f"curl -s --unix-socket {socket} http://localhost"
        who = f"{DEV_CLIENT} (key below, or as your user: uid {os.getuid()} is mapped)"
    else:
        curl = f"curl -s -H 'Authorization: Bearer {client_key}' {api}"
        who = DEV_CLIENT
    store = "a shared Redis store" if config_file is not None else "tokens kept in memory only"
    lines = [
        "",
        f"token-broker dev is running: DEV MODE, {store}, a throwaway",
        "local OAuth server. Not for production (use `token-broker serve --config FILE`).",
        "",
        f"  API:           {api}  (/v1/token/{DEV_APP}, /v1/apps)",
        f"  OpenAPI:       {api}/openapi.json",
        f"  health:        {metrics}/healthz",
        f"  readiness:     {metrics}/readyz",
        f"  metrics:       {metrics}/metrics",
        f"  OAuth server:  {token_url}  (tokens live {lifetime:g} s)",
        f"  echo API:      {echo_url}  (app {DEV_APP}'s proxy upstream)",
        f"  client:        {who}",
        f"  client key:    {client_key}",
        f"  key file:      {key_file}",
        "",
        "Get a token with curl:",
        f"  {curl}/v1/token/{DEV_APP}",
        "",
        "Call an API through the injecting proxy (the echo API says if its token was valid):",
        f"  {curl}/v1/proxy/{DEV_APP}/hello",
        "",
        "or with token-broker, in another shell:",
        f"  export TOKEN_BROKER_URL={api}",
    ]
    if not unix:
        lines.append(f"  export TOKEN_BROKER_KEY_FILE={shlex.quote(str(key_file))}")
    lines += [f"  token-broker token {DEV_APP}", ""]
    if config_file is not None:
        lines += [
            f"Onboard the authorization-code app {DEV_CODE_APP}, in another shell:",
            f"  token-broker authorize {DEV_CODE_APP} --config {shlex.quote(str(config_file))}",
            "  (open the URL it prints; the page you land on shows the URL to paste back)",
            f"  {curl}/v1/token/{DEV_CODE_APP}",
            "",
        ]
    else:
        lines += [
            f"{DEV_CODE_APP} (authorization code) waits for `token-broker authorize`, which writes",
            "to the shared store: start dev with --redis redis://127.0.0.1:6379/0 to try it.",
            "",
        ]
    lines += ["Press Ctrl-C to stop.", ""]
    return "\n".join(lines)


class EchoUpstream:
    """A local API for the proxy example: answers what it received, and whether the bearer
    token is one the dev OAuth server issued (never the token itself)."""

    def __init__(self, oauth: DevOAuthServer) -> None:
        self._oauth = oauth
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Listen on a free loopback port; returns the origin."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _echo(self, request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        claims = self._oauth.verify(token) if scheme == "Bearer" else None
        return web.json_response(
            {
                "echo": "token-broker dev",
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "bearer_token_valid": claims is not None,
                "token_scope": claims.get("scope") if claims else None,
                "traceparent": request.headers.get("traceparent"),
            }
        )


async def run_oauth_only(workdir: Path, *, port: int, lifetime: float) -> None:
    """Run only the local OAuth server; write what `examples/local.yaml` needs into `workdir`.

    The client id and secret are kept when `workdir` holds them already, so a broker that reads
    them keeps working across restarts of this server. A client key and a store key are written
    for the broker's side when missing.
    """
    client_id, client_secret = prepare_oauth_only_dir(workdir)
    oauth = DevOAuthServer(client_id=client_id, client_secret=client_secret, lifetime=lifetime)
    token_url = await _start_oauth(oauth, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        print(oauth_only_banner(token_url, client_id, workdir, lifetime), flush=True)
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await oauth.stop()


def oauth_only_banner(token_url: str, client_id: str, workdir: Path, lifetime: float) -> str:
    """What `dev --oauth-only` prints: the token endpoint, the client and the files written."""
    d = workdir
    return "\n".join(
        [
            "",
            "token-broker dev --oauth-only is running: DEV MODE, a throwaway local OAuth server",
            "(client_credentials, HS256 JWTs). Not for production.",
            "",
            f"  token endpoint:  {token_url}  (tokens live {lifetime:g} s)",
            f"  client id:       {client_id}  (in {d / CLIENT_ID_FILE})",
            f"  client secret:   in {d / CLIENT_SECRET_FILE}",
            f"  for the broker:  client key {d / CLIENT_KEY_FILE}, store key {d / STORE_KEY_FILE}",
            "",
            "With Redis on 127.0.0.1:6379, in another shell (examples/local.yaml reads these files",
            "from examples/local-secrets/):",
            "  token-broker serve --config examples/local.yaml",
            f"  TOKEN_BROKER_KEY_FILE={shlex.quote(str(d / CLIENT_KEY_FILE))} "
            f"token-broker token {DEV_APP}",
            "",
            "Press Ctrl-C to stop.",
            "",
        ]
    )


async def _start_oauth(oauth: DevOAuthServer, port: int) -> str:
    try:
        return await oauth.start(port=port)
    except OSError as exc:
        address = f"127.0.0.1:{port}"
        raise ListenError("--oauth-port", address, exc.strerror or str(exc)) from None


def prepare_oauth_only_dir(workdir: Path) -> tuple[str, str]:
    """Fill `workdir` with what `--oauth-only` serves and the broker reads; (client id, secret)."""
    workdir.mkdir(parents=True, exist_ok=True)
    client_id = _read_or_create(workdir / CLIENT_ID_FILE, lambda: "dev-" + secrets.token_hex(8))
    client_secret = _read_or_create(workdir / CLIENT_SECRET_FILE, lambda: secrets.token_urlsafe(32))
    _read_or_create(workdir / CLIENT_KEY_FILE, lambda: secrets.token_urlsafe(32))
    _read_or_create(workdir / STORE_KEY_FILE, _new_store_key)
    return client_id, client_secret


def _new_store_key() -> str:
    return f"dev1 {base64.b64encode(secrets.token_bytes(32)).decode()}"


def _read_or_create(path: Path, make: Callable[[], str]) -> str:
    """The file's stripped text, or a new value written to it (readable by this user only)."""
    if path.exists() and (kept := path.read_text().strip()):
        return kept
    value = make()
    _write_private(path, value + "\n")
    return value


def _write_private(path: Path, text: str) -> None:
    """Write a secret file readable only by this user."""
    path.touch(mode=0o600)
    path.write_text(text)

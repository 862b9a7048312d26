"""`token-broker dev`: a local OAuth server, an in-memory store, one app and one client.

`--oauth-only` runs just the local OAuth server, with the files `examples/local.yaml` reads, so
`serve` can be tried on a laptop against a local Redis before pointing it at a real provider.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import shlex
import signal
from collections.abc import Callable
from pathlib import Path

from broker.app import Broker, serve
from broker.devserver import DevOAuthServer
from broker.errors import ListenError
from broker.model import (
    AppSpec,
    ClientAuth,
    ClientSpec,
    Config,
    RefreshPolicy,
    ServerSpec,
    StoreSpec,
)

DEV_APP = "demo"
DEV_CLIENT = "demo-client"
# The OAuth server's port with --oauth-only: examples/local.yaml's token_url names it.
OAUTH_ONLY_PORT = 8412

# Files in the dev directory.
CLIENT_ID_FILE = "client_id"
CLIENT_SECRET_FILE = "client_secret"
CLIENT_KEY_FILE = "client.key"
STORE_KEY_FILE = "store.key"


def dev_config(workdir: Path, *, token_url: str, client_id: str, port: int) -> Config:
    """The dev broker's config: app `demo` against the local server, client `demo-client`."""
    return Config(
        server=ServerSpec(listen=f"127.0.0.1:{port}", metrics_listen="127.0.0.1:0"),
        store=StoreSpec(url="memory://"),
        apps={
            DEV_APP: AppSpec(
                name=DEV_APP,
                token_url=token_url,
                client_id=client_id,
                client_secret_file=workdir / CLIENT_SECRET_FILE,
                client_auth=ClientAuth.CLIENT_SECRET_POST,
                scopes=("demo.read",),
                refresh=RefreshPolicy(min_remaining=10.0, safety_margin=5.0),
            )
        },
        clients={
            DEV_CLIENT: ClientSpec(
                name=DEV_CLIENT, apps=(DEV_APP,), key_files=(workdir / CLIENT_KEY_FILE,)
            )
        },
    )


async def run_dev(workdir: Path, *, port: int, lifetime: float, oauth_port: int = 0) -> None:
    """Start the local OAuth server and a broker in front of it; print how to call it."""
    client_id = "dev-" + secrets.token_hex(8)
    client_secret = secrets.token_urlsafe(32)
    client_key = secrets.token_urlsafe(32)
    _write_private(workdir / CLIENT_SECRET_FILE, client_secret)
    _write_private(workdir / CLIENT_KEY_FILE, client_key)

    oauth = DevOAuthServer(client_id=client_id, client_secret=client_secret, lifetime=lifetime)
    token_url = await _start_oauth(oauth, oauth_port)
    config = dev_config(workdir, token_url=token_url, client_id=client_id, port=port)

    async def banner(broker: Broker) -> None:
        print(
            dev_banner(
                api=broker.api_addresses[0],
                metrics=broker.metrics_addresses[0],
                token_url=token_url,
                lifetime=lifetime,
                client_key=client_key,
                key_file=workdir / CLIENT_KEY_FILE,
            ),
            flush=True,
        )

    try:
        await serve(config, ready=banner)
    finally:
        await oauth.stop()


def dev_banner(
    *, api: str, metrics: str, token_url: str, lifetime: float, client_key: str, key_file: Path
) -> str:
    """What `dev` prints once it listens: what runs where, and how to get a token at once."""
    return "\n".join(
        [
            "",
            "token-broker dev is running: DEV MODE, tokens kept in memory only, a throwaway",
            "local OAuth server. Not for production (use `token-broker serve --config FILE`).",
            "",
            f"  API:           {api}  (/v1/token/{DEV_APP}, /v1/apps)",
            f"  OpenAPI:       {api}/openapi.json",
            f"  health:        {metrics}/healthz",
            f"  readiness:     {metrics}/readyz",
            f"  metrics:       {metrics}/metrics",
            f"  OAuth server:  {token_url}  (tokens live {lifetime:g} s)",
            f"  client:        {DEV_CLIENT}",
            f"  client key:    {client_key}",
            f"  key file:      {key_file}",
            "",
            "Get a token with curl:",
            f"  curl -s -H 'Authorization: Bearer {client_key}' {api}/v1/token/{DEV_APP}",
            "",
            "or with token-broker, in another shell:",
            f"  export TOKEN_BROKER_URL={api}",
            f"  export TOKEN_BROKER_KEY_FILE={shlex.quote(str(key_file))}",
            f"  token-broker token {DEV_APP}",
            "",
            "Press Ctrl-C to stop.",
            "",
        ]
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

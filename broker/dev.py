"""`token-broker dev`: a local OAuth server, an in-memory store, one app and one client."""

from __future__ import annotations

import secrets
from pathlib import Path

from broker.app import Broker, serve
from broker.devserver import DevOAuthServer
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
                client_secret_file=workdir / "client_secret",
                client_auth=ClientAuth.CLIENT_SECRET_POST,
                scopes=("demo.read",),
                refresh=RefreshPolicy(min_remaining=10.0, safety_margin=5.0),
            )
        },
        clients={
            DEV_CLIENT: ClientSpec(
                name=DEV_CLIENT, apps=(DEV_APP,), key_files=(workdir / "client.key",)
            )
        },
    )


async def run_dev(workdir: Path, *, port: int, lifetime: float) -> None:
    """Start the local OAuth server and a broker in front of it; print how to call it."""
    client_id = "dev-" + secrets.token_hex(8)
    client_secret = secrets.token_urlsafe(32)
    client_key = secrets.token_urlsafe(32)
    _write_private(workdir / "client_secret", client_secret)
    _write_private(workdir / "client.key", client_key)

    oauth = DevOAuthServer(client_id=client_id, client_secret=client_secret, lifetime=lifetime)
    token_url = await oauth.start()
    config = dev_config(workdir, token_url=token_url, client_id=client_id, port=port)

    async def banner(broker: Broker) -> None:
        api = f"http://127.0.0.1:{port}"
        metrics = broker.metrics_addresses[0] if broker.metrics_addresses else "?"
        print(
            "\n".join(
                [
                    "",
                    "token-broker dev is running.",
                    f"  OAuth server (local):  {token_url}  (tokens live {lifetime:g} s)",
                    f"  API:                   {api}",
                    f"  metrics:               {metrics}/metrics",
                    f"  client:                {DEV_CLIENT}",
                    f"  client key:            {client_key}",
                    "",
                    "Get a token:",
                    f"  curl -s -H 'Authorization: Bearer {client_key}' {api}/v1/token/{DEV_APP}",
                    "",
                    "Press Ctrl-C to stop.",
                    "",
                ]
            ),
            flush=True,
        )

    try:
        await serve(config, ready=banner)
    finally:
        await oauth.stop()


def _write_private(path: Path, text: str) -> None:
    """Write a secret file readable only by this user."""
    path.touch(mode=0o600)
    path.write_text(text)

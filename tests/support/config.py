"""One config builder for the tests: a valid YAML config and the secret files it names.

`write_config(directory, app=..., store=..., files=...)` writes a config with one app
(`twilio`, client_credentials), one client (`billing`, by key file) and a Redis store, and the
secret files beside it (random values unless `files` names them); every part can be overridden.
`config_document` gives the same document unwritten, for tests that mutate it; `edit_config`
changes a written config (any config.yaml, a BrokerFiles one too) in place.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

Document = dict[str, Any]

TOKEN_URL = "https://oauth.twilio.com/v2/token"
CLIENT_ID = "OQ123"
REDIS_STORE: Mapping[str, Any] = {
    "url": "redis://127.0.0.1:6379/0",
    "encryption_key_file": "store.key",
}
MEMORY_STORE: Mapping[str, Any] = {"url": "memory://"}
# The settings that make `twilio` an authorization_code app.
AUTHORIZATION_CODE: Mapping[str, Any] = {
    "grant_type": "authorization_code",
    "authorize_url": "https://oauth.twilio.com/v2/authorize",
    "redirect_uri": "https://example.com/token",
}


def random_store_key() -> str:
    """A store key file's line: key id `k1` and 32 random bytes."""
    return f"k1 {base64.b64encode(secrets.token_bytes(32)).decode()}"


def config_document(
    *,
    app: Mapping[str, Any] | None = None,
    store: Mapping[str, Any] | None = REDIS_STORE,
    **sections: Any,
) -> Document:
    """The document: app `twilio` with `app`'s keys over the defaults, client `billing`, the
    `store` section (None: no store section) and any further top-level `sections`."""
    document: Document = {
        "apps": {
            "twilio": {
                "token_url": TOKEN_URL,
                "client_id": CLIENT_ID,
                "client_secret_file": "app.secret",
                **(app or {}),
            }
        },
        "clients": {"billing": {"key_file": "client.key", "apps": ["twilio"]}},
    }
    if store is not None:
        document["store"] = dict(store)
    document.update(sections)
    return document


def write_secrets(directory: Path, files: Mapping[str, str] | None = None) -> None:
    """The files the default document names (`app.secret`, `client.key`, `store.key`) with
    random values, and `files` (name -> content) over them; each ends in a newline."""
    defaults = {
        "app.secret": secrets.token_urlsafe(24),
        "client.key": secrets.token_urlsafe(32),
        "store.key": random_store_key(),
    }
    for name, text in {**defaults, **(files or {})}.items():
        (directory / name).write_text(text + "\n")


def write_document(directory: Path, document: object) -> Path:
    """`document` as `config.yaml` in `directory` (a string is written as it is)."""
    path = directory / "config.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return path


def write_config(
    directory: Path,
    *,
    app: Mapping[str, Any] | None = None,
    store: Mapping[str, Any] | None = REDIS_STORE,
    files: Mapping[str, str] | None = None,
    **sections: Any,
) -> Path:
    """Write the secret files and the config (see `config_document`); return the config's path."""
    write_secrets(directory, files)
    return write_document(directory, config_document(app=app, store=store, **sections))


def edit_config(path: Path, change: Callable[[Document], object]) -> Path:
    """Load the config at `path`, let `change` edit the document in place, write it back."""
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path

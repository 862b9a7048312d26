"""Caller authentication: client keys compared as SHA-256 digests, in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.errors import ConfigError
from broker.logs import SECRETS, get_logger
from broker.model import ClientSpec

log = get_logger(__name__)


def key_digest(key: str) -> bytes:
    """SHA-256 of a client key (what is kept in memory and compared)."""
    return hashlib.sha256(key.encode()).digest()


@dataclass
class _KeyFile:
    path: Path
    key: str
    signature: tuple[int, int, int] | None = None
    digest: bytes = b""


class ClientAuthenticator:
    """Maps a presented bearer key to a configured client; knows which apps each may use.

    Only digests are kept. Key files are re-read when they change (`reload_changed`), so a
    client key is rotated by writing the new key file while the previous one stays configured.
    """

    def __init__(self, clients: Mapping[str, ClientSpec]) -> None:
        self.replace(clients)

    def replace(self, clients: Mapping[str, ClientSpec]) -> None:
        """Take a new set of clients (config reload); raises ConfigError, keeping the old set."""
        previous = getattr(self, "_table", None)
        self._load(clients)
        if previous is not None:
            log.info("clients.reloaded", clients=sorted(clients))

    def _load(self, clients: Mapping[str, ClientSpec]) -> None:
        files: dict[str, list[_KeyFile]] = {}
        inline: dict[str, list[bytes]] = {}
        for name, spec in clients.items():
            inline[name] = [bytes.fromhex(d) for d in spec.key_sha256]
            files[name] = [_KeyFile(path, f"clients.{name}.key_file") for path in spec.key_files]
            for key_file in files[name]:
                if not _load(key_file):
                    raise ConfigError(key_file.key, f"cannot read the key in {key_file.path}")
        self._clients = dict(clients)
        self._files = files
        self._inline = inline
        self._allowed = {name: frozenset(spec.apps) for name, spec in self._clients.items()}
        self._rebuild()

    def _rebuild(self) -> None:
        # Counts every change of keys or grants, so a cache of decisions knows to start over.
        self.generation = getattr(self, "generation", 0) + 1
        table: list[tuple[bytes, str]] = []
        for name in self._clients:
            table.extend((digest, name) for digest in self._inline[name])
            table.extend((f.digest, name) for f in self._files[name] if f.digest)
        self._table = table

    def identify(self, authorization: str | None) -> str | None:
        """The client whose key is presented as `Bearer <key>`, or None."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        presented = key_digest(key.strip())
        found: str | None = None
        # Compare against every digest, without stopping at a match.
        for digest, name in self._table:
            if hmac.compare_digest(presented, digest):
                found = name
        return found

    def allowed(self, client: str, app: str) -> bool:
        """True when `client` may ask for tokens of `app`."""
        return app in self._allowed.get(client, frozenset())

    def apps_of(self, client: str) -> frozenset[str]:
        """The apps `client` may use."""
        return self._allowed.get(client, frozenset())

    def reload_changed(self) -> list[str]:
        """Re-read key files that changed; returns the clients whose keys changed."""
        changed = []
        for name, files in self._files.items():
            if any(_load(f) is True for f in files):
                changed.append(name)
        if changed:
            self._rebuild()
        return changed


def _load(key_file: _KeyFile) -> bool | None:
    """(Re-)read a key file. True: new key; None: unchanged; False: unreadable (old key kept)."""
    try:
        st = os.stat(key_file.path)
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature == key_file.signature:
            return None
        key = key_file.path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        log.warning("client_key.reload_failed", file=key_file.key)
        return False
    key_file.signature = signature
    if len(key) < 32:
        log.warning("client_key.reload_failed", file=key_file.key, reason="shorter than 32")
        return False
    SECRETS.add(key)
    digest = key_digest(key)
    if digest == key_file.digest:
        return None
    key_file.digest = digest
    return True

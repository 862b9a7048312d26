"""Caller authentication: client keys compared as SHA-256 digests, in constant time, and the
peer credentials (uid, gid) of unix-socket connections.

Precedence: a request that carries `Authorization` is judged by its key alone (a wrong key is a
401 even from a mapped uid). Only a request without `Authorization`, on the unix socket, is
identified by its peer: a client listing the peer's uid, else one listing its gid.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import re
import socket
import struct
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.errors import ConfigError
from broker.logs import SECRETS, get_logger
from broker.model import ClientSpec

log = get_logger(__name__)

# struct ucred: pid_t pid, uid_t uid, gid_t gid.
_UCRED = struct.Struct("iII")


# A Twilio Account SID (AC...) or API key SID (SK...): 34 characters.
_TWILIO_SID = re.compile(r"^(AC|SK)[0-9a-fA-F]{32}$")
# An auth-scheme as RFC 9110 writes it (a token), short enough to repeat in a message.
_SCHEME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}$")
_JWT = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


def unauthorized_message(authorization: str | None, *, peer_identity: bool) -> str:
    """The 401's message: what the request carried (never the secret) and what to send instead.

    Old code often still sends the provider's own credentials (Twilio's SID and auth token as
    HTTP Basic); the caller learns that the broker takes none and what it takes.
    """
    send = "send the client key as 'Authorization: Bearer <client key>'" + (
        " (or no Authorization header at all, from a uid or gid mapped to a client)"
        if peer_identity
        else ""
    )
    if not authorization or not authorization.strip():
        return f"a valid client key is required: {send}"
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "basic":
        sid = _twilio_sid_kind(credentials.strip())
        if sid is not None:
            return (
                f"this request carries Twilio credentials (HTTP Basic with {sid} as the user "
                "name); the broker takes none and holds the app's OAuth credentials itself. "
                f"Remove the Twilio credentials from the service and {send}"
            )
        return (
            "this request carries HTTP Basic credentials ('Authorization: Basic ...'), which the "
            f"broker does not take: {send}"
        )
    if scheme.lower() == "bearer":
        if _JWT.match(credentials.strip()):
            return (
                "this request carries a JWT as its bearer key: an access token goes to the API, "
                f"not to the broker (the broker adds the app's own); {send}"
            )
        return f"the bearer key is not a configured client key: {send}"
    shown = f"the '{scheme}' scheme" if _SCHEME.match(scheme) else "a scheme it cannot read"
    return f"this request carries an Authorization header of {shown}: {send}"


def _twilio_sid_kind(credentials: str) -> str | None:
    """ "an Account SID (AC...)" or "an API key SID (SK...)" when HTTP Basic credentials have
    one as the user name, else None."""
    try:
        user = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None
    if not _TWILIO_SID.match(user):
        return None
    return "an Account SID (AC...)" if user.startswith("AC") else "an API key SID (SK...)"


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
        self._by_uid = {uid: name for name, spec in clients.items() for uid in spec.uids}
        self._by_gid = {gid: name for name, spec in clients.items() for gid in spec.gids}
        if (self._by_uid or self._by_gid) and not hasattr(socket, "SO_PEERCRED"):
            raise ConfigError("clients", "uids and gids need SO_PEERCRED (Linux)")
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

    @property
    def uses_peer_identity(self) -> bool:
        """True when some client is identified by uid or gid."""
        return bool(self._by_uid or self._by_gid)

    def identify_peer(self, uid: int, gid: int) -> str | None:
        """The client mapped to a unix-socket peer: by its uid first, else by its (primary) gid."""
        return self._by_uid.get(uid) or self._by_gid.get(gid)

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


class PeerCredentials:
    """The uid and gid of the process at the other end of a unix-socket connection.

    The kernel records them at connect() (SO_PEERCRED), so they are read once per connection
    and kept while the connection lives. A TCP connection has none: an address in a pod's
    shared network namespace says nothing about who is calling.
    """

    def __init__(self) -> None:
        self._known: weakref.WeakKeyDictionary[asyncio.BaseTransport, tuple[int, int]] = (
            weakref.WeakKeyDictionary()
        )

    def of(self, transport: asyncio.BaseTransport | None) -> tuple[int, int] | None:
        """(uid, gid) of the peer on `transport`, or None when it is not a unix socket."""
        if transport is None:
            return None
        known = self._known.get(transport)
        if known is not None:
            return known
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            return None
        _, uid, gid = _UCRED.unpack(raw)
        self._known[transport] = (uid, gid)
        return uid, gid


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

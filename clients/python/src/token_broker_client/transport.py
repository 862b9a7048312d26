"""HTTP to the broker over TCP or its unix socket, with the standard library alone.

`BrokerEndpoint` is where the broker is and which client key to send: `http://host:port` or
`unix:/path/to/api.sock`, read from the arguments or, as `token-broker token` does, from
`TOKEN_BROKER_URL`, `TOKEN_BROKER_KEY_FILE` and `TOKEN_BROKER_KEY`. Each thread keeps one
connection alive, so a busy caller pays for `connect()` once.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from token_broker_client.errors import BrokerUnreachable

DEFAULT_URL = "http://127.0.0.1:8411"


@dataclass(frozen=True)
class Answer:
    """One answer of the broker: status, headers (names in lower case) and the whole body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket; the Host header says `localhost`, which the broker accepts."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        """Connect to the socket file instead of a host and port."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class BrokerEndpoint:
    """The broker's address and this client's key (None: rely on peer identity, unix only)."""

    url: str
    key: str | None = field(default=None, repr=False)
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.url.startswith("unix:"):
            if not self.url.removeprefix("unix:"):
                raise ValueError("a unix: broker URL needs a socket path: unix:/path/to/api.sock")
            return
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{self.url!r} is neither http(s)://host:port nor unix:/path")

    @classmethod
    def resolve(
        cls,
        url: str | None = None,
        *,
        key: str | None = None,
        key_file: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
    ) -> BrokerEndpoint:
        """The endpoint from the arguments, else from the environment (as `token-broker token`):
        URL from `TOKEN_BROKER_URL` (default http://127.0.0.1:8411); key from `key`, `key_file`,
        `TOKEN_BROKER_KEY_FILE`, then `TOKEN_BROKER_KEY`. The key file is read once, here."""
        url = url or os.environ.get("TOKEN_BROKER_URL") or DEFAULT_URL
        if key is None:
            key_file = key_file or os.environ.get("TOKEN_BROKER_KEY_FILE") or None
            if key_file is not None:
                key = Path(key_file).read_text().strip()
                if not key:
                    raise ValueError(f"the client key file {key_file} is empty")
            else:
                key = os.environ.get("TOKEN_BROKER_KEY", "").strip() or None
        return cls(url, key, timeout)

    @property
    def is_unix(self) -> bool:
        """True when the broker listens on a unix socket."""
        return self.url.startswith("unix:")

    @property
    def base_path(self) -> str:
        """The URL's path, put in front of every route (usually empty)."""
        return "" if self.is_unix else urlsplit(self.url).path.rstrip("/")

    def auth_headers(self) -> dict[str, str]:
        """`Authorization: Bearer <client key>`, or nothing when no key is configured."""
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def connect(self, timeout: float | None = None) -> http.client.HTTPConnection:
        """A new (not yet connected) connection to the broker."""
        timeout = self.timeout if timeout is None else timeout
        if self.is_unix:
            return _UnixConnection(self.url.removeprefix("unix:"), timeout)
        parts = urlsplit(self.url)
        kind = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        return kind(parts.hostname or "", parts.port, timeout=timeout)


class BrokerTransport:
    """Sends requests to one broker, one kept-alive connection per thread."""

    def __init__(self, endpoint: BrokerEndpoint) -> None:
        self.endpoint = endpoint
        self._local = threading.local()

    def request(
        self,
        method: str,
        target: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> Answer:
        """Send one request (`target` is the path and query under the broker's URL).

        The client key goes in `Authorization` unless `headers` has its own. A kept-alive
        connection the broker closed in the meantime is replaced and the request sent once
        more, but only when nothing of the answer arrived (the broker had not taken it).
        Raises BrokerUnreachable when the broker cannot be reached or answers no HTTP.
        """
        sent_headers = {**self.endpoint.auth_headers(), **(headers or {})}
        path = self.endpoint.base_path + target
        for attempt in (1, 2):
            connection, reused = self._connection(timeout)
            try:
                connection.request(method, path, body=body, headers=sent_headers)
                response = connection.getresponse()
                answer = Answer(
                    response.status,
                    {name.lower(): value for name, value in response.getheaders()},
                    response.read(),
                )
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if reused and attempt == 1:
                    continue
                raise BrokerUnreachable(self._why(exc)) from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise BrokerUnreachable(self._why(exc)) from None
            if response.will_close:
                self.close()
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close this thread's connection (the next request opens a new one)."""
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()

    def _connection(self, timeout: float | None) -> tuple[http.client.HTTPConnection, bool]:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is not None and (timeout is None or timeout == connection.timeout):
            return connection, True
        self.close()
        connection = self._local.connection = self.endpoint.connect(timeout)
        return connection, False

    def _why(self, exc: BaseException) -> str:
        # The URL is no secret; the key never appears in an exception of this library.
        return f"cannot reach the broker at {self.endpoint.url}: {type(exc).__name__}: {exc}"

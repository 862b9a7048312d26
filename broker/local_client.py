"""A minimal client of a running broker's API, over TCP or its unix socket (`token-broker token`).

Over the unix socket a key is optional: a caller whose uid or gid a client maps is identified by
the kernel's peer credentials.
"""

from __future__ import annotations

import http.client
import socket
from typing import NamedTuple
from urllib.parse import quote, urlsplit


class BrokerAnswer(NamedTuple):
    """The broker's answer: status, body, and its Retry-After header if any."""

    status: int
    body: bytes
    retry_after: str | None


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the Host header says localhost, which the API accepts)."""

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


def is_unix_url(url: str) -> bool:
    """True for `unix:/path/to/api.sock`."""
    return url.startswith("unix:")


def get_token(
    url: str, app: str, *, key: str | None, min_ttl: int | None = None, timeout: float = 10.0
) -> BrokerAnswer:
    """GET /v1/token/{app} from the broker at `url` (http(s)://host:port or unix:/path).

    Returns the status, body and Retry-After; raises OSError when the broker cannot be reached and
    ValueError for a URL that is neither.
    """
    target = f"/v1/token/{quote(app, safe='')}"
    if min_ttl is not None:
        target += f"?min_ttl={min_ttl}"
    connection: http.client.HTTPConnection
    if is_unix_url(url):
        connection = _UnixConnection(url.removeprefix("unix:"), timeout)
    else:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is neither http(s)://host:port nor unix:/path")
        kind = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        connection = kind(parts.hostname, parts.port, timeout=timeout)
        target = parts.path.rstrip("/") + target
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        return BrokerAnswer(response.status, response.read(), response.getheader("Retry-After"))
    except http.client.HTTPException as exc:
        raise OSError(f"bad answer from the broker: {type(exc).__name__}") from None
    finally:
        connection.close()

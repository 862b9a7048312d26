"""The token route's answers, cached per app: the JSON body and the whole HTTP message.

`GET /v1/token/{app}` answers the same bytes to every caller of an app until the token changes
or one of its whole seconds (`expires_in`, `expires_at`) does, so the answer is kept per app and
reused while it holds. An answer records the monotonic time until which it holds: the earlier
of the token's serving deadline and the next whole-second change of `expires_in`, both computed
by the full check (the token service's) when the answer is built. That check runs again at least
once per second per app; in between, a request costs one clock read, one comparison and a check
that the service still holds the same token object. A step of a clock (wall time, or the fleet's
offset) is therefore seen within the second, at the next full check.

A keep-alive HTTP/1.1 request is answered with `PrebuiltResponse`: the status line, headers and
body as one block of bytes, written with the response writer's own `write_eof`, instead of
aiohttp assembling a header dictionary and serializing it per request. The block has exactly the
headers aiohttp would write for the same `web.Response` (tested byte for byte, but for `Date`).
Any other request (HTTP/1.0, `Connection: close`) gets an ordinary `web.Response`.
"""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11

from broker.api.errors import NO_STORE
from broker.model import TokenSet

TOKEN_HEADERS = {**NO_STORE, "Content-Type": "application/json"}
# The header block before Content-Length, in the order aiohttp writes a web.Response's headers:
# the response's own, then Content-Length, Date and Server.
_HEAD = (
    "HTTP/1.1 200 OK\r\n" + "".join(f"{name}: {value}\r\n" for name, value in TOKEN_HEADERS.items())
).encode()
_SERVER = f"\r\nServer: {SERVER_SOFTWARE}\r\n\r\n".encode()


class PrebuiltResponse(web.StreamResponse):
    """A 200 to a keep-alive HTTP/1.1 request, written as one prebuilt block of bytes.

    Its `headers` mapping stays empty: the headers are inside the block.
    """

    def __init__(self, message: bytes) -> None:
        super().__init__()
        self._message = message

    @property
    def keep_alive(self) -> bool:
        """Always: it answers only requests that keep the connection open."""
        return True

    async def prepare(self, request: web.BaseRequest) -> None:
        """Write the whole message (aiohttp's server calls `prepare`, then `write_eof`)."""
        if self._message:
            message, self._message = self._message, b""
            await request.writer.write_eof(message)

    async def write_eof(self, data: bytes = b"") -> None:
        """Nothing left to write: `prepare` wrote the message and ended it."""


class Answer:
    """An app's current token, the clients it went to, and its answer while it holds."""

    __slots__ = ("body", "date", "expires", "issued_to", "message", "token", "until")

    def __init__(self, token: TokenSet) -> None:
        self.token = token
        self.issued_to: set[str] = set()
        # (expires_in, expires_at) of `body`: it is reused while both whole seconds hold.
        self.expires: tuple[int, int] | None = None
        self.body = b""
        # The monotonic time until which `body` is the answer (-inf: check in full first).
        self.until = float("-inf")
        # `body` as a whole HTTP message, and the Date it carries.
        self.date = ""
        self.message = b""

    def update(self, expires_in: int, expires_at: int, until: float) -> None:
        """Answer with these whole seconds until the monotonic time `until`."""
        self.until = until
        if (expires_in, expires_at) == self.expires:
            return
        self.expires = (expires_in, expires_at)
        token = self.token
        self.body = json.dumps(
            {
                "access_token": token.access_token,
                "token_type": token.token_type,
                "expires_at": expires_at,
                "expires_in": expires_in,
                "scope": token.scope,
            }
        ).encode()
        self.date = ""

    def response(self, request: web.BaseRequest) -> web.StreamResponse:
        """The answer to `request`: prebuilt for keep-alive HTTP/1.1, else a plain Response."""
        if request.version != HttpVersion11 or not request.keep_alive:
            return web.Response(body=self.body, headers=TOKEN_HEADERS)
        date = rfc822_formatted_time()
        if date is not self.date:
            self.date = date
            self.message = (
                b"".join(
                    (
                        _HEAD,
                        b"Content-Length: %d\r\nDate: " % len(self.body),
                        date.encode(),
                        _SERVER,
                    )
                )
                + self.body
            )
        return PrebuiltResponse(self.message)

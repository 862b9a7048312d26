"""The broker's error answers as exceptions: one class per family of the contract's error codes.

Every error answer of the broker is JSON, `{"error": "<code>", "message": "<human text>"}`. The
code picks the class (`ERROR_CLASSES`); a code this library does not know falls back on the
status. `retryable` says whether the same request may succeed later (then `retry_after` is the
broker's `Retry-After`, in seconds, when it sent one). No message ever holds a key or a token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping


class BrokerError(Exception):
    """An error answer of the broker (or no answer at all: `BrokerUnreachable`)."""

    retryable = False

    def __init__(
        self, message: str, *, status: int = 0, code: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        if not self.status:
            return self.message
        text = f"HTTP {self.status} {self.code}: {self.message}"
        if self.retry_after is not None:
            text += f" (retry after {self.retry_after:g} s)"
        return text


class BrokerUnreachable(BrokerError):
    """The broker could not be reached, or its answer was not HTTP or not the contract's JSON."""

    retryable = True


class BadRequest(BrokerError):
    """400 `bad_request` (e.g. `min_ttl` longer than the token's lifetime), 405
    `method_not_allowed` (TRACE or CONNECT through the proxy), 413 `payload_too_large` (a
    proxied body over `max_request_body`), or from the proxy listener 414 `uri_too_long` and
    431 `headers_too_large`."""


class Unauthorized(BrokerError):
    """401 `unauthorized`: no client key, a wrong one, or an unmapped peer on the unix socket."""


class Forbidden(BrokerError):
    """403 `forbidden` (this client may not use the app), `bad_host`, `path_not_allowed` (a
    proxied path outside the app's `path_prefixes`) or `egress_refused` (the upstream's address
    is one the app does not allow)."""


class NotFound(BrokerError):
    """404 `unknown_app` (no such app is configured), `proxy_not_configured`,
    `unknown_upstream` (the app's `proxy.upstreams` has no such name) or `dpop_not_configured`
    (a proof asked for an app without `dpop: true`), or `not_found` (no such route, e.g. a
    path other than /v1/proxy/... on the proxy listener)."""


class NeedsAuthorization(BrokerError):
    """409 `needs_authorization`: an operator must run `token-broker authorize APP` first."""


class DpopBound(BrokerError):
    """409 `dpop_bound`: the app's tokens are DPoP-bound, useless without a proof. Use the
    broker's proxy, or its proof route (`POST /v1/token/{app}/proof`), instead."""


class RateLimited(BrokerError):
    """429 `rate_limited`: too many forced refreshes of this app (ten a minute)."""

    retryable = True


class TokenUnavailable(BrokerError):
    """503 `token_unavailable` (the broker holds no valid token right now), `store_unavailable`
    or `dpop_key_missing` (the key the app's token set is bound to is gone from its key file)."""

    retryable = True


class UpstreamError(BrokerError):
    """The proxy's upstream failed: 502 `upstream_error`, 504 `upstream_timeout`, or 503
    `proxy_busy` (no free slot within `connect_timeout`)."""

    retryable = True


ERROR_CLASSES: Mapping[str, type[BrokerError]] = {
    "bad_request": BadRequest,
    "payload_too_large": BadRequest,
    "method_not_allowed": BadRequest,
    "uri_too_long": BadRequest,
    "headers_too_large": BadRequest,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "bad_host": Forbidden,
    "path_not_allowed": Forbidden,
    "egress_refused": Forbidden,
    "unknown_app": NotFound,
    "proxy_not_configured": NotFound,
    "unknown_upstream": NotFound,
    "dpop_not_configured": NotFound,
    "not_found": NotFound,
    "dpop_bound": DpopBound,
    "needs_authorization": NeedsAuthorization,
    "rate_limited": RateLimited,
    "token_unavailable": TokenUnavailable,
    "store_unavailable": TokenUnavailable,
    "dpop_key_missing": TokenUnavailable,
    "upstream_error": UpstreamError,
    "upstream_timeout": UpstreamError,
    "proxy_busy": UpstreamError,
}

# A code added to the broker after this library still lands in the right family.
_BY_STATUS: Mapping[int, type[BrokerError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: BadRequest,
    409: NeedsAuthorization,
    413: BadRequest,
    414: BadRequest,
    431: BadRequest,
    429: RateLimited,
    502: UpstreamError,
    503: TokenUnavailable,
    504: UpstreamError,
}


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (the broker sends whole seconds; an HTTP date is ignored)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def broker_error_body(body: bytes) -> tuple[str, str] | None:
    """`(code, message)` when `body` is the broker's own error shape, else None.

    The shape is exactly `{"error": str, "message": str}`: an upstream's error passed through
    the proxy (Twilio's carries `code`, `more_info`, `status`) does not match.
    """
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if (
        isinstance(document, dict)
        and set(document) == {"error", "message"}
        and isinstance(document["error"], str)
        and isinstance(document["message"], str)
    ):
        return document["error"], document["message"]
    return None


def error_for(status: int, body: bytes, retry_after: str | None) -> BrokerError:
    """The exception for an error answer of the broker's own API."""
    parsed = broker_error_body(body)
    if parsed is None:
        return BrokerUnreachable(
            f"HTTP {status} from the broker without its JSON error body", status=status
        )
    code, message = parsed
    kind = ERROR_CLASSES.get(code) or _BY_STATUS.get(status, BrokerError)
    return kind(message, status=status, code=code, retry_after=parse_retry_after(retry_after))

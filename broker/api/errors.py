"""The local API's error answers: the contract's JSON body, and the token errors mapped to it."""

from __future__ import annotations

import json

from aiohttp import web

from broker.errors import NeedsAuthorization, RateLimited, TokenUnavailable

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class ApiError(Exception):
    """An error answer of the contract: status, code, message, extra headers."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(exc: ApiError) -> bytes:
    """The contract's JSON error body, encoded."""
    return json.dumps({"error": exc.code, "message": exc.message}).encode()


def error_response(exc: ApiError) -> web.Response:
    """The contract's JSON error answer."""
    return web.Response(
        body=error_body(exc),
        status=exc.status,
        content_type="application/json",
        headers=exc.headers,
    )


TokenServiceError = NeedsAuthorization | RateLimited | TokenUnavailable | ValueError


def token_error(exc: TokenServiceError, app: str, last_error: str | None) -> ApiError:
    """The answer for an error the token service raises; `last_error` is the app's classified,
    secret-free last error (`AppStatus.last_error`), repeated so the caller learns why."""
    why = f"last error: {last_error}" if last_error else "no refresh has failed yet"
    if isinstance(exc, NeedsAuthorization):
        return ApiError(
            409,
            "needs_authorization",
            f"app {app} needs authorization ({why}): an operator runs "
            f"`token-broker authorize {app} --config FILE`; the broker's log has the event "
            "app.needs_authorization",
        )
    if isinstance(exc, RateLimited):
        return ApiError(
            429,
            "rate_limited",
            "too many forced refreshes of this app",
            {"Retry-After": retry_after(exc.retry_after)},
        )
    if isinstance(exc, TokenUnavailable):
        seconds = retry_after(exc.retry_after)
        return ApiError(
            503,
            "token_unavailable",
            f"no valid token for app {app} right now ({why}); retry in {seconds} s. "
            "GET /v1/apps shows the app's state; the broker's log has the event "
            "token.refresh_failed",
            {"Retry-After": seconds, **NO_STORE},
        )
    return ApiError(400, "bad_request", str(exc))


def retry_after(seconds: float) -> str:
    """A Retry-After value: whole seconds, rounded up, at least 1."""
    return str(max(1, int(seconds + 0.999)))

"""The OpenAPI 3 description of the local API, served at /openapi.json."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from broker import __version__

_ERROR_CODES = [
    "bad_request",
    "unauthorized",
    "forbidden",
    "bad_host",
    "unknown_app",
    "needs_authorization",
    "rate_limited",
    "token_unavailable",
    "not_found",
    "method_not_allowed",
    "internal",
    "proxy_not_configured",
    "path_not_allowed",
    "payload_too_large",
    "proxy_busy",
    "upstream_error",
    "upstream_timeout",
    "unknown_upstream",
    "egress_refused",
    "dpop_bound",
    "dpop_not_configured",
    "dpop_key_missing",
]


def _error(description: str, *, retry_after: bool = False, auth: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    headers: dict[str, Any] = {}
    if retry_after:
        headers["Retry-After"] = {
            "description": "Seconds to wait before asking again.",
            "schema": {"type": "integer", "minimum": 1},
            "required": True,
        }
    if auth:
        headers["WWW-Authenticate"] = {"schema": {"type": "string"}, "required": True}
    if headers:
        response["headers"] = headers
    return response


_TOKEN_OK = {
    "description": "A token with more than the safety margin (and min_ttl) left.",
    "headers": {"Cache-Control": {"schema": {"type": "string", "enum": ["no-store"]}}},
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Token"}}},
}

_COMMON = {
    "400": _error("Bad request (e.g. a malformed min_ttl, or one above the token lifetime)."),
    "401": _error("Missing or wrong client key.", auth=True),
    "403": _error("Client not allowed this app (forbidden), or a non-loopback Host (bad_host)."),
    "404": _error("No such app (unknown_app)."),
    "409": _error(
        "The app needs an operator to run `token-broker authorize` (needs_authorization), or "
        "its tokens are DPoP-bound and never handed out alone (dpop_bound: use the proxy or "
        "POST /v1/token/{app}/proof)."
    ),
    "503": _error("No valid token right now (token_unavailable).", retry_after=True),
}

_APP_PARAM = {
    "name": "app",
    "in": "path",
    "required": True,
    "description": "A configured app name.",
    "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
}

_PROXY_METHODS = ("get", "post", "put", "patch", "delete", "head", "options")

_PROXY_RESPONSES = {
    "default": {
        "description": (
            "The upstream's answer, passed through with its status, headers and body (an "
            "upstream 401 only after one refresh and one retry). Redirects are not followed."
        )
    },
    "400": _error("A path with dot segments, encoded slashes, backslashes or an absolute URL."),
    "401": _error(
        "Missing or wrong client key; the message says what the request carried instead "
        "(e.g. HTTP Basic or Twilio credentials, which the broker never takes).",
        auth=True,
    ),
    "403": _error(
        "Client not allowed this app (forbidden), a path outside the upstream's prefixes "
        "(path_not_allowed), a non-loopback Host (bad_host), or an upstream whose address is "
        "loopback, link-local, private or reserved and not in allowed_networks "
        "(egress_refused: nothing was sent)."
    ),
    "404": _error(
        "No such app (unknown_app), the app has no proxy (proxy_not_configured), or no "
        "upstream of the name in the path's first segment (unknown_upstream)."
    ),
    "409": _error("The app needs an operator to run `token-broker authorize`."),
    "413": _error("The request body is over the app's max_request_body (payload_too_large)."),
    "502": _error("The upstream could not be reached, or its TLS failed (upstream_error)."),
    "503": _error(
        "No valid token right now (token_unavailable: nothing was forwarded), the app's "
        "concurrency limit is reached (proxy_busy), or the DPoP key its token is bound to is "
        "no longer configured (dpop_key_missing).",
        retry_after=True,
    ),
    "504": _error("The upstream did not answer within read_timeout (upstream_timeout)."),
}

_PROXY_OPERATION_BASE = {
    "summary": "Forward to the app's upstream with its access token (no token code needed).",
    "description": (
        "The broker removes the caller's Authorization and hop-by-hop headers, sets Host to the "
        "upstream, adds `Authorization: Bearer <access token>` (for an app with `dpop: true`, "
        "`Authorization: DPoP <access token>` and a `DPoP` proof of this request, made for it; "
        "a resource server's use_dpop_nonce challenge is answered once with its nonce), and "
        "streams both bodies. "
        "`path` is the upstream path; it must lie under the app's `path_prefixes`. For an app "
        "with several upstreams (`proxy.upstreams`), the path's first segment names the "
        "upstream: `/v1/proxy/{app}/{upstream}/{path}`, each with its own `path_prefixes`."
    ),
    "parameters": [
        _APP_PARAM,
        {
            "name": "path",
            "in": "path",
            "required": True,
            "description": (
                "The upstream path (may contain slashes) and its query string; for an app with "
                "several upstreams, preceded by the upstream's name."
            ),
            "schema": {"type": "string"},
        },
    ],
    "responses": _PROXY_RESPONSES,
}


def _proxy_operations() -> dict[str, Any]:
    return {
        method: {**_PROXY_OPERATION_BASE, "operationId": f"proxy{method.capitalize()}"}
        for method in _PROXY_METHODS
    }


_DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "token-broker local API",
        "version": __version__,
        "description": (
            "Fresh OAuth 2.0 access tokens for the services in this pod. Callers authenticate "
            "with `Authorization: Bearer <client key>`; on a unix-socket API, a request "
            "without that header is identified by the caller's uid or gid (SO_PEERCRED) when "
            "a client maps it. Requests whose Host is not a loopback "
            "name, or that carry Forwarded / X-Forwarded-For, get 403 bad_host."
        ),
    },
    "servers": [{"url": "http://127.0.0.1:8411"}],
    "security": [{"clientKey": []}],
    "paths": {
        "/v1/token/{app}": {
            "get": {
                "operationId": "getToken",
                "summary": "The app's current token (refreshed first when needed).",
                "parameters": [
                    _APP_PARAM,
                    {
                        "name": "min_ttl",
                        "in": "query",
                        "required": False,
                        "description": "Seconds the token must still be valid for.",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 1000000000},
                    },
                ],
                "responses": {"200": _TOKEN_OK, **_COMMON},
            }
        },
        "/v1/token/{app}/refresh": {
            "post": {
                "operationId": "refreshToken",
                "summary": "Refresh now (coalesced; a token younger than 5 s is returned as is).",
                "parameters": [_APP_PARAM],
                "responses": {
                    "200": _TOKEN_OK,
                    **_COMMON,
                    "429": _error(
                        "More than 10 forced refreshes of this app in a minute.", retry_after=True
                    ),
                },
            }
        },
        "/v1/token/{app}/proof": {
            "post": {
                "operationId": "tokenWithProof",
                "summary": "A DPoP app's token with a fresh DPoP proof of one request.",
                "description": (
                    "For an app with `dpop: true`, whose token is useless alone: the token and "
                    "a proof (RFC 9449) signed with the key only the broker holds, for the "
                    "given method and URL (`htu` is the URL without query and fragment; `ath` "
                    "binds the token). Send `Authorization: DPoP <access_token>` and "
                    "`DPoP: <proof>` with that one request; a proof is good once (`jti`). "
                    "`token_type` is `Bearer` only when the server did not bind the token."
                ),
                "parameters": [_APP_PARAM],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ProofRequest"}
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "The token and a proof of the request.",
                        "headers": _TOKEN_OK["headers"],
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Proof"}}
                        },
                    },
                    **_COMMON,
                    "400": _error("The body is not {method, url[, nonce]} (bad_request)."),
                    "404": _error(
                        "No such app (unknown_app), or the app has no `dpop: true` "
                        "(dpop_not_configured)."
                    ),
                    "409": _error("The app needs an operator to run `token-broker authorize`."),
                    "413": _error("The body is over 4096 bytes (payload_too_large)."),
                    "503": _error(
                        "No valid token right now (token_unavailable), or the DPoP key its "
                        "token is bound to is no longer configured (dpop_key_missing).",
                        retry_after=True,
                    ),
                },
            }
        },
        "/v1/apps": {
            "get": {
                "operationId": "listApps",
                "summary": "The apps this caller may use, with their state.",
                "responses": {
                    "200": {
                        "description": "The caller's apps.",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/AppList"}}
                        },
                    },
                    "401": _COMMON["401"],
                    "403": _COMMON["403"],
                },
            }
        },
        "/v1/proxy/{app}/{path}": _proxy_operations(),
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI description.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "403": _COMMON["403"],
                },
            }
        },
    },
    "components": {
        "securitySchemes": {"clientKey": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Token": {
                "type": "object",
                "required": ["access_token", "token_type", "expires_at", "expires_in", "scope"],
                "properties": {
                    "access_token": {"type": "string"},
                    "token_type": {"type": "string"},
                    "expires_at": {"type": "integer", "description": "Unix seconds."},
                    "expires_in": {"type": "integer", "minimum": 0},
                    "scope": {"type": "string", "nullable": True},
                },
                "additionalProperties": False,
            },
            "ProofRequest": {
                "type": "object",
                "required": ["method", "url"],
                "properties": {
                    "method": {"type": "string", "pattern": "^[A-Za-z]{1,16}$"},
                    "url": {
                        "type": "string",
                        "maxLength": 2048,
                        "description": "The absolute http(s) URL the request goes to.",
                    },
                    "nonce": {
                        "type": "string",
                        "maxLength": 512,
                        "description": "The resource server's DPoP-Nonce, when it asked for one.",
                    },
                },
                "additionalProperties": False,
            },
            "Proof": {
                "type": "object",
                "required": ["access_token", "token_type", "proof", "expires_in"],
                "properties": {
                    "access_token": {"type": "string"},
                    "token_type": {"type": "string", "enum": ["DPoP", "Bearer"]},
                    "proof": {"type": "string", "description": "The DPoP header's value."},
                    "expires_in": {"type": "integer", "minimum": 0},
                },
                "additionalProperties": False,
            },
            "App": {
                "type": "object",
                "required": ["name", "state", "expires_at", "last_refresh_at", "last_error"],
                "properties": {
                    "name": {"type": "string"},
                    "state": {
                        "type": "string",
                        "enum": ["fresh", "refreshing", "failing", "needs_authorization"],
                    },
                    "expires_at": {"type": "integer", "nullable": True},
                    "last_refresh_at": {"type": "integer", "nullable": True},
                    "last_error": {"type": "string", "nullable": True},
                },
                "additionalProperties": False,
            },
            "AppList": {
                "type": "object",
                "required": ["apps"],
                "properties": {
                    "apps": {"type": "array", "items": {"$ref": "#/components/schemas/App"}}
                },
                "additionalProperties": False,
            },
            "Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {
                    "error": {"type": "string", "enum": _ERROR_CODES},
                    "message": {"type": "string"},
                },
                "additionalProperties": False,
            },
        },
    },
}


@cache
def _frozen() -> dict[str, Any]:
    return copy.deepcopy(_DOCUMENT)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3 document (a fresh copy)."""
    return copy.deepcopy(_frozen())

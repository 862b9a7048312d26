"""The config file's keys, each with its JSON Schema: one table for the validator and the schema.

`broker/config.py` takes the keys each section allows from these tables (an unknown key is a
ConfigError with a did-you-mean), and `config_schema()` builds the JSON Schema that
`token-broker config-schema` prints, that the Helm chart embeds for its `config:` values
(`scripts/chart-schema`) and that editors read. The schema checks the shape: keys, types,
enums, patterns, ranges. What needs more than one key, a file or the host (exactly one of
`client_id` and `client_id_file`, loopback unless `allow_non_loopback`, `uids` only on a unix
socket, a key file that parses, a user name that exists) stays in config.py's validators.
"""

from __future__ import annotations

import copy
from typing import Any

from broker.model import ClientAuth, GrantType, SinkFormat

Schema = dict[str, Any]

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MAX_SCOPES = 100
# Unix ids are 32-bit; 2**32 - 1 is (uid_t) -1, "no change", never a real id.
MAX_UNIX_ID = 2**32 - 2
MAX_CONCURRENT = 10_000
STORE_SCHEMES = ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster")

_NUMBER = r"[0-9]+(\.[0-9]+)?"
DURATION: Schema = {
    "type": ["number", "string"],
    "minimum": 0,
    "pattern": rf"^\s*({_NUMBER}|({_NUMBER}h)?({_NUMBER}m)?({_NUMBER}s)?)\s*$",
    "description": "seconds, or like 90s, 5m, 1h, 1h30m",
}
SIZE: Schema = {
    "type": ["integer", "string"],
    "minimum": 0,
    "pattern": r"^\s*[0-9]+\s*(B|KiB|MiB|GiB)?\s*$",
    "description": "bytes, or like 512KiB, 1MiB, 1GiB",
}
OCTAL_MODE: Schema = {
    "type": "string",
    "pattern": "^(0o?)?[0-7]{3}$",
    "description": 'a quoted octal mode like "0660" (unquoted, YAML reads 0660 as a number)',
}
UNIX_ID: Schema = {"type": "integer", "minimum": 0, "maximum": MAX_UNIX_ID}
ID_OR_NAME: Schema = {
    "type": ["integer", "string"],
    "minimum": 0,
    "maximum": MAX_UNIX_ID,
    "minLength": 1,
    "description": "a numeric id, or a name resolved on the broker's host",
}
FILE: Schema = {
    "type": "string",
    "minLength": 1,
    "description": "a file path (relative paths resolve against the config file's directory)",
}
URL: Schema = {"type": "string", "pattern": "^https?://[^/?#]+"}
PARAMS: Schema = {
    "type": "object",
    "additionalProperties": {"type": ["string", "number", "boolean"]},
}


def _enum(kind: Any, description: str) -> Schema:
    return {"enum": [member.value for member in kind], "description": description}


def _described(schema: Schema, description: str) -> Schema:
    return {**schema, "description": description}


SERVER: dict[str, Schema] = {
    "listen": {
        "type": "string",
        "pattern": r"^(unix:/.*|.+:[0-9]+)$",
        "description": "the API: host:port on loopback, or unix:/absolute/path",
    },
    "metrics_listen": {
        "type": "string",
        "pattern": r"^.+:[0-9]+$",
        "description": "host:port of /metrics, /healthz, /readyz",
    },
    "allow_non_loopback": {
        "type": "boolean",
        "description": "let the API listen beyond loopback (it serves tokens)",
    },
    "status_endpoint": {
        "type": "boolean",
        "description": "serve GET /v1/status (every app's store record, no secrets) on the "
        "metrics listener; default false",
    },
    "socket_mode": _described(OCTAL_MODE, 'mode of the API\'s unix socket, like "0660"'),
    "socket_group": _described(ID_OR_NAME, "group (gid or name) of the API's unix socket"),
}

STORE: dict[str, Schema] = {
    "url": {
        "type": "string",
        "pattern": "^(" + "|".join(s.replace("+", r"\+") for s in STORE_SCHEMES) + ")://",
        "description": "memory:// (one process), or a redis:// URL without a password",
    },
    "key_prefix": {
        "type": "string",
        "minLength": 1,
        "pattern": r"^[^{} \t\n]+$",
        "description": "prefix of every Redis key (no braces, no spaces)",
    },
    "encryption_key_file": _described(FILE, "the AES key file (required for a shared store)"),
    "password_file": _described(FILE, "the file holding the Redis password"),
    "require_replica_ack": {
        "type": "boolean",
        "description": "send a refresh token only once a Redis replica acknowledged its spend "
        "record (WAIT); default true for redis+sentinel:// and redis+cluster://",
    },
    "replica_ack_timeout": _described(
        DURATION, "how long WAIT waits for the replica's acknowledgement (at most 5s)"
    ),
}

REFRESH: dict[str, Schema] = {
    "at_fraction": {
        "type": "number",
        "exclusiveMinimum": 0,
        "exclusiveMaximum": 1,
        "description": "refresh at this fraction of the token's lifetime",
    },
    "min_remaining": _described(DURATION, "refresh at the latest this long before expiry"),
    "jitter": {
        "type": "number",
        "minimum": 0,
        "exclusiveMaximum": 0.5,
        "description": "random spread of the refresh time, a fraction of the lifetime",
    },
    "safety_margin": _described(DURATION, "a token is served only while more than this is left"),
    "default_lifetime": _described(DURATION, "lifetime assumed when the answer has no expires_in"),
    "reuse_grace": _described(DURATION, "the server accepts a rotated refresh token this long"),
    "read_timeout": _described(DURATION, "how long the answer to a sent refresh is awaited"),
    "server_transactional": {
        "type": "boolean",
        "description": "a 5xx from the token endpoint means it did not rotate",
    },
}

PROXY: dict[str, Schema] = {
    "upstream": {
        "type": "string",
        "pattern": "^https?://[^/?#@]+/?$",
        "description": "scheme and host of the real API, like https://api.example.com",
    },
    "path_prefixes": {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string", "pattern": "^/"},
        "description": "paths the proxy forwards (default: all)",
    },
    "connect_timeout": DURATION,
    "read_timeout": DURATION,
    "max_buffered_body": _described(SIZE, "request bodies up to this size are replayable"),
    "max_request_body": SIZE,
    "ca_file": _described(FILE, "PEM CA certificates that alone verify the upstream"),
    "retry_on_401": {"type": "boolean", "description": "retry once with a new token on 401"},
    "max_concurrent": {"type": "integer", "minimum": 1, "maximum": MAX_CONCURRENT},
}

SINK: dict[str, Schema] = {
    "path": {
        "type": "string",
        "pattern": "^/",
        "description": "absolute path of the token file",
    },
    "format": _enum(SinkFormat, "raw: the token; json: the API's answer; header: Authorization"),
    "mode": _described(OCTAL_MODE, 'the token file\'s mode, at most "0644"'),
    "owner": _described(ID_OR_NAME, "owner (uid or user name) of the token file"),
    "group": _described(ID_OR_NAME, "group (gid or group name) of the token file"),
}

APP: dict[str, Schema] = {
    "grant_type": _enum(GrantType, "how the token is obtained"),
    "required": {"type": "boolean", "description": "false: this app does not hold /readyz back"},
    "token_url": _described(URL, "the token endpoint (https, or http on loopback)"),
    "client_id": {"type": "string", "minLength": 1},
    "client_id_file": FILE,
    "client_secret_file": FILE,
    "client_secret_previous_file": _described(FILE, "the secret before a rotation, tried second"),
    "client_auth": _enum(ClientAuth, "how the client authenticates to the token endpoint"),
    "private_key_file": _described(FILE, "PEM RSA (2048 bits or more) or EC key"),
    "private_key_id": {"type": "string", "description": "the JWT's kid"},
    "assertion_audience": {"type": "string", "description": "the client assertion's aud"},
    "scopes": {
        "type": "array",
        "maxItems": MAX_SCOPES,
        "uniqueItems": True,
        "items": {"type": "string", "pattern": r"^\S+$"},
    },
    "audience": {"type": "string"},
    "extra_params": _described(PARAMS, "more form fields of the token request"),
    "refresh": {"type": "object", "additionalProperties": False, "properties": REFRESH},
    "authorize_url": _described(URL, "the authorization endpoint (authorization_code)"),
    "redirect_uri": _described(URL, "the registered redirect URI (authorization_code)"),
    "pkce": {"type": "boolean"},
    "authorize_params": _described(PARAMS, "more query parameters of the authorization URL"),
    "proxy": {
        "type": "object",
        "required": ["upstream"],
        "additionalProperties": False,
        "properties": PROXY,
        "description": "the injecting proxy of this app",
    },
    "sinks": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["path"],
            "additionalProperties": False,
            "properties": SINK,
        },
        "description": "files the app's token is written to",
    },
    "max_token_requests_per_minute": {
        "type": "integer",
        "minimum": 1,
        "description": "the whole fleet's budget of token requests for this app",
    },
}

_HEX64 = {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}
_IDS: Schema = {"type": "array", "minItems": 1, "uniqueItems": True, "items": UNIX_ID}

CLIENT: dict[str, Schema] = {
    "key_file": _described(FILE, "the file holding the client's key (32 characters or more)"),
    "key_previous_file": _described(FILE, "the key before a rotation, accepted too"),
    "key_sha256": {
        "oneOf": [_HEX64, {"type": "array", "items": _HEX64}],
        "description": "SHA-256 (hex) of the client's key, or a list of them",
    },
    "apps": {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string"},
        "description": "the apps this client may get tokens of",
    },
    "uids": _described(_IDS, "peer uids that identify this client (unix socket only)"),
    "gids": _described(_IDS, "peer gids that identify this client (unix socket only)"),
}

ROOT: dict[str, Schema] = {
    "server": {"type": "object", "additionalProperties": False, "properties": SERVER},
    "store": {"type": "object", "additionalProperties": False, "properties": STORE},
    "apps": {
        "type": "object",
        "minProperties": 1,
        "propertyNames": {"pattern": NAME_PATTERN},
        "additionalProperties": {
            "type": "object",
            "required": ["token_url"],
            "additionalProperties": False,
            "properties": APP,
        },
    },
    "clients": {
        "type": "object",
        "propertyNames": {"pattern": NAME_PATTERN},
        "additionalProperties": {
            "type": "object",
            "required": ["apps"],
            "additionalProperties": False,
            "properties": CLIENT,
        },
    },
}


def config_schema() -> Schema:
    """The JSON Schema (draft 7) of the config file, self-contained (no $ref)."""
    return copy.deepcopy(
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "title": "token-broker configuration",
            "description": "docs/configuration.md; `token-broker check-config` checks the rest",
            "type": "object",
            "required": ["apps"],
            "additionalProperties": False,
            "properties": ROOT,
        }
    )

"""The config file's typed schema: the value types its keys take, each a rule and its JSON Schema.

The schema is the dataclasses of broker/model.py (ServerSpec, StoreSpec, AppSpec, ...) plus
`ClientEntry` and `ConfigFile` below, where the file's shape differs from the model. Each
field's annotation carries one of the rules here, as `Annotated[float, DURATION]`:
broker/config.py structures a file with cattrs, calling the rule of each key (an `Invalid`
names the reason, cattrs the key path), and `config_schema()` turns the same annotations into
the JSON Schema that `token-broker config-schema` prints, the Helm chart embeds for its
`config:` values (`scripts/chart-schema`) and editors read. msgspec builds that skeleton
(objects, required keys, lists, maps, enums) and each rule adds its fragment; msgspec is
imported only by `config_schema()`, so the running broker never loads it.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import math
import os
import pwd
import re
import typing
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

Schema = dict[str, Any]

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
NAME = re.compile(NAME_PATTERN)
MAX_SCOPES = 100
# Unix ids are 32-bit; 2**32 - 1 is (uid_t) -1, "no change", never a real id.
MAX_UNIX_ID = 2**32 - 2
MAX_CONCURRENT = 10_000
STORE_SCHEMES = ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster")
# WAIT blocks the connection it runs on (the client's socket timeout is raised to outlast it),
# and a spend waits that long before sending: a few seconds at most.
MAX_REPLICA_ACK_TIMEOUT = 5.0
# Each request in flight may hold its buffered body in memory: bounded per request.
MAX_BUFFERED_BODY = 16 * 1024 * 1024
# A token file may be read by group and others, but only the broker writes it.
MAX_SINK_MODE = 0o644

# Relative `*_file` paths resolve against the config file's directory, set while one loads.
BASE_DIR: ContextVar[Path] = ContextVar("BASE_DIR")


class Invalid(ValueError):
    """A value a rule refuses: why, and where below the key (`[2]`, `.name`) when not at it."""

    def __init__(self, reason: str, at: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.at = at


# Compared and hashed by identity: cattrs hashes the annotations that carry rules.
@dataclass(frozen=True, eq=False)
class Rule:
    """What one key accepts: `parse` turns the file's value into the model's (or raises
    Invalid), `json` is its JSON Schema, `required` the reason given when a required key is
    left out."""

    parse: Callable[[Any], Any]
    json: Schema
    required: str = "required"

    def described(self, description: str) -> Rule:
        """This rule, with its own description in the JSON Schema."""
        return dataclasses.replace(self, json={**self.json, "description": description})


@dataclass(frozen=True)
class Doc:
    """The description, in the JSON Schema, of a key whose type is a section or an enum."""

    text: str


# ---- scalars -------------------------------------------------------------------------------


def type_name(value: object) -> str:
    """How a YAML value's type is named in a message."""
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, not {type_name(value)}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, not {type_name(value)}")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Invalid(f"must be a number, not {type_name(value)}")
    return float(value)


def _str_list(value: object) -> list[str]:
    if not isinstance(value, list):
        raise Invalid(f"must be a list, not {type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise Invalid(f"must be a string, not {type_name(item)}", f"[{i}]")
    return value


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def seconds(value: object, *, allow_zero: bool = False) -> float:
    """Seconds from a number or a string like `90s`, `5m`, `1h`, `1h30m`."""
    found: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        found = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            found = float(text)
        except ValueError:
            match = _DURATION.match(text)
            if match and text and any(match.groups()):
                h, m, s = (float(g) if g else 0.0 for g in match.groups())
                found = h * 3600 + m * 60 + s
    if found is None or not math.isfinite(found):
        raise Invalid(f"{value!r} is not a duration (seconds, or like 90s, 5m, 1h)")
    if found < 0 or (found == 0 and not allow_zero):
        raise Invalid("must be positive")
    return found


_SIZE = re.compile(r"^([0-9]+)\s*(B|KiB|MiB|GiB)?$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def _size(value: object) -> int:
    """Bytes from a whole number or a string like `512KiB`, `1MiB`, `1GiB`."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise Invalid(f"{value!r} is not a size (bytes, or like 512KiB, 1MiB, 1GiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


_OCTAL_MODE = re.compile(r"^(?:0o?)?([0-7]{3})$")


def _octal_mode(value: object) -> int:
    """A file mode given as an octal string such as "0660"."""
    match = _OCTAL_MODE.match(value) if isinstance(value, str) else None
    if match is None:
        raise Invalid(
            f'{value!r} is not a quoted octal mode like "0660" '
            "(unquoted, YAML reads 0660 as a number)"
        )
    return int(match.group(1), 8)


def _socket_mode(value: object) -> int:
    mode = _octal_mode(value)
    if mode & 0o200 == 0:
        # Connecting to a unix socket needs write permission on it.
        raise Invalid("the owner needs write permission (e.g. 0660)")
    return mode


def _sink_mode(value: object) -> int:
    mode = _octal_mode(value)
    if mode & ~MAX_SINK_MODE:
        raise Invalid(
            f"{mode:04o} grants write or execute; a token file is at most 0644 (read for others)"
        )
    return mode


def _numeric_id(value: object) -> int:
    number = int(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= MAX_UNIX_ID:
        raise Invalid(f"{value!r} is not a numeric id or a name")
    return number


def _user_id(value: object) -> int:
    """A numeric uid, or a user name resolved on this host."""
    if isinstance(value, str) and not value.isdigit():
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            raise Invalid(f"no user named {value!r} on this host") from None
    return _numeric_id(value)


def _group_id(value: object) -> int:
    """A numeric gid, or a group name resolved on this host."""
    if isinstance(value, str) and not value.isdigit():
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise Invalid(f"no group named {value!r} on this host") from None
    return _numeric_id(value)


def _unix_ids(value: object) -> tuple[int, ...]:
    """`clients.<name>.uids` / `.gids`: numeric ids, as the kernel reports a peer's."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise Invalid("must be a non-empty list of numeric ids")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= MAX_UNIX_ID:
            raise Invalid(f"{item!r} is not a numeric id", f"[{i}]")
    if len(set(value)) != len(value):
        raise Invalid("lists an id twice")
    return tuple(value)


def _refresh_statuses(value: object) -> tuple[int, ...]:
    """`proxy.refresh_on_status`: 4xx statuses (a 5xx says nothing about the token); [] none."""
    if not isinstance(value, list):
        raise Invalid("must be a list of HTTP statuses (400 to 499), like [401]")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or not 400 <= item <= 499:
            raise Invalid(f"{item!r} is not an HTTP status from 400 to 499", f"[{i}]")
    if len(set(value)) != len(value):
        raise Invalid("lists a status twice")
    return tuple(value)


def is_loopback_host(host: str) -> bool:
    """localhost, or a loopback IP address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(value: object, *, allow_http: bool = False) -> str:
    text = _str(value)
    try:
        parts = urlsplit(text)
    except ValueError:
        raise Invalid("is not a valid URL") from None
    if parts.password is not None:
        # Refused before anything repeats the URL: the message must not carry it either.
        raise Invalid("holds a password: URLs carry no credentials (secrets are files, *_file)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid(f"{text!r} is not an http(s) URL with a host")
    if parts.scheme == "http" and not allow_http and not is_loopback_host(parts.hostname):
        raise Invalid("must use https (plain http only for loopback hosts)")
    return text


def _listen(value: object, *, allow_unix: bool = False) -> str:
    text = _str(value)
    if text.startswith("unix:"):
        if not allow_unix or not text.removeprefix("unix:").startswith("/"):
            raise Invalid("a unix socket is given as unix:/absolute/path (API only)")
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise Invalid(f"{text!r} is not host:port (like 127.0.0.1:8411)")
    if not 0 <= int(port) <= 65535:
        raise Invalid(f"port {port} is out of range (0 to 65535)")
    return text


def _store_url(value: object) -> str:
    url = _str(value)
    scheme = url.partition("://")[0]
    if "://" not in url or scheme not in STORE_SCHEMES:
        raise Invalid(f"scheme must be one of {', '.join(STORE_SCHEMES)}")
    if urlsplit(url.replace("redis+", "redis-", 1)).password and not url.startswith("memory"):
        raise Invalid("holds a password: give it as store.password_file (secrets are files)")
    return url


def _key_prefix(value: object) -> str:
    prefix = _str(value)
    if not prefix or any(c in prefix for c in "{} \t\n"):
        raise Invalid("must be non-empty, without braces or spaces")
    return prefix


def _path(value: object) -> Path:
    text = _str(value)
    if not text:
        raise Invalid("must not be empty")
    path = Path(text)
    return path if path.is_absolute() else BASE_DIR.get() / path


def _non_empty(value: object) -> str:
    text = _str(value)
    if not text:
        raise Invalid("must not be empty")
    return text


def _scopes(value: object) -> tuple[str, ...]:
    scopes = _str_list(value)
    if len(scopes) > MAX_SCOPES:
        raise Invalid(f"{len(scopes)} scopes; at most {MAX_SCOPES} allowed")
    for i, scope in enumerate(scopes):
        if not scope or any(c.isspace() for c in scope):
            raise Invalid("a scope is one non-empty word", f"[{i}]")
    if len(set(scopes)) != len(scopes):
        raise Invalid("lists a scope twice")
    return tuple(scopes)


def _params(value: object) -> dict[str, str]:
    if value is None:
        return {}  # `extra_params:` with nothing under it
    if not isinstance(value, dict):
        raise Invalid(f"must be a mapping, not {type_name(value)}")
    out = {}
    for k, v in value.items():
        if isinstance(v, dict | list) or v is None:
            raise Invalid("must be a string, number or boolean", f".{k}")
        out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _ranged(check: Callable[[float], bool], reason: str) -> Callable[[object], float]:
    def parse(value: object) -> float:
        number = _number(value)
        if not check(number):
            raise Invalid(reason)
        return number

    return parse


def _replica_ack_timeout(value: object) -> float:
    timeout = seconds(value)
    if timeout > MAX_REPLICA_ACK_TIMEOUT:
        raise Invalid(
            f"at most {MAX_REPLICA_ACK_TIMEOUT:g}s (a spend waits this long before sending)"
        )
    return timeout


def _request_budget(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"must be a whole number, not {type_name(value)}")
    if value < 1:
        raise Invalid("must be at least 1 (leave it out for no budget)")
    return value


_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


def _upstream(value: object) -> str:
    """`scheme://host[:port]`, normalized; anything that could steer requests elsewhere is refused."""
    text = _str(value)
    try:
        parts = urlsplit(text)
    except ValueError:
        raise Invalid("is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid(f"{text!r} is not an http(s) URL with a host")
    if "@" in parts.netloc:
        raise Invalid("must not hold a user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in text or "#" in text:
        raise Invalid(
            "scheme and host only, like https://api.example.com (limit paths with path_prefixes)"
        )
    try:
        port = parts.port
    except ValueError:
        raise Invalid("has an invalid port") from None
    host = parts.hostname
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise Invalid(f"{host!r} is not a host name") from None
        netloc = host
    else:
        netloc = f"[{address}]" if address.version == 6 else str(address)
    if parts.scheme == "http" and not is_loopback_host(host):
        raise Invalid(
            "must use https (plain http only for loopback hosts: the token travels in it)"
        )
    return f"{parts.scheme}://{netloc}" + (f":{port}" if port is not None else "")


def _path_prefixes(value: object) -> tuple[str, ...]:
    prefixes = _str_list(value)
    if not prefixes:
        raise Invalid("lists no prefix (leave it out to allow all)")
    for i, prefix in enumerate(prefixes):
        at = f"[{i}]"
        if not prefix.startswith("/"):
            raise Invalid("must start with /", at)
        if any(c in prefix for c in "?#%\\") or any(ord(c) <= 32 or ord(c) == 127 for c in prefix):
            raise Invalid(
                "a plain path: no query, fragment, percent-encoding, backslash or space", at
            )
        segments = prefix.split("/")
        if "//" in prefix or "." in segments or ".." in segments:
            raise Invalid("must not hold empty (//), . or .. segments", at)
    return tuple(prefixes)


def _below(at: str, parse: Callable[[object], Any], value: object) -> Any:
    """`parse(value)`, its mistake placed `at` below the key."""
    try:
        return parse(value)
    except Invalid as exc:
        raise Invalid(exc.reason, at + exc.at) from None


_UPSTREAM_KEYS = ("origin", "path_prefixes")


def _upstreams(value: object) -> tuple[Any, ...]:
    """`proxy.upstreams`: name → origin, or name → {origin, path_prefixes}."""
    from broker.model import UpstreamSpec  # model.py imports this module

    if not isinstance(value, dict) or not value:
        raise Invalid(
            "must be a mapping of names to origins, like {api: https://api.example.com}"
            + ("" if isinstance(value, dict) else f", not {type_name(value)}")
        )
    upstreams = []
    for name, entry in value.items():
        at = f".{name}"
        if not isinstance(name, str) or not NAME.match(name):
            raise Invalid("names match [a-z0-9][a-z0-9_-]{0,62} (they are a URL segment)", at)
        prefixes = None
        if isinstance(entry, dict):
            for key in entry:
                if key not in _UPSTREAM_KEYS:
                    raise Invalid(
                        f"unknown key (allowed: {', '.join(_UPSTREAM_KEYS)})", f"{at}.{key}"
                    )
            if "origin" not in entry:
                raise Invalid("required (the scheme and host of this upstream)", f"{at}.origin")
            origin = _below(f"{at}.origin", _upstream, entry["origin"])
            if "path_prefixes" in entry:
                prefixes = _below(f"{at}.path_prefixes", _path_prefixes, entry["path_prefixes"])
        elif isinstance(entry, str):
            origin = _below(at, _upstream, entry)
        else:
            raise Invalid(
                f"an origin like https://api.example.com, or a mapping with origin and "
                f"path_prefixes, not {type_name(entry)}",
                at,
            )
        upstreams.append(UpstreamSpec(name, origin, prefixes))
    return tuple(upstreams)


def _networks(value: object) -> tuple[str, ...]:
    """`proxy.allowed_networks`: addresses or CIDR networks, normalized."""
    items = _str_list(value)
    if not items:
        raise Invalid("lists no network (leave it out to allow none)")
    networks = []
    for i, item in enumerate(items):
        try:
            network = ipaddress.ip_network(item.strip())
        except ValueError:
            try:
                loose = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise Invalid(
                    f"{item!r} is not an address or a network like 10.0.0.0/8", f"[{i}]"
                ) from None
            raise Invalid(f"{item!r} has host bits set: did you mean {loose}?", f"[{i}]") from None
        networks.append(str(network))
    return tuple(networks)


def _request_body(value: object) -> int:
    size = _size(value)
    if size == 0:
        raise Invalid("must be positive")
    return size


def _buffered_body(value: object) -> int:
    size = _size(value)
    if size > MAX_BUFFERED_BODY:
        raise Invalid("at most 16MiB (every request in flight may hold this much in memory)")
    return size


def _max_concurrent(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENT:
        raise Invalid(f"must be a whole number from 1 to {MAX_CONCURRENT}")
    return value


def _sink_path(value: object) -> Path:
    text = _str(value)
    path = Path(text)
    if not path.is_absolute() or text.endswith("/") or os.path.normpath(text) != text:
        raise Invalid(f"{text!r} is not a normalized absolute file path")
    return path


_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _digests(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    values = _str_list([value] if isinstance(value, str) else value)
    for i, digest in enumerate(values):
        if not _HEX64.match(digest):
            raise Invalid("must be 64 hex digits (a SHA-256)", f"[{i}]")
    return tuple(digest.lower() for digest in values)


def _client_apps(value: object) -> tuple[str, ...]:
    apps = _str_list(value)
    if not apps:
        raise Invalid("lists no app")
    return tuple(apps)


# ---- the rules, with their JSON Schema ---------------------------------------------------

_NUMBER = r"[0-9]+(\.[0-9]+)?"
_DURATION_JSON: Schema = {
    "type": ["number", "string"],
    "minimum": 0,
    "pattern": rf"^\s*({_NUMBER}|({_NUMBER}h)?({_NUMBER}m)?({_NUMBER}s)?)\s*$",
    "description": "seconds, or like 90s, 5m, 1h, 1h30m",
}
_SIZE_JSON: Schema = {
    "type": ["integer", "string"],
    "minimum": 0,
    "pattern": r"^\s*[0-9]+\s*(B|KiB|MiB|GiB)?\s*$",
    "description": "bytes, or like 512KiB, 1MiB, 1GiB",
}
_OCTAL_JSON: Schema = {"type": "string", "pattern": "^(0o?)?[0-7]{3}$"}
_ID_OR_NAME_JSON: Schema = {
    "type": ["integer", "string"],
    "minimum": 0,
    "maximum": MAX_UNIX_ID,
    "minLength": 1,
    "description": "a numeric id, or a name resolved on the broker's host",
}
_URL_JSON: Schema = {"type": "string", "pattern": "^https?://[^/?#]+"}
_HEX64_JSON: Schema = {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}
_IDS_JSON: Schema = {
    "type": "array",
    "minItems": 1,
    "uniqueItems": True,
    "items": {"type": "integer", "minimum": 0, "maximum": MAX_UNIX_ID},
}

BOOL = Rule(_bool, {"type": "boolean"})
STRING = Rule(_str, {"type": "string"})
NON_EMPTY = Rule(_non_empty, {"type": "string", "minLength": 1})
DURATION = Rule(seconds, _DURATION_JSON)
DURATION_OR_ZERO = Rule(lambda v: seconds(v, allow_zero=True), _DURATION_JSON)
SIZE = Rule(_size, _SIZE_JSON)
FILE = Rule(
    _path,
    {
        "type": "string",
        "minLength": 1,
        "description": "a file path (relative paths resolve against the config file's directory)",
    },
)
URL = Rule(_url, _URL_JSON)
REDIRECT_URL = Rule(lambda v: _url(v, allow_http=True), _URL_JSON)
USER_ID = Rule(_user_id, _ID_OR_NAME_JSON)
GROUP_ID = Rule(_group_id, _ID_OR_NAME_JSON)
PARAMS = Rule(
    _params, {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}
)
LISTEN = Rule(_listen, {"type": "string", "pattern": r"^.+:[0-9]+$"})
API_LISTEN = Rule(
    lambda v: _listen(v, allow_unix=True), {"type": "string", "pattern": r"^(unix:/.*|.+:[0-9]+)$"}
)
SOCKET_MODE = Rule(_socket_mode, _OCTAL_JSON)
STORE_URL = Rule(
    _store_url,
    {
        "type": "string",
        "pattern": "^(" + "|".join(s.replace("+", r"\+") for s in STORE_SCHEMES) + ")://",
    },
)
KEY_PREFIX = Rule(_key_prefix, {"type": "string", "minLength": 1, "pattern": r"^[^{} \t\n]+$"})
REPLICA_ACK_TIMEOUT = Rule(_replica_ack_timeout, _DURATION_JSON)
AT_FRACTION = Rule(
    _ranged(lambda x: 0 < x < 1, "must be between 0 and 1 (exclusive)"),
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
)
JITTER = Rule(
    _ranged(lambda x: 0 <= x < 0.5, "must be at least 0 and below 0.5"),
    {"type": "number", "minimum": 0, "exclusiveMaximum": 0.5},
)
SCOPES = Rule(
    _scopes,
    {
        "type": "array",
        "maxItems": MAX_SCOPES,
        "uniqueItems": True,
        "items": {"type": "string", "pattern": r"^\S+$"},
    },
)
REQUEST_BUDGET = Rule(_request_budget, {"type": "integer", "minimum": 1})
UPSTREAM = Rule(
    _upstream,
    {"type": "string", "pattern": "^https?://[^/?#@]+/?$"},
)
PATH_PREFIXES = Rule(
    _path_prefixes,
    {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^/"}},
)
UPSTREAMS = Rule(
    _upstreams,
    {
        "type": "object",
        "minProperties": 1,
        "propertyNames": {"pattern": NAME_PATTERN},
        "additionalProperties": {
            "oneOf": [
                UPSTREAM.json,
                {
                    "type": "object",
                    "required": ["origin"],
                    "additionalProperties": False,
                    "properties": {"origin": UPSTREAM.json, "path_prefixes": PATH_PREFIXES.json},
                },
            ]
        },
    },
)
NETWORKS = Rule(
    _networks,
    {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string", "pattern": r"^[0-9A-Fa-f.:]+(/[0-9]{1,3})?$"},
    },
)
REQUEST_BODY = Rule(_request_body, _SIZE_JSON)
BUFFERED_BODY = Rule(_buffered_body, _SIZE_JSON)
MAX_CONCURRENT_RULE = Rule(
    _max_concurrent, {"type": "integer", "minimum": 1, "maximum": MAX_CONCURRENT}
)
REFRESH_STATUSES = Rule(
    _refresh_statuses,
    {
        "type": "array",
        "uniqueItems": True,
        "items": {"type": "integer", "minimum": 400, "maximum": 499},
    },
)
SINK_PATH = Rule(_sink_path, {"type": "string", "pattern": "^/"})
SINK_MODE = Rule(_sink_mode, _OCTAL_JSON)
DIGESTS = Rule(_digests, {"oneOf": [_HEX64_JSON, {"type": "array", "items": _HEX64_JSON}]})
CLIENT_APPS = Rule(_client_apps, {"type": "array", "minItems": 1, "items": {"type": "string"}})
UNIX_IDS = Rule(_unix_ids, _IDS_JSON)


# ---- where the file's shape differs from the model -----------------------------------------


@dataclass(frozen=True, slots=True)
class ClientEntry:
    """`clients.<name>`: a local caller, as the file gives it (config.py makes a ClientSpec)."""

    apps: Annotated[
        tuple[str, ...], CLIENT_APPS.described("the apps this client may get tokens of")
    ]
    key_file: Annotated[
        Path | None, FILE.described("the file holding the client's key (32 characters or more)")
    ] = None
    key_previous_file: Annotated[
        Path | None, FILE.described("the key before a rotation, accepted too")
    ] = None
    key_sha256: Annotated[
        tuple[str, ...], DIGESTS.described("SHA-256 (hex) of the client's key, or a list of them")
    ] = ()
    uids: Annotated[
        tuple[int, ...],
        UNIX_IDS.described("peer uids that identify this client (unix socket only)"),
    ] = ()
    gids: Annotated[
        tuple[int, ...],
        UNIX_IDS.described("peer gids that identify this client (unix socket only)"),
    ] = ()


def _config_file() -> type:
    # Built on first use, with real (not string) annotations: model.py imports this module.
    from broker.model import AppSpec, ServerSpec, StoreSpec

    return dataclasses.make_dataclass(
        "ConfigFile",
        [
            ("apps", Mapping[str, AppSpec]),
            ("server", ServerSpec, field(default_factory=ServerSpec)),
            ("store", StoreSpec, field(default_factory=StoreSpec)),
            ("clients", Mapping[str, ClientEntry], field(default_factory=dict)),
        ],
        frozen=True,
    )


def rule_of(annotation: object) -> Rule | None:
    """The Rule an `Annotated[...]` annotation carries, or None."""
    for item in getattr(annotation, "__metadata__", ()):
        if isinstance(item, Rule):
            return item
    return None


_FILE_KEYS: dict[type, dict[str, Any]] = {}


def file_keys(cls: type) -> dict[str, Any]:
    """The keys of a schema dataclass the file may give, with their annotations."""
    if cls not in _FILE_KEYS:
        hints = typing.get_type_hints(cls, include_extras=True)
        _FILE_KEYS[cls] = {
            f.name: hints[f.name]
            for f in dataclasses.fields(cls)
            if f.metadata.get("from_file", True)
        }
    return _FILE_KEYS[cls]


# The top-level sections of the file (the fields of _config_file(), which a test compares).
ROOT_KEYS = ("apps", "clients", "server", "store")


# ---- the JSON Schema -----------------------------------------------------------------------


def config_schema() -> Schema:
    """The JSON Schema (draft 7) of the config file, self-contained (no $ref)."""
    import msgspec  # only this command needs it: the running broker never loads msgspec

    root = _config_file()
    classes: dict[str, type] = {}

    def collect(cls: type) -> None:
        classes[cls.__name__] = cls
        for annotation in typing.get_type_hints(cls).values():
            for arg in _walk(annotation):
                known = isinstance(arg, type) and arg.__name__ in classes
                if isinstance(arg, type) and dataclasses.is_dataclass(arg) and not known:
                    collect(arg)

    collect(root)

    def hook(kind: type) -> Schema:
        if kind is Path:
            return {"type": "string"}
        raise NotImplementedError

    generated = msgspec.json.schema(root, schema_hook=hook)
    defs: dict[str, Schema] = generated["$defs"]
    for name, cls in classes.items():
        _apply_rules(defs[name], cls)
    for name in defs.keys() - classes.keys():
        defs[name].pop("title", None)  # an enum: its values, and its docstring as description

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                named = inline(defs[node["$ref"].rsplit("/", 1)[-1]])
                return {**named, **{k: v for k, v in node.items() if k != "$ref"}}
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    body = inline(defs[root.__name__])
    apps = body["properties"]["apps"]
    apps.update(minProperties=1, propertyNames={"pattern": NAME_PATTERN})
    # A proxy names its upstream once, or several by name: one of the two keys, never both.
    apps["additionalProperties"]["properties"]["proxy"]["oneOf"] = [
        {"required": ["upstream"]},
        {"required": ["upstreams"]},
    ]
    body["properties"]["clients"]["propertyNames"] = {"pattern": NAME_PATTERN}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "token-broker configuration",
        "description": "docs/configuration.md; `token-broker check-config` checks the rest",
        **body,
    }


def _walk(annotation: object) -> list[Any]:
    """`annotation` and every type inside it (union members, item types)."""
    out = [annotation]
    for arg in typing.get_args(annotation):
        out.extend(_walk(arg))
    return out


def _apply_rules(schema: Schema, cls: type) -> None:
    """A dataclass's generated object schema, closed, with each rule's fragment for its key."""
    keys = file_keys(cls)
    for name in [k for k in schema["properties"] if k not in keys]:
        del schema["properties"][name]
    schema["required"] = [k for k in schema.get("required", []) if k in keys]
    if not schema["required"]:
        del schema["required"]
    for drop in ("title", "description"):
        schema.pop(drop, None)
    schema["additionalProperties"] = False
    for name, annotation in keys.items():
        prop = schema["properties"][name]
        prop.pop("default", None)
        rule = rule_of(annotation)
        if rule is not None:
            schema["properties"][name] = dict(rule.json)
            continue
        if "anyOf" in prop:
            # An optional nested object or enum: the file leaves it out rather than giving null.
            prop = schema["properties"][name] = next(
                p for p in prop["anyOf"] if p.get("type") != "null"
            )
        for item in getattr(annotation, "__metadata__", ()):
            if isinstance(item, Doc):
                schema["properties"][name] = {**prop, "description": item.text}

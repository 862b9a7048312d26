"""The YAML configuration: schema, validation with precise errors, and a secret-free summary.

Every mistake raises ConfigError naming the dotted key (`apps.twilio.refresh.jitter`) and why.
Relative `*_file` paths resolve against the config file's directory.
"""

from __future__ import annotations

import base64
import collections
import difflib
import grp
import ipaddress
import math
import os
import pwd
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from broker.errors import ConfigError
from broker.model import (
    AppSpec,
    ClientAuth,
    ClientSpec,
    Config,
    GrantType,
    ProxySpec,
    RefreshPolicy,
    ServerSpec,
    SinkFormat,
    SinkSpec,
    StoreSpec,
)

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_SCOPES = 100
MIN_CLIENT_KEY = 32
MIN_RSA_BITS = 2048
STORE_SCHEMES = ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster")
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_OCTAL_MODE = re.compile(r"^(?:0o?)?([0-7]{3})$")
# Unix ids are 32-bit; 2**32 - 1 is (uid_t) -1, "no change", never a real id.
MAX_UNIX_ID = 2**32 - 2
# A token file may be read by group and others, but only the broker writes it.
MAX_SINK_MODE = 0o644

T = TypeVar("T")


def load_config(path: str | Path) -> Config:
    """Read and validate the config file at `path`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(str(path), f"not valid YAML{where}") from None
    return parse_config(data, base_dir=path.resolve().parent)


def parse_config(data: object, *, base_dir: Path) -> Config:
    """Validate an already-parsed YAML document."""
    root = _mapping(data, "<config>")
    _only(root, "<config>", {"server", "store", "apps", "clients"})
    server = _server(root.get("server") or {}, "server")
    store = _store(root.get("store") or {}, "store", base_dir)
    apps_raw = _mapping(root.get("apps"), "apps") if "apps" in root else {}
    if not apps_raw:
        raise ConfigError("apps", "at least one app is required")
    apps = {name: _app(name, body, f"apps.{name}", base_dir) for name, body in apps_raw.items()}
    _check_sink_paths(apps, server)
    if store.url.startswith("memory://"):
        for name, app in apps.items():
            if app.grant_type is GrantType.AUTHORIZATION_CODE:
                raise ConfigError(
                    "store.url",
                    f"memory:// cannot hold app {name}'s token set: `token-broker authorize` "
                    "writes it to the shared store the brokers read; use a redis:// store",
                )
    clients_raw = _mapping(root.get("clients") or {}, "clients")
    clients = {
        name: _client(name, body, f"clients.{name}", base_dir, apps)
        for name, body in clients_raw.items()
    }
    _check_peer_identities(clients, server)
    return Config(server=server, store=store, apps=apps, clients=clients)


# ---- sections --------------------------------------------------------------------------------


def _server(data: object, key: str) -> ServerSpec:
    m = _mapping(data, key)
    _only(m, key, {"listen", "metrics_listen", "allow_non_loopback", *_SOCKET_KEYS})
    defaults = ServerSpec()
    listen = _str(m.get("listen", defaults.listen), f"{key}.listen")
    metrics_listen = _str(m.get("metrics_listen", defaults.metrics_listen), f"{key}.metrics_listen")
    allow = _bool(m.get("allow_non_loopback", False), f"{key}.allow_non_loopback")
    _listen_address(listen, f"{key}.listen", allow_unix=True)
    _listen_address(metrics_listen, f"{key}.metrics_listen", allow_unix=False)
    if not allow and not _is_loopback_listen(listen):
        raise ConfigError(
            f"{key}.listen",
            f"{listen} is not a loopback address; the API serves tokens and stays on localhost "
            "unless server.allow_non_loopback is true",
        )
    socket_mode, socket_group = _socket_settings(m, key, listen)
    return ServerSpec(
        listen=listen,
        metrics_listen=metrics_listen,
        allow_non_loopback=allow,
        socket_mode=socket_mode,
        socket_group=socket_group,
    )


_SOCKET_KEYS = {"socket_mode", "socket_group"}


def _socket_settings(m: Mapping[str, Any], key: str, listen: str) -> tuple[int, int | None]:
    """`server.socket_mode` and `server.socket_group`: who may connect to the API's unix socket."""
    given = sorted(_SOCKET_KEYS & set(m))
    if given and not listen.startswith("unix:"):
        raise ConfigError(f"{key}.{given[0]}", "applies only when server.listen is unix:/path")
    mode = _octal_mode(m.get("socket_mode", "0660"), f"{key}.socket_mode")
    if mode & 0o200 == 0:
        # Connecting to a unix socket needs write permission on it.
        raise ConfigError(f"{key}.socket_mode", "the owner needs write permission (e.g. 0660)")
    raw_group = m.get("socket_group")
    group = None if raw_group is None else _group_id(raw_group, f"{key}.socket_group")
    return mode, group


def _store(data: object, key: str, base_dir: Path) -> StoreSpec:
    m = _mapping(data, key)
    _only(m, key, {"url", "key_prefix", "encryption_key_file", "password_file"})
    url = _str(m.get("url", "memory://"), f"{key}.url")
    scheme = url.partition("://")[0]
    if "://" not in url or scheme not in STORE_SCHEMES:
        raise ConfigError(f"{key}.url", f"scheme must be one of {', '.join(STORE_SCHEMES)}")
    prefix = _str(m.get("key_prefix", "token-broker"), f"{key}.key_prefix")
    if not prefix or any(c in prefix for c in "{} \t\n"):
        raise ConfigError(f"{key}.key_prefix", "must be non-empty, without braces or spaces")
    key_file = _optional_path(m.get("encryption_key_file"), f"{key}.encryption_key_file", base_dir)
    if scheme != "memory":
        if key_file is None:
            raise ConfigError(
                f"{key}.encryption_key_file",
                "required for a shared store (tokens are encrypted at rest)",
            )
        _check_encryption_key_file(key_file, f"{key}.encryption_key_file")
    password_file = _optional_path(m.get("password_file"), f"{key}.password_file", base_dir)
    if password_file is not None:
        _read_secret_file(password_file, f"{key}.password_file")
    if urlsplit(url.replace("redis+", "redis-", 1)).password and not url.startswith("memory"):
        raise ConfigError(
            f"{key}.url", "holds a password: give it as store.password_file (secrets are files)"
        )
    return StoreSpec(
        url=url, key_prefix=prefix, encryption_key_file=key_file, password_file=password_file
    )


_APP_KEYS = {
    "grant_type",
    "required",
    "token_url",
    "client_id",
    "client_id_file",
    "client_secret_file",
    "client_secret_previous_file",
    "client_auth",
    "private_key_file",
    "private_key_id",
    "assertion_audience",
    "scopes",
    "audience",
    "extra_params",
    "refresh",
    "authorize_url",
    "redirect_uri",
    "pkce",
    "authorize_params",
    "proxy",
    "sinks",
    "max_token_requests_per_minute",
}


def _app(name: object, data: object, key: str, base_dir: Path) -> AppSpec:
    name = _name(name, key)
    m = _mapping(data, key)
    _only(m, key, _APP_KEYS)
    grant = _enum(m.get("grant_type", "client_credentials"), f"{key}.grant_type", GrantType)
    auth = _enum(m.get("client_auth", "client_secret_post"), f"{key}.client_auth", ClientAuth)
    if "token_url" not in m:
        raise ConfigError(f"{key}.token_url", "required")
    token_url = _url(m["token_url"], f"{key}.token_url")

    client_id = m.get("client_id")
    client_id_file = _optional_path(m.get("client_id_file"), f"{key}.client_id_file", base_dir)
    if (client_id is None) == (client_id_file is None):
        raise ConfigError(f"{key}.client_id", "give exactly one of client_id and client_id_file")
    if client_id is not None:
        client_id = _str(client_id, f"{key}.client_id")
        if not client_id:
            raise ConfigError(f"{key}.client_id", "must not be empty")
    if client_id_file is not None:
        _read_secret_file(client_id_file, f"{key}.client_id_file")

    secret_file = _optional_path(m.get("client_secret_file"), f"{key}.client_secret_file", base_dir)
    previous_file = _optional_path(
        m.get("client_secret_previous_file"), f"{key}.client_secret_previous_file", base_dir
    )
    key_file = _optional_path(m.get("private_key_file"), f"{key}.private_key_file", base_dir)
    if auth is ClientAuth.PRIVATE_KEY_JWT:
        if key_file is None:
            raise ConfigError(f"{key}.private_key_file", "required for client_auth private_key_jwt")
        _check_private_key(key_file, f"{key}.private_key_file")
    else:
        if secret_file is None:
            raise ConfigError(f"{key}.client_secret_file", f"required for client_auth {auth.value}")
        _read_secret_file(secret_file, f"{key}.client_secret_file")
        if previous_file is not None:
            _read_secret_file(previous_file, f"{key}.client_secret_previous_file")

    scopes = _str_list(m.get("scopes", []), f"{key}.scopes")
    if len(scopes) > MAX_SCOPES:
        raise ConfigError(f"{key}.scopes", f"{len(scopes)} scopes; at most {MAX_SCOPES} allowed")
    for i, scope in enumerate(scopes):
        if not scope or any(c.isspace() for c in scope):
            raise ConfigError(f"{key}.scopes[{i}]", "a scope is one non-empty word")
    if len(set(scopes)) != len(scopes):
        raise ConfigError(f"{key}.scopes", "lists a scope twice")

    authorize_url = m.get("authorize_url")
    redirect_uri = m.get("redirect_uri")
    if authorize_url is not None:
        authorize_url = _url(authorize_url, f"{key}.authorize_url")
    if redirect_uri is not None:
        redirect_uri = _url(redirect_uri, f"{key}.redirect_uri", allow_http=True)
    if grant is GrantType.AUTHORIZATION_CODE:
        if authorize_url is None:
            raise ConfigError(f"{key}.authorize_url", "required for grant_type authorization_code")
        if redirect_uri is None:
            raise ConfigError(f"{key}.redirect_uri", "required for grant_type authorization_code")

    return AppSpec(
        name=name,
        token_url=token_url,
        grant_type=grant,
        required=_bool(m.get("required", True), f"{key}.required"),
        client_id=client_id,
        client_id_file=client_id_file,
        client_secret_file=secret_file,
        client_secret_previous_file=previous_file,
        client_auth=auth,
        private_key_file=key_file,
        private_key_id=_optional_str(m.get("private_key_id"), f"{key}.private_key_id"),
        assertion_audience=_optional_str(m.get("assertion_audience"), f"{key}.assertion_audience"),
        scopes=tuple(scopes),
        audience=_optional_str(m.get("audience"), f"{key}.audience"),
        extra_params=_params(m.get("extra_params"), f"{key}.extra_params"),
        refresh=_refresh(m.get("refresh") or {}, f"{key}.refresh"),
        authorize_url=authorize_url,
        redirect_uri=redirect_uri,
        pkce=_bool(m.get("pkce", True), f"{key}.pkce"),
        authorize_params=_params(m.get("authorize_params"), f"{key}.authorize_params"),
        proxy=_proxy(m["proxy"], f"{key}.proxy", base_dir) if "proxy" in m else None,
        sinks=_sinks(m.get("sinks"), f"{key}.sinks"),
        max_token_requests_per_minute=_request_budget(
            m.get("max_token_requests_per_minute"), f"{key}.max_token_requests_per_minute"
        ),
    )


def _sinks(data: object, key: str) -> tuple[SinkSpec, ...]:
    """`apps.<name>.sinks`: files the app's token is written to."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(key, f"must be a list, not {_type(data)}")
    return tuple(_sink(item, f"{key}[{i}]") for i, item in enumerate(data))


def _sink(data: object, key: str) -> SinkSpec:
    m = _mapping(data, key)
    _only(m, key, {"path", "format", "mode", "owner", "group"})
    if "path" not in m:
        raise ConfigError(f"{key}.path", "required")
    text = _str(m["path"], f"{key}.path")
    path = Path(text)
    if not path.is_absolute() or text.endswith("/") or os.path.normpath(text) != text:
        raise ConfigError(f"{key}.path", f"{text!r} is not a normalized absolute file path")
    mode = _octal_mode(m.get("mode", "0600"), f"{key}.mode")
    if mode & ~MAX_SINK_MODE:
        raise ConfigError(
            f"{key}.mode",
            f"{mode:04o} grants write or execute; a token file is at most 0644 (read for others)",
        )
    owner = m.get("owner")
    group = m.get("group")
    return SinkSpec(
        path=path,
        format=_enum(m.get("format", "raw"), f"{key}.format", SinkFormat),
        mode=mode,
        owner=None if owner is None else _user_id(owner, f"{key}.owner"),
        group=None if group is None else _group_id(group, f"{key}.group"),
    )


def _check_sink_paths(apps: Mapping[str, AppSpec], server: ServerSpec) -> None:
    """Each token file belongs to one sink of one app, and is not the API's socket."""
    seen: dict[Path, str] = {}
    if server.unix_path is not None:
        seen[Path(server.unix_path)] = "server.listen"
    for name, app in apps.items():
        for i, sink in enumerate(app.sinks):
            where = f"apps.{name}.sinks[{i}].path"
            if sink.path in seen:
                raise ConfigError(where, f"{sink.path} is already used by {seen[sink.path]}")
            seen[sink.path] = where


# ---- the fleet-wide request budget -----------------------------------------------------------


def _request_budget(value: object, key: str) -> int | None:
    """An optional whole number of token requests per minute, at least 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be a whole number, not {_type(value)}")
    if value < 1:
        raise ConfigError(key, "must be at least 1 (leave it out for no budget)")
    return value


def _refresh(data: object, key: str) -> RefreshPolicy:
    m = _mapping(data, key)
    _only(
        m,
        key,
        {
            "at_fraction",
            "min_remaining",
            "jitter",
            "safety_margin",
            "default_lifetime",
            "reuse_grace",
            "read_timeout",
            "server_transactional",
        },
    )
    d = RefreshPolicy()
    at_fraction = _fraction(m.get("at_fraction", d.at_fraction), f"{key}.at_fraction")
    if not 0 < at_fraction < 1:
        raise ConfigError(f"{key}.at_fraction", "must be between 0 and 1 (exclusive)")
    jitter = _fraction(m.get("jitter", d.jitter), f"{key}.jitter")
    if not 0 <= jitter < 0.5:
        raise ConfigError(f"{key}.jitter", "must be at least 0 and below 0.5")
    return RefreshPolicy(
        at_fraction=at_fraction,
        min_remaining=parse_duration(
            m.get("min_remaining", d.min_remaining), f"{key}.min_remaining", allow_zero=True
        ),
        jitter=jitter,
        safety_margin=parse_duration(
            m.get("safety_margin", d.safety_margin), f"{key}.safety_margin", allow_zero=True
        ),
        default_lifetime=parse_duration(
            m.get("default_lifetime", d.default_lifetime), f"{key}.default_lifetime"
        ),
        reuse_grace=parse_duration(
            m.get("reuse_grace", d.reuse_grace), f"{key}.reuse_grace", allow_zero=True
        ),
        read_timeout=parse_duration(m.get("read_timeout", d.read_timeout), f"{key}.read_timeout"),
        server_transactional=_bool(
            m.get("server_transactional", d.server_transactional), f"{key}.server_transactional"
        ),
    )


def _client(
    name: object, data: object, key: str, base_dir: Path, apps: Mapping[str, AppSpec]
) -> ClientSpec:
    name = _name(name, key)
    m = _mapping(data, key)
    _only(m, key, {"key_file", "key_previous_file", "key_sha256", "apps", "uids", "gids"})
    key_files = []
    for field in ("key_file", "key_previous_file"):
        path = _optional_path(m.get(field), f"{key}.{field}", base_dir)
        if path is not None:
            value = _read_secret_file(path, f"{key}.{field}")
            if len(value) < MIN_CLIENT_KEY:
                raise ConfigError(
                    f"{key}.{field}", f"the key must be at least {MIN_CLIENT_KEY} characters"
                )
            key_files.append(path)
    raw_digests = m.get("key_sha256")
    digests: list[str] = []
    if raw_digests is not None:
        values = [raw_digests] if isinstance(raw_digests, str) else raw_digests
        for i, digest in enumerate(_str_list(values, f"{key}.key_sha256")):
            if not _HEX64.match(digest):
                raise ConfigError(f"{key}.key_sha256[{i}]", "must be 64 hex digits (a SHA-256)")
            digests.append(digest.lower())
    uids = _unix_ids(m.get("uids"), f"{key}.uids")
    gids = _unix_ids(m.get("gids"), f"{key}.gids")
    if not key_files and not digests and not uids and not gids:
        raise ConfigError(key, "needs an identity: key_file, key_sha256, uids or gids")
    if "key_previous_file" in m and "key_file" not in m:
        raise ConfigError(f"{key}.key_previous_file", "goes with key_file")
    allowed = _str_list(m.get("apps", []), f"{key}.apps")
    if not allowed:
        raise ConfigError(f"{key}.apps", "lists no app")
    for i, app in enumerate(allowed):
        if app not in apps:
            raise ConfigError(f"{key}.apps[{i}]", f"unknown app {app!r}")
    return ClientSpec(
        name=name,
        apps=tuple(allowed),
        key_files=tuple(key_files),
        key_sha256=tuple(digests),
        uids=uids,
        gids=gids,
    )


def _unix_ids(value: object, key: str) -> tuple[int, ...]:
    """`clients.<name>.uids` / `.gids`: numeric ids, as the kernel reports a peer's."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise ConfigError(key, "must be a non-empty list of numeric ids")
    ids = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= MAX_UNIX_ID:
            raise ConfigError(f"{key}[{i}]", f"{item!r} is not a numeric id")
        ids.append(item)
    if len(set(ids)) != len(ids):
        raise ConfigError(key, "lists an id twice")
    return tuple(ids)


def _check_peer_identities(clients: Mapping[str, ClientSpec], server: ServerSpec) -> None:
    """Peer identity needs the unix socket, and one uid (or gid) names one client."""
    for field in ("uids", "gids"):
        owner: dict[int, str] = {}
        for name, client in clients.items():
            ids: tuple[int, ...] = getattr(client, field)
            if ids and server.unix_path is None:
                raise ConfigError(
                    f"clients.{name}.{field}",
                    "peer identity works only over a unix socket: set server.listen to "
                    "unix:/path (a TCP peer's address says nothing about who is calling)",
                )
            for i, unix_id in enumerate(ids):
                if unix_id in owner:
                    raise ConfigError(
                        f"clients.{name}.{field}[{i}]",
                        f"{unix_id} already identifies client {owner[unix_id]}",
                    )
                owner[unix_id] = name


# ---- apps.<name>.proxy -----------------------------------------------------------------------

_PROXY_KEYS = {
    "upstream",
    "path_prefixes",
    "connect_timeout",
    "read_timeout",
    "max_buffered_body",
    "max_request_body",
    "ca_file",
    "retry_on_401",
    "max_concurrent",
}
# Each request in flight may hold its buffered body in memory: bounded per request.
MAX_BUFFERED_BODY = 16 * 1024 * 1024
MAX_CONCURRENT = 10_000
_SIZE = re.compile(r"^([0-9]+)\s*(B|KiB|MiB|GiB)?$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


def _proxy(data: object, key: str, base_dir: Path) -> ProxySpec:
    """The injecting proxy of one app: a fixed upstream origin and its limits."""
    m = _mapping(data, key)
    _only(m, key, _PROXY_KEYS)
    if "upstream" not in m:
        raise ConfigError(f"{key}.upstream", "required (the scheme and host of the real API)")
    d = ProxySpec(upstream="")
    prefixes = _str_list(m.get("path_prefixes", list(d.path_prefixes)), f"{key}.path_prefixes")
    if not prefixes:
        raise ConfigError(f"{key}.path_prefixes", "lists no prefix (leave it out to allow all)")
    max_request_body = _size(
        m.get("max_request_body", d.max_request_body), f"{key}.max_request_body"
    )
    if max_request_body == 0:
        raise ConfigError(f"{key}.max_request_body", "must be positive")
    max_buffered_body = _size(
        m.get("max_buffered_body", d.max_buffered_body), f"{key}.max_buffered_body"
    )
    if max_buffered_body > MAX_BUFFERED_BODY:
        raise ConfigError(
            f"{key}.max_buffered_body",
            "at most 16MiB (every request in flight may hold this much in memory)",
        )
    if max_buffered_body > max_request_body:
        raise ConfigError(f"{key}.max_buffered_body", "must not exceed max_request_body")
    max_concurrent = m.get("max_concurrent", d.max_concurrent)
    if (
        isinstance(max_concurrent, bool)
        or not isinstance(max_concurrent, int)
        or not 1 <= max_concurrent <= MAX_CONCURRENT
    ):
        raise ConfigError(
            f"{key}.max_concurrent", f"must be a whole number from 1 to {MAX_CONCURRENT}"
        )
    ca_file = _optional_path(m.get("ca_file"), f"{key}.ca_file", base_dir)
    if ca_file is not None:
        _check_ca_file(ca_file, f"{key}.ca_file")
    return ProxySpec(
        upstream=_upstream(m["upstream"], f"{key}.upstream"),
        path_prefixes=tuple(
            _path_prefix(prefix, f"{key}.path_prefixes[{i}]") for i, prefix in enumerate(prefixes)
        ),
        connect_timeout=parse_duration(
            m.get("connect_timeout", d.connect_timeout), f"{key}.connect_timeout"
        ),
        read_timeout=parse_duration(m.get("read_timeout", d.read_timeout), f"{key}.read_timeout"),
        max_buffered_body=max_buffered_body,
        max_request_body=max_request_body,
        ca_file=ca_file,
        retry_on_401=_bool(m.get("retry_on_401", d.retry_on_401), f"{key}.retry_on_401"),
        max_concurrent=max_concurrent,
    )


def _upstream(value: object, key: str) -> str:
    """`scheme://host[:port]`, normalized; anything that could steer requests elsewhere is refused."""
    text = _str(value, key)
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ConfigError(key, "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"{text!r} is not an http(s) URL with a host")
    if "@" in parts.netloc:
        raise ConfigError(key, "must not hold a user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in text or "#" in text:
        raise ConfigError(
            key,
            "scheme and host only, like https://api.example.com (limit paths with path_prefixes)",
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(key, "has an invalid port") from None
    host = parts.hostname
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ConfigError(key, f"{host!r} is not a host name") from None
        netloc = host
    else:
        netloc = f"[{address}]" if address.version == 6 else str(address)
    if parts.scheme == "http" and not _is_loopback_host(host):
        raise ConfigError(
            key, "must use https (plain http only for loopback hosts: the token travels in it)"
        )
    return f"{parts.scheme}://{netloc}" + (f":{port}" if port is not None else "")


def _path_prefix(value: str, key: str) -> str:
    if not value.startswith("/"):
        raise ConfigError(key, "must start with /")
    if any(c in value for c in "?#%\\") or any(ord(c) <= 32 or ord(c) == 127 for c in value):
        raise ConfigError(
            key, "a plain path: no query, fragment, percent-encoding, backslash or space"
        )
    segments = value.split("/")
    if "//" in value or "." in segments or ".." in segments:
        raise ConfigError(key, "must not hold empty (//), . or .. segments")
    return value


def _size(value: object, key: str) -> int:
    """Bytes from a whole number or a string like `512KiB`, `1MiB`, `1GiB`."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(key, f"{value!r} is not a size (bytes, or like 512KiB, 1MiB, 1GiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _check_ca_file(path: Path, key: str) -> None:
    _read_secret_file(path, key)
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError):
        raise ConfigError(key, f"{path} holds no PEM CA certificate") from None


# ---- scalars -------------------------------------------------------------------------------


def parse_duration(value: object, key: str, *, allow_zero: bool = False) -> float:
    """Seconds from a number or a string like `90s`, `5m`, `1h`, `1h30m`."""
    seconds: float | None = None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            match = _DURATION.match(text)
            if match and text and any(match.groups()):
                h, m, s = (float(g) if g else 0.0 for g in match.groups())
                seconds = h * 3600 + m * 60 + s
    if seconds is None or not math.isfinite(seconds):
        raise ConfigError(key, f"{value!r} is not a duration (seconds, or like 90s, 5m, 1h)")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ConfigError(key, "must be positive")
    return seconds


def _mapping(value: object, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, not {_type(value)}")
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(f"{key}.{k}", "keys must be strings")
    return value


def _only(m: Mapping[str, Any], key: str, allowed: set[str]) -> None:
    for k in m:
        if k not in allowed:
            close = difflib.get_close_matches(k, sorted(allowed), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{key}.{k}" if key != "<config>" else k,
                f"unknown key; {hint}(allowed: {', '.join(sorted(allowed))})",
            )


def _type(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _str(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {_type(value)}")
    return value


def _optional_str(value: object, key: str) -> str | None:
    return None if value is None else _str(value, key)


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, not {_type(value)}")
    return value


def _fraction(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(key, f"must be a number, not {_type(value)}")
    return float(value)


def _str_list(value: object, key: str) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list, not {_type(value)}")
    return [_str(item, f"{key}[{i}]") for i, item in enumerate(value)]


def _enum(value: object, key: str, kind: Callable[[str], T]) -> T:
    text = _str(value, key)
    try:
        return kind(text)
    except ValueError:
        choices = ", ".join(str(getattr(c, "value", c)) for c in kind)  # type: ignore[attr-defined]
        raise ConfigError(key, f"{text!r} is not one of {choices}") from None


def _name(value: object, key: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise ConfigError(key, "names match [a-z0-9][a-z0-9_-]{0,62}")
    return value


def _params(value: object, key: str) -> dict[str, str]:
    m = _mapping(value, key)
    out = {}
    for k, v in m.items():
        if isinstance(v, dict | list) or v is None:
            raise ConfigError(f"{key}.{k}", "must be a string, number or boolean")
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _url(value: object, key: str, *, allow_http: bool = False) -> str:
    text = _str(value, key)
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ConfigError(key, "is not a valid URL") from None
    if parts.password is not None:
        # Refused before anything repeats the URL: the message must not carry it either.
        raise ConfigError(
            key, "holds a password: URLs carry no credentials (secrets are files, *_file)"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"{text!r} is not an http(s) URL with a host")
    if parts.scheme == "http" and not allow_http and not _is_loopback_host(parts.hostname):
        raise ConfigError(key, "must use https (plain http only for loopback hosts)")
    return text


def _octal_mode(value: object, key: str) -> int:
    """A file mode given as an octal string such as "0660"."""
    match = _OCTAL_MODE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(
            key,
            f'{value!r} is not a quoted octal mode like "0660" '
            "(unquoted, YAML reads 0660 as a number)",
        )
    return int(match.group(1), 8)


def _user_id(value: object, key: str) -> int:
    """A numeric uid, or a user name resolved on this host."""
    if isinstance(value, str) and not value.isdigit():
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            raise ConfigError(key, f"no user named {value!r} on this host") from None
    return _numeric_id(value, key)


def _group_id(value: object, key: str) -> int:
    """A numeric gid, or a group name resolved on this host."""
    if isinstance(value, str) and not value.isdigit():
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise ConfigError(key, f"no group named {value!r} on this host") from None
    return _numeric_id(value, key)


def _numeric_id(value: object, key: str) -> int:
    number = int(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= MAX_UNIX_ID:
        raise ConfigError(key, f"{value!r} is not a numeric id or a name")
    return number


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen_address(value: str, key: str, *, allow_unix: bool) -> None:
    if value.startswith("unix:"):
        if not allow_unix or not value.removeprefix("unix:").startswith("/"):
            raise ConfigError(key, "a unix socket is given as unix:/absolute/path (API only)")
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(key, f"{value!r} is not host:port (like 127.0.0.1:8411)")
    if not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"port {port} is out of range (0 to 65535)")


def _is_loopback_listen(value: str) -> bool:
    if value.startswith("unix:"):
        return True
    return _is_loopback_host(value.rpartition(":")[0].strip("[]"))


def _optional_path(value: object, key: str, base_dir: Path) -> Path | None:
    if value is None:
        return None
    text = _str(value, key)
    if not text:
        raise ConfigError(key, "must not be empty")
    path = Path(text)
    return path if path.is_absolute() else base_dir / path


def _read_secret_file(path: Path, key: str) -> str:
    """The file's stripped text; the value is never put in an error message."""
    if not path.exists():
        raise ConfigError(key, f"{path} does not exist")
    if not path.is_file():
        raise ConfigError(key, f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, f"{path} is not readable")
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(key, f"{path} is empty")
    return value


def _check_private_key(path: Path, key: str) -> None:
    # Imported here: only private_key_jwt apps need cryptography's key loading.
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    _read_secret_file(path, key)
    try:
        private_key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(key, f"{path} is not an unencrypted PEM private key") from None
    if isinstance(private_key, rsa.RSAPrivateKey):
        if private_key.key_size < MIN_RSA_BITS:
            raise ConfigError(key, f"RSA key of {private_key.key_size} bits; at least 2048 needed")
    elif not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(key, "must be an RSA or EC private key")


def _check_encryption_key_file(path: Path, key: str) -> None:
    """The key file parses (sizes, ids); errors name the line, never the key material."""
    # Imported here: a memory:// store has no key file and needs no AES.
    from broker.store.crypto import Keyring

    _read_secret_file(path, key)
    Keyring.from_file(path)


# ---- warnings: valid, but not what should ship --------------------------------------------

# An estimated strength below this many bits is worth a warning. A random 128-bit key written
# as 32 hex digits scores 95 to 120 on the estimate; a repeated or word-like key far less.
MIN_KEY_BITS = 80
_PLACEHOLDER = re.compile(r"placeholder|change[-_ ]?me|replace[-_ ]?me", re.IGNORECASE)


@dataclass(frozen=True)
class ConfigWarning:
    """Something `check-config` accepts but an operator should fix: the key and why."""

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


def config_warnings(config: Config) -> list[ConfigWarning]:
    """Placeholder values and guessable keys in the secret files (the values are never shown)."""
    found: list[ConfigWarning] = []

    def check(key: str, path: Path | None, *, is_key: bool) -> None:
        value = _quiet_read(path)
        if value is None:
            return
        if _PLACEHOLDER.search(value):
            found.append(ConfigWarning(key, f"{path} holds a placeholder; put the real value in"))
        elif is_key and estimated_bits(value) < MIN_KEY_BITS:
            found.append(
                ConfigWarning(
                    key,
                    f"the key in {path} looks guessable (about {estimated_bits(value):.0f} bits; "
                    "make one with `openssl rand -base64 32`)",
                )
            )

    store_key = config.store.encryption_key_file
    for number, material in _store_keys(store_key):
        where = f"{store_key} line {number}"
        if _PLACEHOLDER.search(material.decode("latin-1")):
            found.append(
                ConfigWarning(
                    "store.encryption_key_file",
                    f"{where} is a placeholder key; make one with `openssl rand -base64 32`",
                )
            )
        elif estimated_bits(material) < MIN_KEY_BITS:
            found.append(
                ConfigWarning(
                    "store.encryption_key_file",
                    f"{where} looks guessable (about {estimated_bits(material):.0f} bits); "
                    "make one with `openssl rand -base64 32`",
                )
            )
    check("store.password_file", config.store.password_file, is_key=False)
    for app in config.apps.values():
        key = f"apps.{app.name}"
        if app.client_id is not None and _PLACEHOLDER.search(app.client_id):
            found.append(ConfigWarning(f"{key}.client_id", "is a placeholder"))
        check(f"{key}.client_id_file", app.client_id_file, is_key=False)
        check(f"{key}.client_secret_file", app.client_secret_file, is_key=False)
        check(f"{key}.client_secret_previous_file", app.client_secret_previous_file, is_key=False)
    for client in config.clients.values():
        for field, path in zip(("key_file", "key_previous_file"), client.key_files, strict=False):
            check(f"clients.{client.name}.{field}", path, is_key=True)
    return found


def estimated_bits(value: str | bytes) -> float:
    """Length times the Shannon entropy of the symbol frequencies: a rough upper bound."""
    if not value:
        return 0.0
    counts = collections.Counter(value)
    total = len(value)
    per_symbol = sum(n / total * math.log2(total / n) for n in counts.values())
    return total * per_symbol


def _quiet_read(path: Path | None) -> str | None:
    """A secret file's text for the warnings (validation has already read it)."""
    if path is None:
        return None
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _store_keys(path: Path | None) -> list[tuple[int, bytes]]:
    """(line number, key bytes) of a store key file that validation has accepted."""
    if path is None:
        return []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            keys.append((number, base64.b64decode(fields[-1])))
    return keys


# ---- summary -------------------------------------------------------------------------------


def summarize(config: Config) -> str:
    """What `check-config` prints: everything an operator checks, never a secret."""
    lines = [
        f"API:      {config.server.listen}" + _socket_summary(config.server),
        f"metrics:  {config.server.metrics_listen}",
        f"store:    {redact_url(config.store.url)} (key prefix {config.store.key_prefix!r}"
        + (", encrypted)" if config.store.encryption_key_file else ", in memory)"),
        f"apps ({len(config.apps)}):",
    ]
    for app in config.apps.values():
        r = app.refresh
        lines.append(
            f"  {app.name}: {app.grant_type.value}, {app.client_auth.value}, "
            f"token_url {app.token_url}, {len(app.scopes)} scope(s)"
            + ("" if app.required else ", not required for readiness")
        )
        lines.append(
            f"    refresh at {r.at_fraction:g} of the lifetime or {r.min_remaining:g}s before "
            f"expiry, jitter {r.jitter:g}, safety margin {r.safety_margin:g}s"
            + (", previous secret configured" if app.client_secret_previous_file else "")
        )
        if app.proxy is not None:
            lines.append(_proxy_summary(app.proxy))
        lines.extend(
            f"    sink {sink.path} ({sink.format.value}, mode {sink.mode:04o})"
            for sink in app.sinks
        )
        if app.max_token_requests_per_minute is not None:
            lines.append(
                f"    at most {app.max_token_requests_per_minute} token requests per minute "
                "(the whole fleet)"
            )
    lines.append(f"clients ({len(config.clients)}):")
    for client in config.clients.values():
        keys = len(client.key_files) + len(client.key_sha256)
        lines.append(
            f"  {client.name}: apps {', '.join(client.apps)} ({keys} key(s))"
            + _peer_summary(client)
        )
    return "\n".join(lines)


def _proxy_summary(proxy: ProxySpec) -> str:
    return (
        f"    proxy to {proxy.upstream}, paths {', '.join(proxy.path_prefixes)}, "
        f"timeouts {proxy.connect_timeout:g}s connect / {proxy.read_timeout:g}s read, "
        f"bodies up to {proxy.max_request_body} bytes (replayable up to "
        f"{proxy.max_buffered_body}), at most {proxy.max_concurrent} at once"
        + (", retry on 401" if proxy.retry_on_401 else ", no retry on 401")
        + (f", CA {proxy.ca_file}" if proxy.ca_file else "")
    )


def _socket_summary(server: ServerSpec) -> str:
    if server.unix_path is None:
        return ""
    group = "" if server.socket_group is None else f", group {server.socket_group}"
    return f" (mode {server.socket_mode:04o}{group})"


def _peer_summary(client: ClientSpec) -> str:
    ids = [f"uids {', '.join(map(str, client.uids))}"] if client.uids else []
    ids += [f"gids {', '.join(map(str, client.gids))}"] if client.gids else []
    return f", by peer {'; '.join(ids)}" if ids else ""


def redact_url(url: str) -> str:
    """`url` with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()

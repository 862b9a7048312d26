"""The YAML configuration: validation with precise errors, and a secret-free summary.

Every mistake is a ConfigError naming the dotted key (`apps.twilio.refresh.jitter`) and why;
one pass finds them all, and a file with several raises ConfigErrors listing each. The keys
each section allows, and their JSON Schema, are the tables in broker/schema.py; the rules here
are what a schema cannot say (several keys together, files, the host). Relative `*_file` paths
resolve against the config file's directory.
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
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from broker import schema
from broker.errors import ConfigError, ConfigErrors
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

NAME = re.compile(schema.NAME_PATTERN)
MAX_SCOPES = schema.MAX_SCOPES
MIN_CLIENT_KEY = 32
MIN_RSA_BITS = 2048
STORE_SCHEMES = schema.STORE_SCHEMES
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_OCTAL_MODE = re.compile(r"^(?:0o?)?([0-7]{3})$")
MAX_UNIX_ID = schema.MAX_UNIX_ID
# A token file may be read by group and others, but only the broker writes it.
MAX_SINK_MODE = 0o644

T = TypeVar("T")


class _Mistakes:
    """The mistakes found so far in one file: a bad key is recorded and the pass goes on."""

    def __init__(self) -> None:
        self.found: list[ConfigError] = []

    def __len__(self) -> int:
        return len(self.found)

    def add(self, key: str, reason: str) -> None:
        """Record a mistake at `key`."""
        self.found.append(ConfigError(key, reason))

    def catch(self, parse: Callable[[], T], fallback: T) -> T:
        """`parse()`, or `fallback` once the ConfigError it raised is recorded."""
        try:
            return parse()
        except ConfigError as exc:
            self.found.append(exc)
            return fallback

    def raise_found(self) -> None:
        """Raise the one mistake found, or ConfigErrors naming each; nothing when none."""
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise ConfigErrors(self.found)


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
    """Validate an already-parsed YAML document; raises with every mistake it holds."""
    root = _mapping(data, "<config>")
    found = _Mistakes()
    unsure = _only(root, "<config>", schema.ROOT, found)
    before = len(found)
    server = found.catch(lambda: _server(root.get("server") or {}, "server", found), ServerSpec())
    # Checks that read server.listen are left out when it is wrong (or the section's name is
    # mistyped): they would only echo it.
    server_known = len(found) == before and "server" not in unsure
    store = found.catch(
        lambda: _store(root.get("store") or {}, "store", base_dir, found), StoreSpec(url="")
    )
    apps_raw = found.catch(lambda: _mapping(root.get("apps"), "apps"), None)
    if apps_raw == {} and "apps" not in unsure:
        found.add("apps", "at least one app is required")
    apps_raw = apps_raw or {}
    apps: dict[str, AppSpec] = {}
    for name, body in apps_raw.items():
        key = f"apps.{name}"
        if found.catch(partial(_name, name, key), None) is not None:
            app = found.catch(partial(_app, name, body, key, base_dir, found), None)
            if app is not None:
                apps[name] = app
    _check_sink_paths(apps, server if server_known else ServerSpec(), found)
    if store.url.startswith("memory://") and "store" not in unsure:
        for name, app in apps.items():
            if app.grant_type is GrantType.AUTHORIZATION_CODE:
                found.add(
                    "store.url",
                    f"memory:// cannot hold app {name}'s token set: `token-broker authorize` "
                    "writes it to the shared store the brokers read; use a redis:// store",
                )
    clients_raw: dict[str, Any] = found.catch(
        lambda: _mapping(root.get("clients") or {}, "clients"), {}
    )
    clients: dict[str, ClientSpec] = {}
    for name, body in clients_raw.items():
        key = f"clients.{name}"
        if found.catch(partial(_name, name, key), None) is not None:
            client = found.catch(
                partial(_client, name, body, key, base_dir, app_names=set(apps_raw), found=found),
                None,
            )
            if client is not None:
                clients[name] = client
    _check_peer_identities(clients, server, found, server_known=server_known)
    found.raise_found()
    return Config(server=server, store=store, apps=apps, clients=clients)


# ---- sections --------------------------------------------------------------------------------


def _server(data: object, key: str, found: _Mistakes) -> ServerSpec:
    m = _mapping(data, key)
    unsure = _only(m, key, schema.SERVER, found)
    d = ServerSpec()
    listen = found.catch(
        lambda: _listen(m.get("listen", d.listen), f"{key}.listen", allow_unix=True), None
    )
    if "listen" in unsure:
        # Left out, and an unknown key looks like it: the rules that read it would only guess.
        listen = None
    metrics_listen = found.catch(
        lambda: _listen(m.get("metrics_listen", d.metrics_listen), f"{key}.metrics_listen"),
        d.metrics_listen,
    )
    allow = found.catch(
        lambda: _bool(m.get("allow_non_loopback", False), f"{key}.allow_non_loopback"), True
    )
    if listen is not None and not allow and not _is_loopback_listen(listen):
        found.add(
            f"{key}.listen",
            f"{listen} is not a loopback address; the API serves tokens and stays on localhost "
            "unless server.allow_non_loopback is true",
        )
    socket_mode, socket_group = _socket_settings(m, key, listen, found)
    status_endpoint = found.catch(
        lambda: _bool(m.get("status_endpoint", False), f"{key}.status_endpoint"), False
    )
    return ServerSpec(
        listen=d.listen if listen is None else listen,
        metrics_listen=metrics_listen,
        allow_non_loopback=allow,
        socket_mode=socket_mode,
        socket_group=socket_group,
        status_endpoint=status_endpoint,
    )


_SOCKET_KEYS = {"socket_mode", "socket_group"}


def _socket_settings(
    m: Mapping[str, Any], key: str, listen: str | None, found: _Mistakes
) -> tuple[int, int | None]:
    """`server.socket_mode` and `server.socket_group`: who may connect to the API's unix socket."""
    given = sorted(_SOCKET_KEYS & set(m))
    if given and listen is not None and not listen.startswith("unix:"):
        found.add(f"{key}.{given[0]}", "applies only when server.listen is unix:/path")
    d = ServerSpec()
    mode = found.catch(lambda: _socket_mode(m.get("socket_mode", "0660"), key), d.socket_mode)
    raw_group = m.get("socket_group")
    group = found.catch(
        lambda: None if raw_group is None else _group_id(raw_group, f"{key}.socket_group"), None
    )
    return mode, group


def _socket_mode(value: object, key: str) -> int:
    mode = _octal_mode(value, f"{key}.socket_mode")
    if mode & 0o200 == 0:
        # Connecting to a unix socket needs write permission on it.
        raise ConfigError(f"{key}.socket_mode", "the owner needs write permission (e.g. 0660)")
    return mode


def _store(data: object, key: str, base_dir: Path, found: _Mistakes) -> StoreSpec:
    m = _mapping(data, key)
    unsure = _only(m, key, schema.STORE, found)
    # An empty URL stands for a wrong one: the checks that depend on the scheme are left out.
    url = found.catch(lambda: _store_url(m.get("url", "memory://"), f"{key}.url"), "")
    prefix = found.catch(lambda: _key_prefix(m.get("key_prefix", "token-broker"), key), "")
    key_file = found.catch(
        lambda: _optional_path(
            m.get("encryption_key_file"), f"{key}.encryption_key_file", base_dir
        ),
        None,
    )
    if url and not url.startswith("memory://"):
        if m.get("encryption_key_file") is None and "encryption_key_file" not in unsure:
            found.add(
                f"{key}.encryption_key_file",
                "required for a shared store (tokens are encrypted at rest)",
            )
        elif key_file is not None:
            found.catch(
                lambda: _check_encryption_key_file(key_file, f"{key}.encryption_key_file"), None
            )
    password_file = found.catch(
        lambda: _optional_path(m.get("password_file"), f"{key}.password_file", base_dir), None
    )
    if password_file is not None:
        found.catch(lambda: _read_secret_file(password_file, f"{key}.password_file"), "")
    require_ack, ack_timeout = _replica_ack(m, key, url, found)
    return StoreSpec(
        url=url,
        key_prefix=prefix,
        encryption_key_file=key_file,
        password_file=password_file,
        require_replica_ack=require_ack,
        replica_ack_timeout=ack_timeout,
    )


# Schemes whose primary is replaced by a failover on its own: a `sent` record that no replica
# holds may vanish, or stay behind on the old primary while the fleet writes to the new one.
_FAILOVER_SCHEMES = ("redis+sentinel", "redis+cluster")
# WAIT blocks the connection it runs on (the client's socket timeout is raised to outlast it),
# and a spend waits that long before sending: a few seconds at most.
MAX_REPLICA_ACK_TIMEOUT = 5.0


def _replica_ack(m: Mapping[str, Any], key: str, url: str, found: _Mistakes) -> tuple[bool, float]:
    """`store.require_replica_ack` (default: on for Sentinel and Cluster) and its timeout.

    `url` is "" when it was wrong: the checks that depend on the scheme are left out.
    """
    scheme = url.partition("://")[0]
    default = scheme in _FAILOVER_SCHEMES
    before = len(found)
    require = found.catch(
        lambda: _bool(m.get("require_replica_ack", default), f"{key}.require_replica_ack"),
        default,
    )
    require_known = bool(url) and len(found) == before
    if require and scheme == "memory":
        found.add(f"{key}.require_replica_ack", "a memory:// store has no replicas to acknowledge")
    default_timeout = StoreSpec().replica_ack_timeout
    timeout = found.catch(
        lambda: _replica_ack_timeout(
            m.get("replica_ack_timeout", default_timeout), f"{key}.replica_ack_timeout"
        ),
        default_timeout,
    )
    if "replica_ack_timeout" in m and require_known and not require:
        found.add(
            f"{key}.replica_ack_timeout", "applies only when store.require_replica_ack is true"
        )
    return require, timeout


def _replica_ack_timeout(value: object, key: str) -> float:
    timeout = parse_duration(value, key)
    if timeout > MAX_REPLICA_ACK_TIMEOUT:
        raise ConfigError(
            key, f"at most {MAX_REPLICA_ACK_TIMEOUT:g}s (a spend waits this long before sending)"
        )
    return timeout


def _store_url(value: object, key: str) -> str:
    url = _str(value, key)
    scheme = url.partition("://")[0]
    if "://" not in url or scheme not in STORE_SCHEMES:
        raise ConfigError(key, f"scheme must be one of {', '.join(STORE_SCHEMES)}")
    if urlsplit(url.replace("redis+", "redis-", 1)).password and not url.startswith("memory"):
        raise ConfigError(
            key, "holds a password: give it as store.password_file (secrets are files)"
        )
    return url


def _key_prefix(value: object, key: str) -> str:
    prefix = _str(value, f"{key}.key_prefix")
    if not prefix or any(c in prefix for c in "{} \t\n"):
        raise ConfigError(f"{key}.key_prefix", "must be non-empty, without braces or spaces")
    return prefix


def _app(name: str, data: object, key: str, base_dir: Path, found: _Mistakes) -> AppSpec:
    m = _mapping(data, key)
    unsure = _only(m, key, schema.APP, found)
    # A wrong (or maybe mistyped) grant_type or client_auth is None: the checks that depend on
    # it are left out.
    grant = (
        None
        if "grant_type" in unsure
        else found.catch(
            lambda: _enum(
                m.get("grant_type", "client_credentials"), f"{key}.grant_type", GrantType
            ),
            None,
        )
    )
    auth = (
        None
        if "client_auth" in unsure
        else found.catch(
            lambda: _enum(
                m.get("client_auth", "client_secret_post"), f"{key}.client_auth", ClientAuth
            ),
            None,
        )
    )
    token_url = ""
    if "token_url" not in m:
        if "token_url" not in unsure:
            found.add(f"{key}.token_url", "required")
    else:
        token_url = found.catch(lambda: _url(m["token_url"], f"{key}.token_url"), "")

    def path(field: str) -> Path | None:
        return found.catch(lambda: _optional_path(m.get(field), f"{key}.{field}", base_dir), None)

    def read(file: Path | None, field: str) -> None:
        if file is not None:
            found.catch(lambda: _read_secret_file(file, f"{key}.{field}"), "")

    client_id: str | None = None
    client_id_file = path("client_id_file")
    if not {"client_id", "client_id_file"} & unsure and (m.get("client_id") is None) == (
        m.get("client_id_file") is None
    ):
        found.add(f"{key}.client_id", "give exactly one of client_id and client_id_file")
    if m.get("client_id") is not None:
        client_id = found.catch(lambda: _client_id(m["client_id"], f"{key}.client_id"), None)
    read(client_id_file, "client_id_file")

    secret_file = path("client_secret_file")
    previous_file = path("client_secret_previous_file")
    key_file = path("private_key_file")
    if auth is ClientAuth.PRIVATE_KEY_JWT:
        if m.get("private_key_file") is None and "private_key_file" not in unsure:
            found.add(f"{key}.private_key_file", "required for client_auth private_key_jwt")
        elif key_file is not None:
            found.catch(lambda: _check_private_key(key_file, f"{key}.private_key_file"), None)
    elif auth is not None:
        if m.get("client_secret_file") is None and "client_secret_file" not in unsure:
            found.add(f"{key}.client_secret_file", f"required for client_auth {auth.value}")
        read(secret_file, "client_secret_file")
        read(previous_file, "client_secret_previous_file")

    authorize_url = redirect_uri = None
    if m.get("authorize_url") is not None:
        authorize_url = found.catch(lambda: _url(m["authorize_url"], f"{key}.authorize_url"), None)
    if m.get("redirect_uri") is not None:
        redirect_uri = found.catch(
            lambda: _url(m["redirect_uri"], f"{key}.redirect_uri", allow_http=True), None
        )
    if grant is GrantType.AUTHORIZATION_CODE:
        for field in ("authorize_url", "redirect_uri"):
            if m.get(field) is None and field not in unsure:
                found.add(f"{key}.{field}", "required for grant_type authorization_code")

    d = AppSpec(name=name, token_url="")
    return AppSpec(
        name=name,
        token_url=token_url,
        grant_type=grant or d.grant_type,
        required=found.catch(lambda: _bool(m.get("required", True), f"{key}.required"), True),
        client_id=client_id,
        client_id_file=client_id_file,
        client_secret_file=secret_file,
        client_secret_previous_file=previous_file,
        client_auth=auth or d.client_auth,
        private_key_file=key_file,
        private_key_id=found.catch(
            lambda: _optional_str(m.get("private_key_id"), f"{key}.private_key_id"), None
        ),
        assertion_audience=found.catch(
            lambda: _optional_str(m.get("assertion_audience"), f"{key}.assertion_audience"), None
        ),
        scopes=found.catch(lambda: _scopes(m.get("scopes", []), f"{key}.scopes"), ()),
        audience=found.catch(lambda: _optional_str(m.get("audience"), f"{key}.audience"), None),
        extra_params=found.catch(lambda: _params(m.get("extra_params"), f"{key}.extra_params"), {}),
        refresh=found.catch(
            lambda: _refresh(m.get("refresh") or {}, f"{key}.refresh", found), d.refresh
        ),
        authorize_url=authorize_url,
        redirect_uri=redirect_uri,
        pkce=found.catch(lambda: _bool(m.get("pkce", True), f"{key}.pkce"), True),
        authorize_params=found.catch(
            lambda: _params(m.get("authorize_params"), f"{key}.authorize_params"), {}
        ),
        proxy=found.catch(lambda: _proxy(m["proxy"], f"{key}.proxy", base_dir, found), None)
        if "proxy" in m
        else None,
        sinks=found.catch(lambda: _sinks(m.get("sinks"), f"{key}.sinks", found), ()),
        max_token_requests_per_minute=found.catch(
            lambda: _request_budget(
                m.get("max_token_requests_per_minute"), f"{key}.max_token_requests_per_minute"
            ),
            None,
        ),
    )


def _client_id(value: object, key: str) -> str:
    client_id = _str(value, key)
    if not client_id:
        raise ConfigError(key, "must not be empty")
    return client_id


def _scopes(value: object, key: str) -> tuple[str, ...]:
    scopes = _str_list(value, key)
    if len(scopes) > MAX_SCOPES:
        raise ConfigError(key, f"{len(scopes)} scopes; at most {MAX_SCOPES} allowed")
    for i, scope in enumerate(scopes):
        if not scope or any(c.isspace() for c in scope):
            raise ConfigError(f"{key}[{i}]", "a scope is one non-empty word")
    if len(set(scopes)) != len(scopes):
        raise ConfigError(key, "lists a scope twice")
    return tuple(scopes)


def _sinks(data: object, key: str, found: _Mistakes) -> tuple[SinkSpec, ...]:
    """`apps.<name>.sinks`: files the app's token is written to."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(key, f"must be a list, not {_type(data)}")
    sinks = (
        found.catch(partial(_sink, item, f"{key}[{i}]", found), None) for i, item in enumerate(data)
    )
    return tuple(sink for sink in sinks if sink is not None)


def _sink(data: object, key: str, found: _Mistakes) -> SinkSpec | None:
    m = _mapping(data, key)
    unsure = _only(m, key, schema.SINK, found)
    if "path" not in m:
        if "path" in unsure:
            return None
        raise ConfigError(f"{key}.path", "required")
    text = _str(m["path"], f"{key}.path")
    path = Path(text)
    if not path.is_absolute() or text.endswith("/") or os.path.normpath(text) != text:
        raise ConfigError(f"{key}.path", f"{text!r} is not a normalized absolute file path")
    owner = m.get("owner")
    group = m.get("group")
    return SinkSpec(
        path=path,
        format=found.catch(
            lambda: _enum(m.get("format", "raw"), f"{key}.format", SinkFormat), SinkFormat.RAW
        ),
        mode=found.catch(lambda: _sink_mode(m.get("mode", "0600"), f"{key}.mode"), 0o600),
        owner=found.catch(lambda: None if owner is None else _user_id(owner, f"{key}.owner"), None),
        group=found.catch(
            lambda: None if group is None else _group_id(group, f"{key}.group"), None
        ),
    )


def _sink_mode(value: object, key: str) -> int:
    mode = _octal_mode(value, key)
    if mode & ~MAX_SINK_MODE:
        raise ConfigError(
            key,
            f"{mode:04o} grants write or execute; a token file is at most 0644 (read for others)",
        )
    return mode


def _check_sink_paths(apps: Mapping[str, AppSpec], server: ServerSpec, found: _Mistakes) -> None:
    """Each token file belongs to one sink of one app, and is not the API's socket."""
    seen: dict[Path, str] = {}
    if server.unix_path is not None:
        seen[Path(server.unix_path)] = "server.listen"
    for name, app in apps.items():
        for i, sink in enumerate(app.sinks):
            where = f"apps.{name}.sinks[{i}].path"
            if sink.path in seen:
                found.add(where, f"{sink.path} is already used by {seen[sink.path]}")
            else:
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


def _refresh(data: object, key: str, found: _Mistakes) -> RefreshPolicy:
    m = _mapping(data, key)
    _only(m, key, schema.REFRESH, found)
    d = RefreshPolicy()

    def duration(field: str, *, allow_zero: bool = False) -> float:
        default: float = getattr(d, field)
        value = m.get(field, default)
        return found.catch(
            lambda: parse_duration(value, f"{key}.{field}", allow_zero=allow_zero), default
        )

    return RefreshPolicy(
        at_fraction=found.catch(
            lambda: _at_fraction(m.get("at_fraction", d.at_fraction), f"{key}.at_fraction"),
            d.at_fraction,
        ),
        min_remaining=duration("min_remaining", allow_zero=True),
        jitter=found.catch(lambda: _jitter(m.get("jitter", d.jitter), f"{key}.jitter"), d.jitter),
        safety_margin=duration("safety_margin", allow_zero=True),
        default_lifetime=duration("default_lifetime"),
        reuse_grace=duration("reuse_grace", allow_zero=True),
        read_timeout=duration("read_timeout"),
        server_transactional=found.catch(
            lambda: _bool(
                m.get("server_transactional", d.server_transactional),
                f"{key}.server_transactional",
            ),
            d.server_transactional,
        ),
    )


def _at_fraction(value: object, key: str) -> float:
    at_fraction = _fraction(value, key)
    if not 0 < at_fraction < 1:
        raise ConfigError(key, "must be between 0 and 1 (exclusive)")
    return at_fraction


def _jitter(value: object, key: str) -> float:
    jitter = _fraction(value, key)
    if not 0 <= jitter < 0.5:
        raise ConfigError(key, "must be at least 0 and below 0.5")
    return jitter


def _client(
    name: str, data: object, key: str, base_dir: Path, *, app_names: set[str], found: _Mistakes
) -> ClientSpec:
    m = _mapping(data, key)
    unsure = _only(m, key, schema.CLIENT, found)
    before = len(found)
    key_files = []
    for field in ("key_file", "key_previous_file"):
        path = found.catch(
            partial(_client_key_file, m.get(field), f"{key}.{field}", base_dir), None
        )
        if path is not None:
            key_files.append(path)
    digests: tuple[str, ...] = found.catch(
        lambda: _digests(m.get("key_sha256"), f"{key}.key_sha256"), ()
    )
    uids: tuple[int, ...] = found.catch(lambda: _unix_ids(m.get("uids"), f"{key}.uids"), ())
    gids: tuple[int, ...] = found.catch(lambda: _unix_ids(m.get("gids"), f"{key}.gids"), ())
    # A wrong identity key is reported as itself, not again as a missing identity.
    identities = {"key_file", "key_sha256", "uids", "gids"}
    if (
        len(found) == before
        and not identities & unsure
        and not (key_files or digests or uids or gids)
    ):
        found.add(key, "needs an identity: key_file, key_sha256, uids or gids")
    if "key_previous_file" in m and "key_file" not in m and "key_file" not in unsure:
        found.add(f"{key}.key_previous_file", "goes with key_file")
    allowed: tuple[str, ...] = (
        ()
        if "apps" in unsure and "apps" not in m
        else found.catch(lambda: _client_apps(m.get("apps", []), f"{key}.apps", app_names), ())
    )
    return ClientSpec(
        name=name,
        apps=allowed,
        key_files=tuple(key_files),
        key_sha256=digests,
        uids=uids,
        gids=gids,
    )


def _client_key_file(value: object, key: str, base_dir: Path) -> Path | None:
    path = _optional_path(value, key, base_dir)
    if path is not None and len(_read_secret_file(path, key)) < MIN_CLIENT_KEY:
        raise ConfigError(key, f"the key must be at least {MIN_CLIENT_KEY} characters")
    return path


def _digests(value: object, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    digests = []
    for i, digest in enumerate(_str_list(values, key)):
        if not _HEX64.match(digest):
            raise ConfigError(f"{key}[{i}]", "must be 64 hex digits (a SHA-256)")
        digests.append(digest.lower())
    return tuple(digests)


def _client_apps(value: object, key: str, app_names: set[str]) -> tuple[str, ...]:
    allowed = _str_list(value, key)
    if not allowed:
        raise ConfigError(key, "lists no app")
    for i, app in enumerate(allowed):
        if app not in app_names:
            raise ConfigError(f"{key}[{i}]", f"unknown app {app!r}")
    return tuple(allowed)


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


def _check_peer_identities(
    clients: Mapping[str, ClientSpec],
    server: ServerSpec,
    found: _Mistakes,
    *,
    server_known: bool,
) -> None:
    """Peer identity needs the unix socket, and one uid (or gid) names one client."""
    for field in ("uids", "gids"):
        owner: dict[int, str] = {}
        for name, client in clients.items():
            ids: tuple[int, ...] = getattr(client, field)
            if ids and server_known and server.unix_path is None:
                found.add(
                    f"clients.{name}.{field}",
                    "peer identity works only over a unix socket: set server.listen to "
                    "unix:/path (a TCP peer's address says nothing about who is calling)",
                )
            for i, unix_id in enumerate(ids):
                if unix_id in owner:
                    found.add(
                        f"clients.{name}.{field}[{i}]",
                        f"{unix_id} already identifies client {owner[unix_id]}",
                    )
                else:
                    owner[unix_id] = name


# ---- apps.<name>.proxy -----------------------------------------------------------------------

# Each request in flight may hold its buffered body in memory: bounded per request.
MAX_BUFFERED_BODY = 16 * 1024 * 1024
MAX_CONCURRENT = schema.MAX_CONCURRENT
_SIZE = re.compile(r"^([0-9]+)\s*(B|KiB|MiB|GiB)?$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


def _proxy(data: object, key: str, base_dir: Path, found: _Mistakes) -> ProxySpec:
    """The injecting proxy of one app: a fixed upstream origin and its limits."""
    m = _mapping(data, key)
    unsure = _only(m, key, schema.PROXY, found)
    d = ProxySpec(upstream="")
    upstream = ""
    if "upstream" not in m:
        if "upstream" not in unsure:
            found.add(f"{key}.upstream", "required (the scheme and host of the real API)")
    else:
        upstream = found.catch(lambda: _upstream(m["upstream"], f"{key}.upstream"), "")
    prefixes = found.catch(
        lambda: _path_prefixes(m.get("path_prefixes", list(d.path_prefixes)), key),
        d.path_prefixes,
    )
    max_request_body = found.catch(
        lambda: _request_body(m.get("max_request_body", d.max_request_body), key), None
    )
    max_buffered_body = found.catch(
        lambda: _buffered_body(m.get("max_buffered_body", d.max_buffered_body), key), None
    )
    if (
        max_buffered_body is not None
        and max_request_body is not None
        and max_buffered_body > max_request_body
    ):
        found.add(f"{key}.max_buffered_body", "must not exceed max_request_body")
    ca_file = found.catch(
        lambda: _optional_path(m.get("ca_file"), f"{key}.ca_file", base_dir), None
    )
    if ca_file is not None:
        found.catch(lambda: _check_ca_file(ca_file, f"{key}.ca_file"), None)
    return ProxySpec(
        upstream=upstream,
        path_prefixes=prefixes,
        connect_timeout=found.catch(
            lambda: parse_duration(
                m.get("connect_timeout", d.connect_timeout), f"{key}.connect_timeout"
            ),
            d.connect_timeout,
        ),
        read_timeout=found.catch(
            lambda: parse_duration(m.get("read_timeout", d.read_timeout), f"{key}.read_timeout"),
            d.read_timeout,
        ),
        max_buffered_body=d.max_buffered_body if max_buffered_body is None else max_buffered_body,
        max_request_body=d.max_request_body if max_request_body is None else max_request_body,
        ca_file=ca_file,
        retry_on_401=found.catch(
            lambda: _bool(m.get("retry_on_401", d.retry_on_401), f"{key}.retry_on_401"),
            d.retry_on_401,
        ),
        max_concurrent=found.catch(
            lambda: _max_concurrent(m.get("max_concurrent", d.max_concurrent), key),
            d.max_concurrent,
        ),
    )


def _path_prefixes(value: object, key: str) -> tuple[str, ...]:
    prefixes = _str_list(value, f"{key}.path_prefixes")
    if not prefixes:
        raise ConfigError(f"{key}.path_prefixes", "lists no prefix (leave it out to allow all)")
    return tuple(
        _path_prefix(prefix, f"{key}.path_prefixes[{i}]") for i, prefix in enumerate(prefixes)
    )


def _request_body(value: object, key: str) -> int:
    size = _size(value, f"{key}.max_request_body")
    if size == 0:
        raise ConfigError(f"{key}.max_request_body", "must be positive")
    return size


def _buffered_body(value: object, key: str) -> int:
    size = _size(value, f"{key}.max_buffered_body")
    if size > MAX_BUFFERED_BODY:
        raise ConfigError(
            f"{key}.max_buffered_body",
            "at most 16MiB (every request in flight may hold this much in memory)",
        )
    return size


def _max_concurrent(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENT:
        raise ConfigError(
            f"{key}.max_concurrent", f"must be a whole number from 1 to {MAX_CONCURRENT}"
        )
    return value


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


def _only(m: Mapping[str, Any], key: str, allowed: Mapping[str, Any], found: _Mistakes) -> set[str]:
    """Record each key of `m` that `allowed` (a table of broker/schema.py) does not hold.

    Returns the allowed keys that `m` leaves out and a mistyped key may have meant (the
    did-you-mean): a rule that needs one of them is not checked, since it would only guess.
    """
    unsure: set[str] = set()
    for k in m:
        if k not in allowed:
            close = difflib.get_close_matches(k, sorted(allowed), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            unsure.update(c for c in close if c not in m)
            found.add(
                f"{key}.{k}" if key != "<config>" else k,
                f"unknown key; {hint}(allowed: {', '.join(sorted(allowed))})",
            )
    return unsure


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


def _listen(value: object, key: str, *, allow_unix: bool = False) -> str:
    text = _str(value, key)
    _listen_address(text, key, allow_unix=allow_unix)
    return text


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
        + (", encrypted)" if config.store.encryption_key_file else ", in memory)")
        + (
            f", a replica acknowledges each spend (WAIT, {config.store.replica_ack_timeout:g}s)"
            if config.store.require_replica_ack
            else ""
        ),
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

"""The YAML configuration: schema, validation with precise errors, and a secret-free summary.

Every mistake raises ConfigError naming the dotted key (`apps.twilio.refresh.jitter`) and why.
Relative `*_file` paths resolve against the config file's directory.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
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
    RefreshPolicy,
    ServerSpec,
    StoreSpec,
)

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_SCOPES = 100
MIN_CLIENT_KEY = 32
MIN_RSA_BITS = 2048
STORE_SCHEMES = ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster")
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")

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
    clients_raw = _mapping(root.get("clients") or {}, "clients")
    clients = {
        name: _client(name, body, f"clients.{name}", base_dir, apps)
        for name, body in clients_raw.items()
    }
    return Config(server=server, store=store, apps=apps, clients=clients)


# ---- sections --------------------------------------------------------------------------------


def _server(data: object, key: str) -> ServerSpec:
    m = _mapping(data, key)
    _only(m, key, {"listen", "metrics_listen", "allow_non_loopback"})
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
    return ServerSpec(listen=listen, metrics_listen=metrics_listen, allow_non_loopback=allow)


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
    )


def _refresh(data: object, key: str) -> RefreshPolicy:
    m = _mapping(data, key)
    _only(m, key, {"at_fraction", "min_remaining", "jitter", "safety_margin", "default_lifetime"})
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
    )


def _client(
    name: object, data: object, key: str, base_dir: Path, apps: Mapping[str, AppSpec]
) -> ClientSpec:
    name = _name(name, key)
    m = _mapping(data, key)
    _only(m, key, {"key_file", "key_previous_file", "key_sha256", "apps"})
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
    if not key_files and not digests:
        raise ConfigError(key, "needs key_file or key_sha256")
    if "key_previous_file" in m and "key_file" not in m:
        raise ConfigError(f"{key}.key_previous_file", "goes with key_file")
    allowed = _str_list(m.get("apps", []), f"{key}.apps")
    if not allowed:
        raise ConfigError(f"{key}.apps", "lists no app")
    for i, app in enumerate(allowed):
        if app not in apps:
            raise ConfigError(f"{key}.apps[{i}]", f"unknown app {app!r}")
    return ClientSpec(
        name=name, apps=tuple(allowed), key_files=tuple(key_files), key_sha256=tuple(digests)
    )


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
            raise ConfigError(
                f"{key}.{k}" if key != "<config>" else k,
                f"unknown key (allowed: {', '.join(sorted(allowed))})",
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
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"{text!r} is not an http(s) URL with a host")
    if parts.scheme == "http" and not allow_http and not _is_loopback_host(parts.hostname):
        raise ConfigError(key, "must use https (plain http only for loopback hosts)")
    return text


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
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"{value!r} is not host:port")


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


# ---- summary -------------------------------------------------------------------------------


def summarize(config: Config) -> str:
    """What `check-config` prints: everything an operator checks, never a secret."""
    lines = [
        f"API:      {config.server.listen}",
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
    lines.append(f"clients ({len(config.clients)}):")
    for client in config.clients.values():
        keys = len(client.key_files) + len(client.key_sha256)
        lines.append(f"  {client.name}: apps {', '.join(client.apps)} ({keys} key(s))")
    return "\n".join(lines)


def redact_url(url: str) -> str:
    """`url` with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()

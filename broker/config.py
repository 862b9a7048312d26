"""The YAML configuration: structured into the typed schema, the rules across keys, a summary.

The schema is the annotated dataclasses of broker/model.py (and broker/schema.py's ClientEntry):
cattrs structures a file into them, calling each key's rule. Every mistake is a ConfigError
naming the dotted key (`apps.twilio.refresh.jitter`) and why; one pass finds them all, and a
file with several raises ConfigErrors listing each. The validators here are what a key's own
rule cannot say: several keys together, files, the host. They run beside a section's wrong
keys, on the keys that are right, and leave out each rule that reads a wrong key (it is
reported once, not again by each rule that reads it).
Relative `*_file` paths resolve against the config file's directory.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import difflib
import enum
import ipaddress
import math
import os
import re
import ssl
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import cattrs
import yaml
from cattrs.errors import AttributeValidationNote, IterableValidationNote
from cattrs.gen import make_dict_structure_fn, override

from broker import egress, schema
from broker.credentials import UnusableAssertion, assertion_expiry
from broker.errors import ConfigError, ConfigErrors
from broker.model import (
    AppSpec,
    AssertionType,
    ClientAuth,
    ClientSpec,
    Config,
    DpopAlgorithm,
    GrantType,
    ProxySpec,
    ServerSpec,
    SinkSpec,
    StoreSpec,
)
from broker.schema import ClientEntry, Invalid, type_name

MIN_CLIENT_KEY = 32
MIN_RSA_BITS = 2048
# Schemes whose primary is replaced by a failover on its own: a `sent` record that no replica
# holds may vanish, or stay behind on the old primary while the fleet writes to the new one.
_FAILOVER_SCHEMES = ("redis+sentinel", "redis+cluster")

T = TypeVar("T")
# (where below the section, why): `.listen`, `[0].path`, or "" for the section itself.
Found = list[tuple[str, str]]


class Mistakes(Exception):
    """The mistakes found in one section, each at its place below it."""

    def __init__(self, found: Found) -> None:
        super().__init__(found)
        self.found = found


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
    token = schema.BASE_DIR.set(base_dir)
    try:
        return _parse_config(data)
    finally:
        schema.BASE_DIR.reset(token)


def parse_duration(value: object, key: str, *, allow_zero: bool = False) -> float:
    """Seconds from a number or a string like `90s`, `5m`, `1h`, `1h30m`."""
    try:
        return schema.seconds(value, allow_zero=allow_zero)
    except Invalid as exc:
        raise ConfigError(key, exc.reason) from None


def _parse_config(data: object) -> Config:
    found: list[ConfigError] = []

    def section(cls: type[T], value: object, key: str, **given: object) -> T | None:
        try:
            return _section(cls, value, given)
        except Mistakes as exc:
            found.extend(ConfigError(f"{key}{at}", reason) for at, reason in exc.found)
            return None

    def mapping(value: object, key: str) -> dict[str, Any] | None:
        try:
            return _mapping(value)
        except Invalid as exc:
            found.append(ConfigError(f"{key}{exc.at}", exc.reason))
            return None

    sections = mapping(data, "<config>")
    if sections is None:
        raise found[0]  # not a mapping at all: nothing else can be read
    unknown, unsure = _unknown(sections, dict.fromkeys(schema.ROOT_KEYS))
    found.extend(ConfigError(at.lstrip("."), reason) for at, reason in unknown)
    server = section(ServerSpec, sections.get("server"), "server")
    # Rules that read server.listen are left out when the section is wrong (or its name is
    # mistyped): they would only echo it.
    server_known = server is not None and "server" not in unsure
    store = section(StoreSpec, sections.get("store"), "store")
    apps_raw = mapping(sections.get("apps"), "apps")
    apps_given = apps_raw or {}
    if apps_raw is not None and not apps_given and "apps" not in unsure:
        found.append(ConfigError("apps", "at least one app is required"))
    apps: dict[str, AppSpec] = {}
    for name, body in apps_given.items():
        if _named(name, f"apps.{name}", found):
            app = section(AppSpec, body, f"apps.{name}", name=name)
            if app is not None:
                apps[name] = app
    _check_sink_paths(apps, server if server_known and server else ServerSpec(), found)
    if store is not None and not store.url.startswith("memory://") and "store" not in unsure:
        found.extend(
            ConfigError(
                f"apps.{name}.dpop_key_file",
                "required for dpop with a shared store: every replica proves with the key the "
                "fleet's token set is bound to",
            )
            for name, app in apps.items()
            if app.dpop and app.dpop_key_file is None
        )
    if store is not None and store.url.startswith("memory://") and "store" not in unsure:
        for name, app in apps.items():
            if app.grant_type is GrantType.AUTHORIZATION_CODE:
                found.append(
                    ConfigError(
                        "store.url",
                        f"memory:// cannot hold app {name}'s token set: `token-broker "
                        "authorize` writes it to the shared store the brokers read; use a "
                        "redis:// store",
                    )
                )
    clients: dict[str, ClientSpec] = {}
    for name, body in (mapping(sections.get("clients"), "clients") or {}).items():
        key = f"clients.{name}"
        entry = section(ClientEntry, body, key) if _named(name, key, found) else None
        if entry is None:
            continue
        unknown_apps = [(i, a) for i, a in enumerate(entry.apps) if a not in apps_given]
        found.extend(ConfigError(f"{key}.apps[{i}]", f"unknown app {a!r}") for i, a in unknown_apps)
        if not unknown_apps:
            clients[name] = ClientSpec(
                name=name,
                apps=entry.apps,
                key_files=tuple(p for p in (entry.key_file, entry.key_previous_file) if p),
                key_sha256=entry.key_sha256,
                uids=entry.uids,
                gids=entry.gids,
            )
    _check_peer_identities(clients, server, found, server_known=server_known)
    if len(found) == 1:
        raise found[0]
    if found:
        raise ConfigErrors(found)
    return Config(
        server=server or ServerSpec(), store=store or StoreSpec(), apps=apps, clients=clients
    )


def _named(name: str, key: str, found: list[ConfigError]) -> bool:
    if schema.NAME.match(name):
        return True
    found.append(ConfigError(key, "names match [a-z0-9][a-z0-9_-]{0,62}"))
    return False


# ---- structuring ---------------------------------------------------------------------------

_converter = cattrs.Converter(detailed_validation=True)


def _mapping(value: object) -> dict[str, Any]:
    """A YAML mapping with string keys; null is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(f"must be a mapping, not {type_name(value)}")
    for k in value:
        if not isinstance(k, str):
            raise Invalid("keys must be strings", f".{k}")
    return value


def _rule_hook(kind: Any) -> Callable[[object, Any], object]:
    rule = schema.rule_of(kind)
    assert rule is not None
    optional = type(None) in typing.get_args(typing.get_args(kind)[0])

    def structure(value: object, _: object) -> object:
        return None if value is None and optional else rule.parse(value)

    return structure


_converter.register_structure_hook_factory(lambda t: schema.rule_of(t) is not None, _rule_hook)


def _enum(value: object, kind: type[enum.StrEnum]) -> enum.StrEnum:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, not {type_name(value)}")
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise Invalid(f"{value!r} is not one of {choices}") from None


_converter.register_structure_hook(enum.StrEnum, _enum)


def _sinks(value: object, _: object) -> tuple[SinkSpec, ...]:
    """`apps.<name>.sinks`: files the app's token is written to."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise Invalid(f"must be a list, not {type_name(value)}")
    sinks: list[SinkSpec] = []
    found: Found = []
    for i, item in enumerate(value):
        try:
            sinks.append(_section(SinkSpec, item, {}))
        except Mistakes as exc:
            found.extend((f"[{i}]{at}", reason) for at, reason in exc.found)
    if found:
        raise Mistakes(found)
    return tuple(sinks)


_converter.register_structure_hook_func(lambda t: t == tuple[SinkSpec, ...], _sinks)
_converter.register_structure_hook_factory(
    dataclasses.is_dataclass, lambda cls: lambda value, _: _section(cls, value, {})
)

# Generated once per class: cattrs writes (and caches) a structuring function for each.
_STRUCTURE: dict[type, Callable[[Mapping[str, Any], type], Any]] = {}


def _section(cls: type[T], value: object, given: Mapping[str, object]) -> T:
    """One mapping of the file as `cls`, its validator applied; raises Mistakes with them all."""
    try:
        m = _mapping(value)
    except Invalid as exc:
        raise Mistakes([(exc.at, exc.reason)]) from None
    keys = schema.file_keys(cls)
    found, unsure = _unknown(m, keys)
    if cls not in _STRUCTURE:
        # The rule of each key, given explicitly: cattrs reads string annotations without
        # their Annotated metadata.
        rules = {
            name: override(struct_hook=_rule_hook(kind))
            for name, kind in keys.items()
            if schema.rule_of(kind) is not None
        }
        _STRUCTURE[cls] = make_dict_structure_fn(
            cls,
            _converter,
            _cattrs_detailed_validation=True,
            **rules,  # type: ignore[arg-type]
        )
    failed: set[str] = set()
    spec: T | None = None
    try:
        spec = _STRUCTURE[cls]({**{k: m[k] for k in m if k in keys}, **given}, cls)
    except cattrs.ClassValidationError as group:
        for wrong in group.exceptions:
            field = next(n.name for n in wrong.__notes__ if isinstance(n, AttributeValidationNote))
            failed.add(field)
            if isinstance(wrong, KeyError):
                if field not in unsure:
                    rule = schema.rule_of(keys[field])
                    found.append((f".{field}", rule.required if rule else "required"))
            else:
                found.extend((f".{field}{at}", reason) for at, reason in _reasons(wrong))
    validate = _VALIDATORS.get(cls)
    if validate is not None:
        # The rules run even when some keys are wrong, on the keys that are right: each rule
        # leaves out what reads a wrong (or maybe mistyped) key, which it would only echo.
        partial = spec if spec is not None else _partial(cls, m, keys, failed, given)
        spec, broken = validate(partial, m, failed | unsure)
        found.extend(broken)
    if found:
        raise Mistakes(found)
    assert spec is not None
    return spec


def _partial(
    cls: type[T], m: Mapping[str, Any], keys: Mapping[str, Any], failed: set[str], given: Any
) -> T:
    """`cls` from the keys of `m` that structured well; a wrong required key is None (the
    validators leave out every rule that reads a wrong key)."""
    values = dict(given)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = field.name
        if name in failed:
            required = field.default is dataclasses.MISSING
            if required and field.default_factory is dataclasses.MISSING:
                values[name] = None
        elif name in m and name in keys:
            kind = keys[name]
            rule = schema.rule_of(kind)
            values[name] = (
                _rule_hook(kind)(m[name], kind) if rule else _converter.structure(m[name], kind)
            )
    return cls(**values)


def _reasons(exc: BaseException) -> Found:
    """The mistakes one structuring error stands for, at their places below its key."""
    if isinstance(exc, Mistakes):
        return exc.found
    if isinstance(exc, Invalid):
        return [(exc.at, exc.reason)]
    if isinstance(exc, cattrs.IterableValidationError):
        out: Found = []
        for inner in exc.exceptions:
            note = next(n for n in inner.__notes__ if isinstance(n, IterableValidationNote))
            at = f"[{note.index}]" if isinstance(note.index, int) else f".{note.index}"
            out.extend((at + where, reason) for where, reason in _reasons(inner))
        return out
    return [("", str(exc))]


def _unknown(m: Mapping[str, Any], allowed: Mapping[str, Any]) -> tuple[Found, set[str]]:
    """Each key of `m` that `allowed` does not hold, with a did-you-mean.

    Also returns the allowed keys that `m` leaves out and a mistyped key may have meant: a
    rule that needs one of them is not checked, since it would only guess.
    """
    found: Found = []
    unsure: set[str] = set()
    for k in m:
        if k not in allowed:
            close = difflib.get_close_matches(k, sorted(allowed), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            unsure.update(c for c in close if c not in m)
            found.append((f".{k}", f"unknown key; {hint}(allowed: {', '.join(sorted(allowed))})"))
    return found, unsure


# ---- the rules across keys: each section's validator ---------------------------------------

# (the section, its mapping, the keys that are wrong or maybe mistyped) -> (section, mistakes)
Validator = Callable[[Any, Mapping[str, Any], set[str]], tuple[Any, Found]]
_VALIDATORS: dict[type, Validator] = {}


def _validator(cls: type) -> Callable[[Validator], Validator]:
    def register(check: Validator) -> Validator:
        _VALIDATORS[cls] = check
        return check

    return register


def _checked(found: Found, at: str, check: Callable[[Path], object], path: Path | None) -> None:
    """`check(path)` of a file given (not None); its mistake is recorded at `at`."""
    if path is None:
        return
    try:
        check(path)
    except (Invalid, ConfigError) as exc:
        found.append((at, exc.reason))


@_validator(ServerSpec)
def _server(server: ServerSpec, m: Mapping[str, Any], bad: set[str]) -> tuple[ServerSpec, Found]:
    """Loopback unless allow_non_loopback; the socket settings only with a unix socket."""
    found: Found = []
    if "listen" in bad:
        return server, found
    loopback = _is_loopback_listen(server.listen)
    if "allow_non_loopback" not in bad and not server.allow_non_loopback and not loopback:
        found.append(
            (
                ".listen",
                f"{server.listen} is not a loopback address; the API serves tokens and stays on "
                "localhost unless server.allow_non_loopback is true",
            )
        )
    proxy_listen = server.proxy_listen
    if (
        proxy_listen is not None
        and "proxy_listen" not in bad
        and "allow_non_loopback" not in bad
        and not server.allow_non_loopback
        and not _is_loopback_listen(proxy_listen)
    ):
        found.append(
            (
                ".proxy_listen",
                f"{proxy_listen} is not a loopback address; the proxy sends requests with the "
                "apps' tokens and stays on localhost unless server.allow_non_loopback is true",
            )
        )
    if proxy_listen is not None and proxy_listen in (server.listen, server.metrics_listen):
        found.append((".proxy_listen", f"{proxy_listen} is already used by another listener"))
    given = sorted({"socket_mode", "socket_group"} & set(m))
    if given and server.unix_path is None and server.proxy_unix_path is None:
        found.append(
            (f".{given[0]}", "applies only when server.listen or server.proxy_listen is unix:/path")
        )
    return server, found


@_validator(StoreSpec)
def _store(store: StoreSpec, m: Mapping[str, Any], bad: set[str]) -> tuple[StoreSpec, Found]:
    """A shared store needs its key file; the replica acknowledgement fits the scheme."""
    found: Found = []
    _checked(found, ".password_file", _read_secret_file, store.password_file)
    if "url" in bad:
        return store, found
    if not store.url.startswith("memory://") and "encryption_key_file" not in bad:
        if store.encryption_key_file is None:
            found.append(
                (
                    ".encryption_key_file",
                    "required for a shared store (tokens are encrypted at rest)",
                )
            )
        else:
            _checked(found, ".encryption_key_file", _check_keyring, store.encryption_key_file)
    scheme = store.url.partition("://")[0]
    if "require_replica_ack" not in m:
        store = dataclasses.replace(store, require_replica_ack=scheme in _FAILOVER_SCHEMES)
    elif "require_replica_ack" in bad:
        return store, found
    if store.require_replica_ack and scheme == "memory":
        found.append((".require_replica_ack", "a memory:// store has no replicas to acknowledge"))
    if "replica_ack_timeout" in m and not store.require_replica_ack:
        found.append(
            (".replica_ack_timeout", "applies only when store.require_replica_ack is true")
        )
    return store, found


@_validator(AppSpec)
def _app(app: AppSpec, m: Mapping[str, Any], bad: set[str]) -> tuple[AppSpec, Found]:
    """One client id, the credentials the client_auth needs, the authorization_code URLs."""
    found: Found = []

    def read(field: str) -> None:
        _checked(found, f".{field}", _read_secret_file, getattr(app, field))

    def missing(field: str) -> bool:
        return getattr(app, field) is None and field not in bad

    # A token exchange (Google STS) authenticates no client: it may name none.
    exchange = (
        app.client_auth is ClientAuth.CLIENT_ASSERTION
        and app.assertion_type is AssertionType.TOKEN_EXCHANGE
    )
    both = app.client_id is not None and app.client_id_file is not None
    neither = app.client_id is None and app.client_id_file is None
    if not {"client_id", "client_id_file"} & bad and (both or (neither and not exchange)):
        found.append((".client_id", "give exactly one of client_id and client_id_file"))
    read("client_id_file")
    if "client_auth" in bad:
        pass
    elif app.client_auth is ClientAuth.PRIVATE_KEY_JWT:
        if missing("private_key_file"):
            found.append((".private_key_file", "required for client_auth private_key_jwt"))
        else:
            _checked(found, ".private_key_file", _check_private_key, app.private_key_file)
    elif app.client_auth is ClientAuth.CLIENT_ASSERTION:
        if missing("assertion_file"):
            found.append((".assertion_file", "required for client_auth client_assertion"))
        else:
            _checked(found, ".assertion_file", _check_assertion_file, app.assertion_file)
        checkable = not {"assertion_type", "grant_type"} & bad
        if exchange and checkable and app.grant_type is not GrantType.CLIENT_CREDENTIALS:
            found.append((".assertion_type", "token-exchange needs grant_type client_credentials"))
    elif app.client_auth is ClientAuth.TLS_CLIENT_AUTH:
        _check_tls_client(app, found, bad)
    else:
        if missing("client_secret_file"):
            found.append(
                (".client_secret_file", f"required for client_auth {app.client_auth.value}")
            )
        read("client_secret_file")
        read("client_secret_previous_file")
    if "client_auth" not in bad:
        _check_unused_credentials(app, m, found)
    if "grant_type" not in bad and app.grant_type is GrantType.AUTHORIZATION_CODE:
        for field in ("authorize_url", "redirect_uri"):
            if missing(field):
                found.append((f".{field}", "required for grant_type authorization_code"))
    _check_dpop(app, m, bad, found)
    return app, found


def _check_dpop(app: AppSpec, m: Mapping[str, Any], bad: set[str], found: Found) -> None:
    """The DPoP settings go with `dpop: true`; the key file holds keys of the algorithm."""
    if "dpop" in bad:
        return
    if not app.dpop:
        found.extend(
            (f".{field}", "goes with dpop: true")
            for field in ("dpop_algorithm", "dpop_key_file")
            if field in m and field not in bad
        )
        return
    if app.sinks and "sinks" not in bad:
        found.append(
            (
                ".sinks",
                "a DPoP-bound token is useless in a file without a proof: use the proxy or "
                "POST /v1/token/{app}/proof",
            )
        )
    if app.dpop_key_file is not None and "dpop_algorithm" not in bad:
        _checked(
            found,
            ".dpop_key_file",
            lambda path: _check_dpop_keys(path, app.dpop_algorithm),
            app.dpop_key_file,
        )


# The keys that belong to one client_auth method each: given with another, they would be ignored.
_METHOD_KEYS: dict[str, ClientAuth] = {
    "assertion_file": ClientAuth.CLIENT_ASSERTION,
    "assertion_type": ClientAuth.CLIENT_ASSERTION,
    "tls_client_cert_file": ClientAuth.TLS_CLIENT_AUTH,
    "tls_client_key_file": ClientAuth.TLS_CLIENT_AUTH,
}


def _check_unused_credentials(app: AppSpec, m: Mapping[str, Any], found: Found) -> None:
    """A key of one client_auth method given with another is a mistake, not a silent no-op."""
    for key, method in _METHOD_KEYS.items():
        if key in m and app.client_auth is not method:
            found.append((f".{key}", f"applies only when client_auth is {method.value}"))


def _check_tls_client(app: AppSpec, found: Found, bad: set[str]) -> None:
    """Both files given, and together they load as a certificate and its key."""
    fields = ("tls_client_cert_file", "tls_client_key_file")
    for field in fields:
        if getattr(app, field) is None and field not in bad:
            found.append((f".{field}", "required for client_auth tls_client_auth"))
    if app.tls_client_cert_file is None or app.tls_client_key_file is None:
        return
    cert, key = app.tls_client_cert_file, app.tls_client_key_file
    before = len(found)
    _checked(found, ".tls_client_cert_file", _read_secret_file, cert)
    _checked(found, ".tls_client_key_file", _read_secret_file, key)
    if len(found) == before:
        try:
            ssl.create_default_context().load_cert_chain(cert, key)
        except (OSError, ssl.SSLError):
            found.append(
                (
                    ".tls_client_cert_file",
                    f"{cert} and {key} do not load as a PEM certificate and its unencrypted key",
                )
            )


@_validator(ProxySpec)
def _proxy(proxy: ProxySpec, m: Mapping[str, Any], bad: set[str]) -> tuple[ProxySpec, Found]:
    """One of upstream and upstreams; no upstream at an address the egress guard refuses; a
    replayable body fits in a request; the CA file holds certificates."""
    found: Found = []
    if not {"upstream", "upstreams"} & bad:
        if proxy.upstream is None and not proxy.upstreams:
            found.append(
                (".upstream", "required: give upstream (one origin) or upstreams (several by name)")
            )
        elif proxy.upstream is not None and proxy.upstreams:
            found.append(
                (
                    ".upstreams",
                    "give upstream or upstreams, not both (name the single origin inside "
                    "upstreams; callers then reach /v1/proxy/<app>/<name>/<path>)",
                )
            )
    if "allowed_networks" not in bad:
        origins = [] if proxy.upstream is None else [(".upstream", proxy.upstream)]
        origins += [(f".upstreams.{u.name}", u.origin) for u in proxy.upstreams]
        found.extend(_refused_origins(origins, proxy.allowed_networks))
    sizes_known = not {"max_buffered_body", "max_request_body"} & bad
    if sizes_known and proxy.max_buffered_body > proxy.max_request_body:
        found.append((".max_buffered_body", "must not exceed max_request_body"))
    _checked(found, ".ca_file", _check_ca_file, proxy.ca_file)
    return proxy, found


def _refused_origins(origins: list[tuple[str, str]], allowed_networks: tuple[str, ...]) -> Found:
    """Upstreams given as an address that the egress guard would refuse at every request (a
    name is checked when it is resolved, at each connection)."""
    allowed = egress.parse_networks(allowed_networks)
    found: Found = []
    for at, origin in origins:
        host = urlsplit(origin).hostname or ""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            continue
        reason = egress.refusal(address, allowed)
        if reason is not None:
            found.append(
                (
                    at,
                    f"{host} is {egress.DESCRIBED[reason]}: the proxy refuses it unless "
                    f"allowed_networks lists it (e.g. allowed_networks: [{address}/"
                    f"{address.max_prefixlen}])",
                )
            )
    return found


@_validator(ClientEntry)
def _client(entry: ClientEntry, m: Mapping[str, Any], bad: set[str]) -> tuple[ClientEntry, Found]:
    """An identity (a key or peer ids); the key files hold keys long enough."""
    found: Found = []
    for field in ("key_file", "key_previous_file"):
        _checked(found, f".{field}", _check_client_key, getattr(entry, field))
    # A wrong identity key is reported as itself, not again as a missing identity.
    identities = {"key_file", "key_sha256", "uids", "gids"}
    has_identity = entry.key_file or entry.key_sha256 or entry.uids or entry.gids
    if not found and not identities & bad and not has_identity:
        found.append(("", "needs an identity: key_file, key_sha256, uids or gids"))
    if entry.key_previous_file is not None and entry.key_file is None and "key_file" not in bad:
        found.append((".key_previous_file", "goes with key_file"))
    return entry, found


def _check_sink_paths(
    apps: Mapping[str, AppSpec], server: ServerSpec, found: list[ConfigError]
) -> None:
    """Each token file belongs to one sink of one app, and is not the API's socket."""
    seen: dict[Path, str] = {}
    if server.unix_path is not None:
        seen[Path(server.unix_path)] = "server.listen"
    for name, app in apps.items():
        for i, sink in enumerate(app.sinks):
            where = f"apps.{name}.sinks[{i}].path"
            if sink.path in seen:
                found.append(
                    ConfigError(where, f"{sink.path} is already used by {seen[sink.path]}")
                )
            else:
                seen[sink.path] = where


def _check_peer_identities(
    clients: Mapping[str, ClientSpec],
    server: ServerSpec | None,
    found: list[ConfigError],
    *,
    server_known: bool,
) -> None:
    """Peer identity needs the unix socket, and one uid (or gid) names one client."""
    for field in ("uids", "gids"):
        owner: dict[int, str] = {}
        for name, client in clients.items():
            ids: tuple[int, ...] = getattr(client, field)
            unix = server is not None and (server.unix_path or server.proxy_unix_path)
            if ids and server_known and not unix:
                found.append(
                    ConfigError(
                        f"clients.{name}.{field}",
                        "peer identity works only over a unix socket: set server.listen (or "
                        "server.proxy_listen) to unix:/path (a TCP peer's address says nothing "
                        "about who is calling)",
                    )
                )
            for i, unix_id in enumerate(ids):
                if unix_id in owner:
                    found.append(
                        ConfigError(
                            f"clients.{name}.{field}[{i}]",
                            f"{unix_id} already identifies client {owner[unix_id]}",
                        )
                    )
                else:
                    owner[unix_id] = name


# ---- files ---------------------------------------------------------------------------------


def _is_loopback_listen(value: str) -> bool:
    if value.startswith("unix:"):
        return True
    return schema.is_loopback_host(value.rpartition(":")[0].strip("[]"))


def _read_secret_file(path: Path) -> str:
    """The file's stripped text; the value is never put in an error message."""
    if not path.exists():
        raise Invalid(f"{path} does not exist")
    if not path.is_file():
        raise Invalid(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise Invalid(f"{path} is not readable")
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise Invalid(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise Invalid(f"{path} is not UTF-8 text") from None
    if not value:
        raise Invalid(f"{path} is empty")
    return value


def _check_client_key(path: Path) -> None:
    if len(_read_secret_file(path)) < MIN_CLIENT_KEY:
        raise Invalid(f"the key must be at least {MIN_CLIENT_KEY} characters")


def _check_private_key(path: Path) -> None:
    # Imported here: only private_key_jwt apps need cryptography's key loading.
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    _read_secret_file(path)
    try:
        private_key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise Invalid(f"{path} is not an unencrypted PEM private key") from None
    if isinstance(private_key, rsa.RSAPrivateKey):
        if private_key.key_size < MIN_RSA_BITS:
            raise Invalid(f"RSA key of {private_key.key_size} bits; at least 2048 needed")
    elif not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise Invalid("must be an RSA or EC private key")


def _check_dpop_keys(path: Path, algorithm: DpopAlgorithm) -> None:
    """The DPoP key file parses and fits the algorithm; errors never show the key."""
    # Imported here: only DPoP apps need pyjwt and cryptography.
    from broker.dpop import read_key_file

    _read_secret_file(path)
    try:
        read_key_file(path, algorithm, "")
    except ConfigError as exc:
        raise Invalid(exc.reason) from None


def _check_assertion_file(path: Path) -> None:
    """A file that exists holds a JWT with an exp; a missing one is the platform's to write.

    spiffe-helper writes its JWT-SVID after the pods start, so the broker starts without it:
    the app fails, naming the file, until it appears. An expired one is a runtime matter too.
    """
    if not path.exists():
        return
    token = _read_secret_file(path)
    try:
        assertion_expiry(token)
    except UnusableAssertion as exc:
        raise Invalid(f"{path} {exc}") from None


def _check_keyring(path: Path) -> None:
    """The key file parses (sizes, ids); errors name the line, never the key material."""
    # Imported here: a memory:// store has no key file and needs no AES.
    from broker.store.crypto import Keyring

    _read_secret_file(path)
    Keyring.from_file(path)


def _check_ca_file(path: Path) -> None:
    _read_secret_file(path)
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError):
        raise Invalid(f"{path} holds no PEM CA certificate") from None


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
            + (_dpop_summary(app) if app.dpop else "")
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


def _dpop_summary(app: AppSpec) -> str:
    key = app.dpop_key_file if app.dpop_key_file else "a key made at start"
    return f", DPoP {app.dpop_algorithm.value} ({key})"


def _proxy_summary(proxy: ProxySpec) -> str:
    if proxy.upstream is not None:
        where = f"proxy to {proxy.upstream}, paths {', '.join(proxy.path_prefixes)}"
    else:
        where = "proxy to " + "; ".join(
            f"{u.name} {u.origin} (paths {', '.join(u.path_prefixes or proxy.path_prefixes)})"
            for u in proxy.upstreams
        )
    return (
        f"    {where}, "
        f"timeouts {proxy.connect_timeout:g}s connect / {proxy.read_timeout:g}s read, "
        f"bodies up to {proxy.max_request_body} bytes (replayable up to "
        f"{proxy.max_buffered_body}), at most {proxy.max_concurrent} at once"
        + (" per upstream" if proxy.upstreams else "")
        + (
            f", retry on {'/'.join(map(str, proxy.refresh_on_status))}"
            if proxy.retry_on_401 and proxy.refresh_on_status
            else ", no retry on 401"
        )
        + (f", CA {proxy.ca_file}" if proxy.ca_file else "")
        + (f", may reach {', '.join(proxy.allowed_networks)}" if proxy.allowed_networks else "")
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

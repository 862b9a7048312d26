"""One pass reports every mistake; the JSON Schema and the validator agree; the chart embeds it."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml

from broker.cli import main
from broker.config import parse_config
from broker.errors import ConfigError, ConfigErrors
from broker.schema import config_schema

REPO = Path(__file__).resolve().parents[2]
CLIENT_SECRET = "schema-client-secret-0123456789abcdef"
CLIENT_KEY = "schema-client-key-" + "k" * 32
STORE_KEY = "k1 " + "S2V5LWJ5dGVzLWZvci10aGUtc3RvcmUtMzItYnl0ZXM="

Document = dict[str, Any]


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """The secret files the documents below name (relative paths)."""
    (tmp_path / "app.secret").write_text(CLIENT_SECRET)
    (tmp_path / "client.key").write_text(CLIENT_KEY)
    (tmp_path / "store.key").write_text(STORE_KEY + "\n")
    return tmp_path


def full_document() -> Document:
    """A valid config that uses every section and every nested object of the schema."""
    return {
        "server": {
            "listen": "unix:/run/token-broker/api.sock",
            "metrics_listen": "0.0.0.0:9411",
            "socket_mode": "0660",
            "socket_group": 65532,
        },
        "store": {
            "url": "redis://redis:6379/0",
            "key_prefix": "tb",
            "encryption_key_file": "store.key",
        },
        "apps": {
            "twilio": {
                "token_url": "https://oauth.twilio.com/v2/token",
                "client_id": "OQ123",
                "client_secret_file": "app.secret",
                "scopes": ["read", "write"],
                "extra_params": {"resource": "x", "flag": True, "n": 3},
                "refresh": {"at_fraction": 0.5, "min_remaining": "10m", "jitter": 0.1},
                "proxy": {
                    "upstream": "https://api.twilio.com",
                    "path_prefixes": ["/2010-04-01/"],
                    "max_buffered_body": "1MiB",
                    "connect_timeout": 2,
                },
                "sinks": [{"path": "/run/token-broker/twilio", "format": "header"}],
                "max_token_requests_per_minute": 30,
            },
            "scim": {
                "grant_type": "authorization_code",
                "token_url": "https://login.example.com/oauth/token",
                "authorize_url": "https://login.example.com/oauth/authorize",
                "redirect_uri": "http://localhost:8765/callback",
                "client_id": "scim-client",
                "client_secret_file": "app.secret",
                "client_auth": "client_secret_basic",
                "refresh": {"read_timeout": "2m", "reuse_grace": 0},
            },
        },
        "clients": {
            "billing": {"uids": [10001], "apps": ["twilio", "scim"]},
            "cron": {"key_file": "client.key", "apps": ["twilio"]},
        },
    }


def schema_errors(document: object) -> list[str]:
    """The schema's complaints about `document`, as JSON pointers to the offending place."""
    validator = jsonschema_rs.Draft7Validator(config_schema())
    return [
        "/".join(str(p) for p in error.instance_path) for error in validator.iter_errors(document)
    ]


def validator_keys(document: object, config_dir: Path) -> list[str]:
    """The keys broker/config.py names for `document` (empty: valid)."""
    try:
        parse_config(document, base_dir=config_dir)
    except ConfigErrors as errors:
        return [error.key for error in errors.errors]
    except ConfigError as error:
        return [error.key]
    return []


def mutated(path: str, value: object) -> Document:
    """full_document() with `value` at the dotted `path` (list indexes as numbers)."""
    document = full_document()
    *parents, last = path.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    return document


class TestEveryMistakeAtOnce:
    """One pass over the file finds every mistake, each with today's key and reason."""

    def test_three_mistakes_are_three_errors(self, config_dir: Path) -> None:
        """A typo, an out-of-range value and an unknown app are reported together."""
        document = full_document()
        document["apps"]["twilio"]["refesh"] = document["apps"]["twilio"].pop("refresh")
        document["apps"]["scim"]["refresh"]["at_fraction"] = 1.5
        document["clients"]["cron"]["apps"] = ["twillio"]
        with pytest.raises(ConfigErrors) as caught:
            parse_config(document, base_dir=config_dir)
        assert [str(e) for e in caught.value.errors] == [
            "apps.twilio.refesh: unknown key; did you mean 'refresh'? (allowed: "
            + ", ".join(
                sorted(config_schema()["properties"]["apps"]["additionalProperties"]["properties"])
            )
            + ")",
            "apps.scim.refresh.at_fraction: must be between 0 and 1 (exclusive)",
            "clients.cron.apps[0]: unknown app 'twillio'",
        ]
        assert caught.value.key == "apps.twilio.refesh"
        assert str(caught.value).startswith("3 mistakes:\n  apps.twilio.refesh: unknown key")

    def test_one_mistake_is_a_plain_config_error(self, config_dir: Path) -> None:
        """A single mistake raises ConfigError itself, as before."""
        with pytest.raises(ConfigError) as caught:
            parse_config(mutated("apps.twilio.refresh.jitter", 0.7), base_dir=config_dir)
        assert type(caught.value) is ConfigError
        assert str(caught.value) == "apps.twilio.refresh.jitter: must be at least 0 and below 0.5"

    def test_a_wrong_key_is_not_reported_again_by_the_rules_that_read_it(
        self, config_dir: Path
    ) -> None:
        """A mistyped client_auth, listen address or identity is one error, not a cascade."""
        document = mutated("apps.twilio.client_auth", "private_key")
        document["server"]["listen"] = "localhost"
        document["clients"]["billing"]["uids"] = []
        assert validator_keys(document, config_dir) == [
            "server.listen",
            "apps.twilio.client_auth",
            "clients.billing.uids",
        ]

    def test_the_rules_of_a_section_run_beside_its_wrong_keys(self, config_dir: Path) -> None:
        """A wrong key does not hide a rule about the section's other keys (cattrs fails the
        whole section; the validator then runs on the keys that structured well)."""
        document = mutated("apps.twilio.refresh.jitter", 0.7)
        del document["apps"]["twilio"]["client_secret_file"]
        document["apps"]["twilio"]["token_url"] = "ftp://oauth.twilio.com/token"
        document["server"]["metrics_listen"] = "9411"
        document["server"]["listen"] = "10.0.0.1:8411"
        document["clients"]["cron"]["key_sha256"] = "abc"
        document["clients"]["cron"]["key_previous_file"] = "client.key"
        del document["clients"]["cron"]["key_file"]
        assert validator_keys(document, config_dir) == [
            "server.metrics_listen",
            "server.listen",
            "server.socket_group",
            "apps.twilio.token_url",
            "apps.twilio.refresh.jitter",
            "apps.twilio.client_secret_file",
            "clients.cron.key_sha256[0]",
            "clients.cron.key_previous_file",
        ]

    def test_an_empty_key_reads_as_left_out_where_it_did_before(self, config_dir: Path) -> None:
        """`extra_params:`, `key_sha256:`, `uids:`, `sinks:` or `refresh:` with nothing under
        them (YAML null) take their defaults; `scopes:` does not (a list is expected)."""
        document = full_document()
        twilio = document["apps"]["twilio"]
        twilio.update(extra_params=None, authorize_params=None, sinks=None, refresh=None)
        document["clients"]["cron"].update(key_sha256=None, uids=None, gids=None)
        assert validator_keys(document, config_dir) == []
        assert validator_keys(mutated("apps.twilio.scopes", None), config_dir) == [
            "apps.twilio.scopes"
        ]

    def test_a_mistyped_section_is_one_error(self, config_dir: Path) -> None:
        """`sever:` is an unknown key; the socket-only and shared-store rules do not guess."""
        document = full_document()
        document["sever"] = document.pop("server")
        document["stor"] = document.pop("store")
        assert validator_keys(document, config_dir) == ["sever", "stor"]

    def test_check_config_prints_each_mistake_and_exits_2(self, config_dir: Path) -> None:
        """`check-config` on a file with three mistakes prints three lines and exits 2."""
        document = full_document()
        document["server"]["listn"] = document["server"].pop("listen")
        document["apps"]["twilio"]["refresh"]["jitter"] = "high"
        document["apps"]["scim"].pop("redirect_uri")
        path = config_dir / "config.yaml"
        path.write_text(yaml.safe_dump(document))
        result = subprocess.run(
            [sys.executable, "-m", "broker", "check-config", "--config", str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        assert sorted(result.stderr.splitlines()) == [
            "token-broker: configuration error: apps.scim.redirect_uri: required for grant_type "
            "authorization_code",
            "token-broker: configuration error: apps.twilio.refresh.jitter: must be a number, "
            "not a string",
            "token-broker: configuration error: server.listn: unknown key; did you mean "
            "'listen'? (allowed: allow_non_loopback, listen, metrics_listen, proxy_listen, socket_group, "
            "socket_mode, status_endpoint)",
        ]


def _objects(schema: dict[str, Any], path: str) -> Iterator[str]:
    """The dotted paths (`*` for any name, `0` for a list item) of every closed object."""
    if schema.get("additionalProperties") is False:
        yield path
    for name, child in schema.get("properties", {}).items():
        yield from _objects(child, f"{path}.{name}".lstrip("."))
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        yield from _objects(extra, f"{path}.*")
    if isinstance(schema.get("items"), dict):
        yield from _objects(schema["items"], f"{path}.0")


# One concrete place in full_document() for each closed object of the schema.
TYPO_PLACES = {
    "": "",
    "server": "server",
    "store": "store",
    "apps.*": "apps.twilio",
    "apps.*.refresh": "apps.twilio.refresh",
    "apps.*.proxy": "apps.twilio.proxy",
    "apps.*.sinks.0": "apps.twilio.sinks.0",
    "clients.*": "clients.billing",
}

# Shape mistakes: the schema and the validator both refuse them, at the same key.
SHAPE_MISTAKES = [
    ("server.listen", 8411),
    ("server.metrics_listen", "9411"),
    ("server.allow_non_loopback", "yes"),
    ("server.socket_mode", 660),
    ("store.url", "postgres://db/0"),
    ("store.key_prefix", "a b"),
    ("apps.twilio.grant_type", "password"),
    ("apps.twilio.client_auth", "basic"),
    ("apps.twilio.token_url", "ftp://oauth.twilio.com/token"),
    ("apps.twilio.required", "no"),
    ("apps.twilio.scopes", "read write"),
    ("apps.twilio.pkce", 1),
    ("apps.twilio.extra_params", ["resource"]),
    ("apps.twilio.refresh.at_fraction", 1.0),
    ("apps.twilio.refresh.jitter", 0.5),
    ("apps.twilio.refresh.min_remaining", "ten minutes"),
    ("apps.twilio.refresh.server_transactional", "true"),
    ("apps.twilio.proxy.upstream", "https://api.twilio.com/2010-04-01"),
    ("apps.twilio.proxy.max_concurrent", 0),
    ("apps.twilio.proxy.max_request_body", "1TB"),
    ("apps.twilio.proxy.retry_on_401", "no"),
    ("apps.twilio.proxy.allowed_networks", "10.0.0.0/8"),
    ("apps.twilio.proxy.allowed_networks", ["intranet"]),
    ("apps.twilio.proxy.refresh_on_status", [503]),
    ("apps.twilio.proxy.refresh_on_status", [401, 401]),
    ("apps.twilio.sinks.0.path", "twilio.token"),
    ("apps.twilio.sinks.0.format", "yaml"),
    ("apps.twilio.sinks.0.mode", 600),
    ("apps.twilio.max_token_requests_per_minute", 0),
    ("clients.billing.uids", [-1]),
    ("clients.billing.apps", "twilio"),
    ("clients.cron.key_sha256", "abc"),
]


class TestSchemaAgreesWithTheValidator:
    """The JSON Schema refuses what the validator refuses for its shape, and accepts the rest."""

    def test_valid_configs_pass_the_schema(self, config_dir: Path) -> None:
        """The full document, the repo's example and the chart's default config are valid."""
        assert validator_keys(full_document(), config_dir) == []
        assert schema_errors(full_document()) == []
        assert schema_errors(yaml.safe_load((REPO / "examples" / "local.yaml").read_text())) == []
        base = yaml.safe_load((REPO / "deploy" / "base" / "configmap.yaml").read_text())
        assert schema_errors(yaml.safe_load(base["data"]["config.yaml"])) == []

    def test_the_typo_places_cover_every_closed_object(self) -> None:
        """Every object that refuses unknown keys has a typo test below."""
        assert set(_objects(config_schema(), "")) == set(TYPO_PLACES)

    @pytest.mark.parametrize("place", sorted(TYPO_PLACES.values()))
    def test_a_typo_in_any_object_is_refused_by_both(self, config_dir: Path, place: str) -> None:
        """An unknown key fails the schema there and is a ConfigError naming it."""
        document = full_document()
        node: Any = document
        for part in filter(None, place.split(".")):
            node = node[int(part)] if isinstance(node, list) else node[part]
        node["tpyo"] = True
        key = f"{place}.tpyo".lstrip(".").replace(".0.", "[0].")
        assert validator_keys(document, config_dir) == [key]
        assert schema_errors(document) == [place.replace(".", "/")]

    @pytest.mark.parametrize(("path", "value"), SHAPE_MISTAKES)
    def test_a_shape_mistake_is_refused_by_both(
        self, config_dir: Path, path: str, value: object
    ) -> None:
        """A wrong type, enum, range or pattern fails both, at the same key."""
        document = mutated(path, value)
        keys = validator_keys(document, config_dir)
        assert keys, f"the validator accepts {path}: {value!r}"
        assert keys[0].replace("[", ".").replace("]", "").startswith(path)
        assert schema_errors(document), f"the schema accepts {path}: {value!r}"
        assert all(p.replace("/", ".").startswith(path) for p in schema_errors(document))


class TestConfigSchemaCommand:
    """`token-broker config-schema` and the chart's copy of its output."""

    def test_prints_the_schema(self) -> None:
        """The command prints config_schema() as JSON, and it is a valid draft 7 schema."""
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["config-schema"]) == 0
        printed = json.loads(out.getvalue())
        assert printed == config_schema()
        jsonschema_rs.Draft7Validator(printed)

    def test_the_chart_embeds_the_current_schema(self) -> None:
        """helm/token-broker/values.schema.json's `config` is what scripts/chart-schema writes
        from config_schema(): run the script after changing broker/schema.py."""
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "chart-schema"), "--check"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        values = json.loads((REPO / "helm" / "token-broker" / "values.schema.json").read_text())
        embedded = copy.deepcopy(values["properties"]["config"])
        own = config_schema()
        assert embedded["properties"]["apps"] == own["properties"]["apps"]
        assert embedded["properties"]["clients"] == own["properties"]["clients"]
        assert embedded["additionalProperties"] is False


class TestOneSetOfAnnotations:
    """The validator (cattrs) and the JSON Schema (msgspec) read the same dataclass fields."""

    def test_every_key_of_the_file_has_a_rule_or_a_type_of_its_own(self) -> None:
        """Each key is a rule (what cattrs calls, whose fragment the schema shows), a nested
        section, or an enum: no key is structured by a bare `str` or `float` that would accept
        what the schema refuses."""
        import dataclasses
        import enum
        import typing

        from broker.model import AppSpec, ProxySpec, RefreshPolicy, ServerSpec, SinkSpec, StoreSpec
        from broker.schema import ClientEntry, file_keys, rule_of

        for cls in (
            ServerSpec,
            StoreSpec,
            AppSpec,
            RefreshPolicy,
            ProxySpec,
            SinkSpec,
            ClientEntry,
        ):
            for name, annotation in file_keys(cls).items():
                if rule_of(annotation) is not None:
                    continue
                base = (
                    typing.get_args(annotation)[0]
                    if typing.get_origin(annotation) is typing.Annotated
                    else annotation
                )
                candidates = [k for k in (base, *typing.get_args(base)) if isinstance(k, type)]
                assert any(
                    dataclasses.is_dataclass(k) or issubclass(k, enum.Enum) for k in candidates
                ), f"{cls.__name__}.{name} has no rule"

    def test_the_schema_has_exactly_the_keys_the_validator_takes(self) -> None:
        """Each closed object of the schema lists the keys its dataclass takes from the file,
        and the top level lists the sections the validator reads."""
        from broker.model import AppSpec, ProxySpec, RefreshPolicy, ServerSpec, SinkSpec, StoreSpec
        from broker.schema import ROOT_KEYS, ClientEntry, file_keys

        own = config_schema()
        apps = own["properties"]["apps"]["additionalProperties"]
        places = {
            ServerSpec: own["properties"]["server"],
            StoreSpec: own["properties"]["store"],
            AppSpec: apps,
            RefreshPolicy: apps["properties"]["refresh"],
            ProxySpec: apps["properties"]["proxy"],
            SinkSpec: apps["properties"]["sinks"]["items"],
            ClientEntry: own["properties"]["clients"]["additionalProperties"],
        }
        for cls, place in places.items():
            assert set(place["properties"]) == set(file_keys(cls)), cls.__name__
            assert place["additionalProperties"] is False
        assert set(own["properties"]) == set(ROOT_KEYS)
        assert apps["required"] == ["token_url"]
        assert apps["properties"]["proxy"]["oneOf"] == [
            {"required": ["upstream"]},
            {"required": ["upstreams"]},
        ]

"""The config loader: a valid file round trip, and every mistake named by key and reason."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.config import load_config, parse_duration, redact_url, summarize
from broker.errors import ConfigError
from broker.model import ClientAuth, GrantType
from tests.support.config import config_document, write_document, write_secrets

SECRET = "s3cret-value-0123456789-abcdefghij"
CLIENT_KEY = "client-key-0123456789-abcdefghijklmnop"
STORE_KEY = base64.b64encode(b"K" * 32).decode()


def valid(tmp_path: Path) -> dict[str, Any]:
    write_secrets(
        tmp_path, {"secret": SECRET, "client.key": CLIENT_KEY, "store.key": f"k1 {STORE_KEY}"}
    )
    return config_document(
        app={
            "client_secret_file": "secret",
            "scopes": ["a", "b"],
            "refresh": {"min_remaining": "2m", "jitter": 0.1},
        },
        server={"listen": "127.0.0.1:8411", "metrics_listen": "0.0.0.0:9411"},
    )


write = write_document


class TestValidConfig:
    def test_round_trip_with_defaults(self, tmp_path: Path) -> None:
        """A valid file loads; unset keys take the contract's defaults; paths resolve."""
        config = load_config(write(tmp_path, valid(tmp_path)))
        app = config.apps["twilio"]
        assert app.grant_type is GrantType.CLIENT_CREDENTIALS
        assert app.client_auth is ClientAuth.CLIENT_SECRET_POST
        assert app.required is True
        assert app.scopes == ("a", "b")
        assert app.refresh.min_remaining == 120
        assert app.refresh.at_fraction == 0.75
        assert app.refresh.safety_margin == 30
        assert app.refresh.server_transactional is False
        assert app.client_secret_file == tmp_path / "secret"
        assert config.store.key_prefix == "token-broker"
        assert config.clients["billing"].key_files == (tmp_path / "client.key",)

    def test_summary_has_no_secret(self, tmp_path: Path) -> None:
        """check-config's summary names apps and clients but never a secret or key."""
        text = summarize(load_config(write(tmp_path, valid(tmp_path))))
        assert "twilio" in text
        assert "billing" in text
        for secret in (SECRET, CLIENT_KEY, STORE_KEY):
            assert secret not in text

    def test_redis_password_is_masked(self) -> None:
        """A password in a URL is masked in the summary."""
        assert redact_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"


Mutation = Callable[[dict[str, Any], Path], None]


def _set(path: str, value: object) -> Mutation:
    def mutate(data: dict[str, Any], _: Path) -> None:
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return mutate


def _file(name: str, content: str) -> Mutation:
    def mutate(_: dict[str, Any], tmp_path: Path) -> None:
        (tmp_path / name).write_text(content)

    return mutate


BROKEN: list[tuple[str, Mutation, str, str]] = [
    ("unknown top-level key", _set("extra", 1), "extra", "unknown key"),
    ("unknown app key", _set("apps.twilio.scope", ["a"]), "apps.twilio.scope", "unknown key"),
    ("wrong type", _set("apps.twilio.scopes", "a b"), "apps.twilio.scopes", "must be a list"),
    (
        "missing token_url",
        lambda d, _: d["apps"]["twilio"].pop("token_url"),
        "apps.twilio.token_url",
        "required",
    ),
    (
        "missing secret file",
        _set("apps.twilio.client_secret_file", "nope"),
        "apps.twilio.client_secret_file",
        "does not exist",
    ),
    (
        "secret file is a directory",
        _set("apps.twilio.client_secret_file", "."),
        "apps.twilio.client_secret_file",
        "not a regular file",
    ),
    (
        "too many scopes",
        _set("apps.twilio.scopes", [f"s{i}" for i in range(101)]),
        "apps.twilio.scopes",
        "at most 100",
    ),
    (
        "plain http to a remote host",
        _set("apps.twilio.token_url", "http://example.com/token"),
        "apps.twilio.token_url",
        "https",
    ),
    (
        "bad duration",
        _set("apps.twilio.refresh.min_remaining", "5 minutes"),
        "apps.twilio.refresh.min_remaining",
        "not a duration",
    ),
    (
        "jitter out of range",
        _set("apps.twilio.refresh.jitter", 0.7),
        "apps.twilio.refresh.jitter",
        "below 0.5",
    ),
    (
        "bad app name",
        lambda d, _: d["apps"].update({"Twilio": d["apps"].pop("twilio")}),
        "apps.Twilio",
        "names match",
    ),
    (
        "client names an unknown app",
        _set("clients.billing.apps", ["nope"]),
        "clients.billing.apps[0]",
        "unknown app",
    ),
    ("short client key", _file("client.key", "short"), "clients.billing.key_file", "at least 32"),
    (
        "key_sha256 not hex",
        _set("clients.billing.key_sha256", "zz"),
        "clients.billing.key_sha256[0]",
        "64 hex",
    ),
    (
        "redis without key file",
        lambda d, _: d["store"].pop("encryption_key_file"),
        "store.encryption_key_file",
        "required",
    ),
    (
        "bad base64 in key file",
        _file("store.key", "k1 !!!notbase64\n"),
        "store.encryption_key_file",
        "line 1",
    ),
    (
        "16-byte key",
        _file("store.key", "k1 " + base64.b64encode(b"x" * 16).decode()),
        "store.encryption_key_file",
        "32 needed",
    ),
    (
        "password in the store url",
        _set("store.url", "redis://:pw@h:6379/0"),
        "store.url",
        "password_file",
    ),
    ("non-loopback listen", _set("server.listen", "0.0.0.0:8411"), "server.listen", "loopback"),
    (
        "authorization_code without redirect_uri",
        lambda d, _: d["apps"]["twilio"].update(
            {"grant_type": "authorization_code", "authorize_url": "https://a/authorize"}
        ),
        "apps.twilio.redirect_uri",
        "required",
    ),
    (
        "server_transactional not a bool",
        _set("apps.twilio.refresh.server_transactional", "yes"),
        "apps.twilio.refresh.server_transactional",
        "true or false",
    ),
    (
        "unknown grant",
        _set("apps.twilio.grant_type", "password"),
        "apps.twilio.grant_type",
        "not one of",
    ),
    (
        "both client_id and client_id_file",
        _set("apps.twilio.client_id_file", "secret"),
        "apps.twilio.client_id",
        "exactly one",
    ),
]


class TestBrokenConfig:
    @pytest.mark.parametrize(
        ("case", "mutate", "key", "reason"), BROKEN, ids=[b[0] for b in BROKEN]
    )
    def test_names_the_key_and_the_reason(
        self, tmp_path: Path, case: str, mutate: Mutation, key: str, reason: str
    ) -> None:
        """Each mistake raises ConfigError naming the exact key, with a reason."""
        data = valid(tmp_path)
        mutate(data, tmp_path)
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, data))
        assert caught.value.key == key
        assert reason in caught.value.reason
        assert SECRET not in str(caught.value)

    def test_yaml_syntax_error_gives_the_line(self, tmp_path: Path) -> None:
        """A YAML syntax error names the file and the line."""
        with pytest.raises(ConfigError, match="line 2"):
            load_config(write(tmp_path, "server:\n  listen: a: b\n"))

    def test_yaml_that_is_a_list(self, tmp_path: Path) -> None:
        """A document that is not a mapping is refused."""
        with pytest.raises(ConfigError, match="mapping"):
            load_config(write(tmp_path, "- a\n- b\n"))

    def test_missing_file(self, tmp_path: Path) -> None:
        """An unreadable config file is a ConfigError naming it."""
        with pytest.raises(ConfigError, match="cannot read"):
            load_config(tmp_path / "absent.yaml")


class TestDurations:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("90s", 90),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
            (45, 45),
            ("2.5", 2.5),
            (0.5, 0.5),
        ],
    )
    def test_parses(self, text: object, seconds: float) -> None:
        """Numbers are seconds; strings take h, m and s parts."""
        assert parse_duration(text, "k") == seconds

    @pytest.mark.parametrize("text", ["", "5 minutes", "m", "-1", True, None, "1d"])
    def test_refuses(self, text: object) -> None:
        """Anything else is an error naming the key."""
        with pytest.raises(ConfigError) as caught:
            parse_duration(text, "apps.x.refresh.min_remaining")
        assert caught.value.key == "apps.x.refresh.min_remaining"

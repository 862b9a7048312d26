"""The YAML config: a full round trip, a table of mistakes by key and reason, durations, summary."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.config import load_config, parse_config, parse_duration, redact_url, summarize
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
from tests.support.config import write_document

CLIENT_SECRET = "twilio-client-secret-0123456789abcdef"
CLIENT_KEY = "billing-client-key-" + "k" * 30
STORE_KEY = bytes(range(7, 39))
STORE_KEY_LINE = f"k1 {base64.b64encode(STORE_KEY).decode()}"

Document = dict[str, Any]


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A directory holding every secret file the configs below refer to (relative paths)."""
    (tmp_path / "twilio.secret").write_text(CLIENT_SECRET + "\n")
    (tmp_path / "billing.key").write_text(CLIENT_KEY + "\n")
    (tmp_path / "short.key").write_text("k" * 31 + "\n")
    (tmp_path / "store.key").write_text(f"# current\n{STORE_KEY_LINE}\n")
    (tmp_path / "bad-base64.key").write_text("k1 not*base64*at*all\n")
    (tmp_path / "short-store.key").write_text(f"k1 {base64.b64encode(bytes(16)).decode()}\n")
    (tmp_path / "a-directory").mkdir()
    return tmp_path


def minimal_document() -> Document:
    """The smallest valid config: one app, one client."""
    return {
        "apps": {
            "twilio": {
                "token_url": "https://oauth.twilio.com/v2/token",
                "client_id": "OQ123",
                "client_secret_file": "twilio.secret",
            }
        },
        "clients": {"billing": {"key_file": "billing.key", "apps": ["twilio"]}},
    }


write_config = write_document


class TestLoadConfig:
    """load_config on valid files."""

    def test_minimal_config_defaults(self, config_dir: Path) -> None:
        """Every omitted setting takes its documented default; paths resolve next to the file."""
        config = load_config(write_config(config_dir, minimal_document()))
        base = config_dir.resolve()
        assert config.server == ServerSpec("127.0.0.1:8411", "0.0.0.0:9411", False)
        assert config.store == StoreSpec("memory://", "token-broker", None, None)
        assert config.apps == {
            "twilio": AppSpec(
                name="twilio",
                token_url="https://oauth.twilio.com/v2/token",
                client_id="OQ123",
                client_secret_file=base / "twilio.secret",
            )
        }
        app = config.apps["twilio"]
        assert app.grant_type is GrantType.CLIENT_CREDENTIALS
        assert app.client_auth is ClientAuth.CLIENT_SECRET_POST
        assert (app.required, app.pkce, app.scopes) == (True, True, ())
        assert app.refresh == RefreshPolicy(0.75, 0.0, 0.05, 30.0, 3600.0)
        assert app.max_token_requests_per_minute is None
        assert config.clients == {
            "billing": ClientSpec("billing", ("twilio",), key_files=(base / "billing.key",))
        }

    def test_full_config(self, config_dir: Path) -> None:
        """Every section given explicitly is parsed into the value objects."""
        digest = "AB" * 32
        document = {
            "server": {
                "listen": "0.0.0.0:8411",
                "metrics_listen": "127.0.0.1:9411",
                "allow_non_loopback": True,
            },
            "store": {
                "url": "redis://redis.internal:6379/0",
                "key_prefix": "tb",
                "encryption_key_file": "store.key",
            },
            "apps": {
                "twilio": {
                    "token_url": "https://oauth.twilio.com/v2/token",
                    "client_id": "OQ123",
                    "client_secret_file": "twilio.secret",
                    "client_auth": "client_secret_basic",
                    "required": False,
                    "scopes": ["read", "write"],
                    "audience": "https://api.twilio.com",
                    "extra_params": {"resource": "x", "flag": True, "n": 3},
                    "refresh": {
                        "at_fraction": 0.5,
                        "min_remaining": "10m",
                        "jitter": 0.1,
                        "safety_margin": "1m",
                        "default_lifetime": "2h",
                        "reuse_grace": "30s",
                        "server_transactional": True,
                    },
                },
                "local": {
                    "token_url": "http://127.0.0.1:9000/token",
                    "client_id": "local",
                    "client_secret_file": str(config_dir / "twilio.secret"),
                },
            },
            "clients": {
                "billing": {"key_file": "billing.key", "apps": ["twilio", "local"]},
                "reports": {"key_sha256": digest, "apps": ["local"]},
            },
        }
        config = load_config(write_config(config_dir, document))
        assert config.server == ServerSpec("0.0.0.0:8411", "127.0.0.1:9411", True)
        assert config.store == StoreSpec(
            "redis://redis.internal:6379/0", "tb", config_dir.resolve() / "store.key", None
        )
        twilio = config.apps["twilio"]
        assert twilio.client_auth is ClientAuth.CLIENT_SECRET_BASIC
        assert (twilio.required, twilio.scopes) == (False, ("read", "write"))
        assert twilio.extra_params == {"resource": "x", "flag": "true", "n": "3"}
        assert twilio.refresh == RefreshPolicy(
            0.5, 600.0, 0.1, 60.0, 7200.0, reuse_grace=30.0, server_transactional=True
        )
        assert config.apps["local"].token_url == "http://127.0.0.1:9000/token"
        assert config.clients["reports"].key_sha256 == ("ab" * 32,)
        assert config.clients["billing"].apps == ("twilio", "local")

    def test_request_budget(self, config_dir: Path) -> None:
        """max_token_requests_per_minute is read as a whole number and shown by summarize."""
        document = minimal_document()
        document["apps"]["twilio"]["max_token_requests_per_minute"] = 12
        config = load_config(write_config(config_dir, document))
        assert config.apps["twilio"].max_token_requests_per_minute == 12
        assert "at most 12 token requests per minute (the whole fleet)" in summarize(config)

    def test_authorization_code_app(self, config_dir: Path) -> None:
        """An authorization_code app with authorize_url and redirect_uri is accepted."""
        document = minimal_document()
        document["store"] = {"url": "redis://r:6379/0", "encryption_key_file": "store.key"}
        document["apps"]["twilio"].update(
            grant_type="authorization_code",
            authorize_url="https://login.example.com/authorize",
            redirect_uri="http://localhost:8765/callback",
        )
        app = load_config(write_config(config_dir, document)).apps["twilio"]
        assert app.grant_type is GrantType.AUTHORIZATION_CODE
        assert app.redirect_uri == "http://localhost:8765/callback"


Mutation = Callable[[Document], object]


def _set(path: str, value: object) -> Mutation:
    """A mutation setting the dotted `path` (creating mappings on the way) to `value`."""

    def mutate(document: Document) -> Document:
        *parents, last = path.split(".")
        node = document
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        return document

    return mutate


def _drop(path: str) -> Mutation:
    """A mutation deleting the dotted `path`."""

    def mutate(document: Document) -> Document:
        *parents, last = path.split(".")
        node = document
        for part in parents:
            node = node[part]
        del node[last]
        return document

    return mutate


def _rename_app(document: Document) -> Document:
    document["apps"]["Twilio"] = document["apps"].pop("twilio")
    document["clients"]["billing"]["apps"] = ["Twilio"]
    return document


def _auth_code_without_redirect(document: Document) -> Document:
    document["apps"]["twilio"].update(
        grant_type="authorization_code", authorize_url="https://login.example.com/authorize"
    )
    return document


def _memory_store_for_authorization_code(document: Document) -> Document:
    document["apps"]["twilio"].update(
        grant_type="authorization_code",
        authorize_url="https://login.example.com/authorize",
        redirect_uri="http://localhost:8765/callback",
    )
    document["store"] = {"url": "memory://"}
    return document


BROKEN = [
    pytest.param(_set("colour", "blue"), "colour", "unknown key", id="unknown-top-level-key"),
    pytest.param(
        _set("apps.twilio.colour", "blue"),
        "apps.twilio.colour",
        "unknown key",
        id="unknown-app-key",
    ),
    pytest.param(
        _set("apps.twilio.scopes", "read write"),
        "apps.twilio.scopes",
        "must be a list, not a string",
        id="scopes-as-string",
    ),
    pytest.param(
        _drop("apps.twilio.token_url"), "apps.twilio.token_url", "required", id="no-token-url"
    ),
    pytest.param(
        _set("apps.twilio.client_secret_file", "missing.secret"),
        "apps.twilio.client_secret_file",
        "missing.secret does not exist",
        id="secret-file-missing",
    ),
    pytest.param(
        _set("apps.twilio.client_secret_file", "a-directory"),
        "apps.twilio.client_secret_file",
        "is not a regular file",
        id="secret-file-is-a-directory",
    ),
    pytest.param(
        _set("apps.twilio.scopes", [f"s{i}" for i in range(101)]),
        "apps.twilio.scopes",
        "101 scopes; at most 100",
        id="too-many-scopes",
    ),
    pytest.param(
        _set("apps.twilio.token_url", "http://oauth.twilio.com/v2/token"),
        "apps.twilio.token_url",
        "must use https",
        id="http-non-loopback-token-url",
    ),
    pytest.param(
        _set("apps.twilio.refresh.min_remaining", "5 minutes"),
        "apps.twilio.refresh.min_remaining",
        "'5 minutes' is not a duration",
        id="bad-duration",
    ),
    pytest.param(
        _set("apps.twilio.refresh.jitter", 0.7),
        "apps.twilio.refresh.jitter",
        "below 0.5",
        id="jitter-too-large",
    ),
    pytest.param(_rename_app, "apps.Twilio", "names match", id="bad-app-name"),
    pytest.param(
        _set("clients.billing.apps", ["twilio", "nope"]),
        "clients.billing.apps[1]",
        "unknown app 'nope'",
        id="client-names-unknown-app-second",
    ),
    pytest.param(
        _set("clients.billing.apps", ["nope"]),
        "clients.billing.apps[0]",
        "unknown app 'nope'",
        id="client-names-unknown-app",
    ),
    pytest.param(
        _set("clients.billing.key_file", "short.key"),
        "clients.billing.key_file",
        "at least 32 characters",
        id="client-key-too-short",
    ),
    pytest.param(
        _set("clients.billing.key_sha256", ["z" * 64]),
        "clients.billing.key_sha256[0]",
        "64 hex digits",
        id="key-sha256-not-hex",
    ),
    pytest.param(
        _set("store.url", "redis://redis.internal:6379/0"),
        "store.encryption_key_file",
        "required for a shared store",
        id="redis-without-encryption-key",
    ),
    pytest.param(
        _set("store", {"url": "redis://r:6379/0", "encryption_key_file": "bad-base64.key"}),
        "store.encryption_key_file",
        "line 1: not valid base64",
        id="store-key-bad-base64",
    ),
    pytest.param(
        _set("store", {"url": "redis://r:6379/0", "encryption_key_file": "short-store.key"}),
        "store.encryption_key_file",
        "16 bytes; 32 needed",
        id="store-key-16-bytes",
    ),
    pytest.param(
        _set("server.listen", "0.0.0.0:8411"),
        "server.listen",
        "not a loopback address",
        id="non-loopback-listen",
    ),
    pytest.param(
        _auth_code_without_redirect,
        "apps.twilio.redirect_uri",
        "required for grant_type authorization_code",
        id="authorization-code-without-redirect-uri",
    ),
    pytest.param(_drop("apps"), "apps", "at least one app", id="no-apps"),
    pytest.param(
        _set("apps.twilio.client_secret_flie", "twilio.secret"),
        "apps.twilio.client_secret_flie",
        "did you mean 'client_secret_file'?",
        id="misspelled-key-did-you-mean",
    ),
    pytest.param(
        _set("sever", {}),
        "sever",
        "did you mean 'server'?",
        id="misspelled-top-level-key-did-you-mean",
    ),
    pytest.param(
        _set("server.listen", "127.0.0.1:99999"),
        "server.listen",
        "port 99999 is out of range (0 to 65535)",
        id="listen-port-out-of-range",
    ),
    pytest.param(
        _set("server.metrics_listen", "0.0.0.0"),
        "server.metrics_listen",
        "is not host:port",
        id="metrics-listen-without-port",
    ),
    pytest.param(
        _set("apps.twilio.token_url", "https://id:pw@oauth.example/token"),
        "apps.twilio.token_url",
        "holds a password",
        id="token-url-with-password",
    ),
    pytest.param(
        _memory_store_for_authorization_code,
        "store.url",
        "memory:// cannot hold app twilio's token set",
        id="memory-store-for-authorization-code",
    ),
    pytest.param(
        _set("apps.twilio.max_token_requests_per_minute", 0),
        "apps.twilio.max_token_requests_per_minute",
        "at least 1",
        id="budget-zero",
    ),
    pytest.param(
        _set("apps.twilio.max_token_requests_per_minute", 2.5),
        "apps.twilio.max_token_requests_per_minute",
        "must be a whole number, not float",
        id="budget-fraction",
    ),
    pytest.param(
        _set("apps.twilio.max_token_requests_per_minute", "10"),
        "apps.twilio.max_token_requests_per_minute",
        "must be a whole number, not a string",
        id="budget-string",
    ),
]


class TestBrokenConfigs:
    """Each mistake raises ConfigError naming exactly the offending key."""

    @pytest.mark.parametrize(("mutate", "key", "fragment"), BROKEN)
    def test_broken(self, config_dir: Path, mutate: Mutation, key: str, fragment: str) -> None:
        """ConfigError.key is the dotted key and the reason says why."""
        document = minimal_document()
        mutate(document)
        with pytest.raises(ConfigError) as caught:
            load_config(write_config(config_dir, document))
        assert caught.value.key == key
        assert fragment in caught.value.reason

    def test_redis_password_in_url(self, config_dir: Path) -> None:
        """A password in store.url is refused in favour of store.password_file."""
        document = minimal_document()
        document["store"] = {
            "url": "redis://user:pw@r:6379/0",
            "encryption_key_file": "store.key",
        }
        with pytest.raises(ConfigError) as caught:
            load_config(write_config(config_dir, document))
        assert caught.value.key == "store.url"
        assert "password_file" in caught.value.reason

    def test_error_never_shows_a_secret(self, config_dir: Path) -> None:
        """A too-short client key is reported without its value."""
        document = minimal_document()
        document["clients"]["billing"]["key_file"] = "short.key"
        with pytest.raises(ConfigError) as caught:
            load_config(write_config(config_dir, document))
        assert "k" * 31 not in str(caught.value)

    def test_yaml_syntax_error(self, config_dir: Path) -> None:
        """Invalid YAML names the file and the line."""
        path = config_dir / "config.yaml"
        path.write_text("apps:\n  twilio: [unclosed\n")
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.key == str(path)
        assert "not valid YAML at line" in caught.value.reason

    def test_yaml_list(self, config_dir: Path) -> None:
        """A YAML document that is a list is not a config."""
        with pytest.raises(ConfigError) as caught:
            load_config(write_config(config_dir, ["apps", "clients"]))
        assert caught.value.key == "<config>"
        assert "must be a mapping, not a list" in caught.value.reason

    def test_missing_config_file(self, tmp_path: Path) -> None:
        """An unreadable config file is a ConfigError naming the path."""
        path = tmp_path / "absent.yaml"
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.key == str(path)

    def test_parse_config_resolves_against_base_dir(self, config_dir: Path) -> None:
        """parse_config resolves relative secret paths against the given base_dir."""
        config = parse_config(minimal_document(), base_dir=config_dir)
        assert config.apps["twilio"].client_secret_file == config_dir / "twilio.secret"
        with pytest.raises(ConfigError) as caught:
            parse_config(minimal_document(), base_dir=config_dir / "a-directory")
        assert caught.value.key == "apps.twilio.client_secret_file"


class TestParseDuration:
    """parse_duration: numbers and h/m/s strings."""

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            ("90s", 90.0),
            ("5m", 300.0),
            ("1h", 3600.0),
            ("1h30m", 5400.0),
            ("1h0m15s", 3615.0),
            (" 2m ", 120.0),
            (45, 45.0),
            (0.5, 0.5),
            ("2.5", 2.5),
            ("1.5m", 90.0),
        ],
    )
    def test_valid(self, value: object, seconds: float) -> None:
        """The value in seconds."""
        assert parse_duration(value, "k") == seconds

    @pytest.mark.parametrize(
        ("value", "fragment"),
        [
            ("5 minutes", "is not a duration"),
            ("", "is not a duration"),
            ("m", "is not a duration"),
            ("30m1h", "is not a duration"),
            ("inf", "is not a duration"),
            (True, "is not a duration"),
            (None, "is not a duration"),
            ([5], "is not a duration"),
            (-1, "must be positive"),
            ("0s", "must be positive"),
            (0, "must be positive"),
        ],
    )
    def test_invalid(self, value: object, fragment: str) -> None:
        """A ConfigError under the given key."""
        with pytest.raises(ConfigError) as caught:
            parse_duration(value, "apps.x.refresh.min_remaining")
        assert caught.value.key == "apps.x.refresh.min_remaining"
        assert fragment in caught.value.reason

    def test_zero_when_allowed(self) -> None:
        """allow_zero accepts 0 (e.g. no safety margin)."""
        assert parse_duration("0s", "k", allow_zero=True) == 0.0


class TestSummarize:
    """summarize: what check-config prints."""

    def test_no_secret_material(self, config_dir: Path) -> None:
        """The summary shows no secret file's content, only names and counts."""
        document = minimal_document()
        document["store"] = {"url": "redis://r:6379/0", "encryption_key_file": "store.key"}
        text = summarize(load_config(write_config(config_dir, document)))
        for secret in (CLIENT_SECRET, CLIENT_KEY, STORE_KEY_LINE.split()[1]):
            assert secret not in text
        assert "twilio" in text
        assert "billing: apps twilio (1 key(s))" in text
        assert "encrypted" in text

    def test_masks_redis_password(self) -> None:
        """A password in the store URL is shown as ***."""
        config = Config(
            server=ServerSpec(),
            store=StoreSpec(url="redis://user:pw@host:6379/0"),
            apps={"a": AppSpec(name="a", token_url="https://x.example/token")},
            clients={},
        )
        text = summarize(config)
        assert ":pw@" not in text
        assert "redis://user:***@host:6379/0" in text

    def test_token_url_password_not_shown(self, config_dir: Path) -> None:
        """A password in token_url is refused (as store.url's is), and the error does not show it."""
        document = minimal_document()
        document["apps"]["twilio"]["token_url"] = "https://OQ123:url-secret-42@oauth.example/token"
        with pytest.raises(ConfigError) as caught:
            load_config(write_config(config_dir, document))
        assert caught.value.key == "apps.twilio.token_url"
        assert "holds a password" in caught.value.reason
        assert "url-secret-42" not in str(caught.value)

    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
            ("redis://:pw@host:6379", "redis://:***@host:6379"),
            ("redis://host:6379/0", "redis://host:6379/0"),
            ("memory://", "memory://"),
        ],
    )
    def test_redact_url(self, url: str, shown: str) -> None:
        """redact_url replaces only the password."""
        assert redact_url(url) == shown

"""The `apps.<name>.proxy` block: defaults, normalization, and a table of mistakes by key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

from broker.config import parse_config, summarize
from broker.errors import ConfigError
from broker.model import ProxySpec

KEY = "billing-client-key-" + "k" * 30


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_text("client-secret-0123456789\n")
    (tmp_path / "billing.key").write_text(KEY + "\n")
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "not-a-ca.pem").write_text("-----BEGIN NOTHING-----\n")
    return tmp_path


def document(proxy: Any) -> dict[str, Any]:
    return {
        "apps": {
            "twilio": {
                "token_url": "https://oauth.twilio.com/v2/token",
                "client_id": "OQ123",
                "client_secret_file": "secret",
                "proxy": proxy,
            }
        },
        "clients": {"billing": {"key_file": "billing.key", "apps": ["twilio"]}},
    }


def proxy_of(proxy: Any, base_dir: Path) -> ProxySpec | None:
    return parse_config(document(proxy), base_dir=base_dir).apps["twilio"].proxy


class TestProxyBlock:
    def test_defaults(self, config_dir: Path) -> None:
        """Only `upstream` is required; every limit has a documented default."""
        spec = proxy_of({"upstream": "https://api.twilio.com"}, config_dir)
        assert spec == ProxySpec(upstream="https://api.twilio.com")
        assert spec.path_prefixes == ("/",)
        assert spec.retry_on_401 is True
        assert spec.refresh_on_status == (401,)
        assert spec.max_buffered_body == 1024 * 1024

    def test_every_key(self, config_dir: Path) -> None:
        """Durations, sizes with units, prefixes, the CA file and the limits are read."""
        spec = proxy_of(
            {
                "upstream": "https://API.Example.com:8443/",
                "path_prefixes": ["/2010-04-01/Accounts", "/v1/"],
                "connect_timeout": "2s",
                "read_timeout": "1m",
                "max_buffered_body": "512KiB",
                "max_request_body": "1GiB",
                "ca_file": "ca.pem",
                "retry_on_401": False,
                "refresh_on_status": [401, 403],
                "max_concurrent": 8,
            },
            config_dir,
        )
        assert spec == ProxySpec(
            upstream="https://api.example.com:8443",
            path_prefixes=("/2010-04-01/Accounts", "/v1/"),
            connect_timeout=2.0,
            read_timeout=60.0,
            max_buffered_body=512 * 1024,
            max_request_body=1024**3,
            ca_file=config_dir / "ca.pem",
            retry_on_401=False,
            refresh_on_status=(401, 403),
            max_concurrent=8,
        )

    def test_no_proxy_block_means_no_proxy(self, config_dir: Path) -> None:
        """An app without `proxy` has none."""
        doc = document(None)
        del doc["apps"]["twilio"]["proxy"]
        assert parse_config(doc, base_dir=config_dir).apps["twilio"].proxy is None

    def test_ipv6_and_loopback_http_upstreams(self, config_dir: Path) -> None:
        """Plain http is accepted for a loopback upstream; IPv6 hosts keep their brackets."""
        loopback = {"allowed_networks": ["127.0.0.0/8", "::1"]}
        assert proxy_of({"upstream": "http://127.0.0.1:8080", **loopback}, config_dir) == (
            ProxySpec(upstream="http://127.0.0.1:8080", allowed_networks=("127.0.0.0/8", "::1/128"))
        )
        spec = proxy_of({"upstream": "https://[::1]:9443", **loopback}, config_dir)
        assert spec is not None
        assert spec.upstream == "https://[::1]:9443"

    def test_summary_names_the_upstream_and_limits(self, config_dir: Path) -> None:
        """check-config's summary shows the proxy's upstream, prefixes and retry rule."""
        config = parse_config(
            document({"upstream": "https://api.twilio.com", "path_prefixes": ["/v1/"]}),
            base_dir=config_dir,
        )
        text = summarize(config)
        assert "proxy to https://api.twilio.com, paths /v1/" in text
        assert "retry on 401" in text


MISTAKES = [
    ("not-a-mapping", "apps.twilio.proxy", "must be a mapping"),
    ({}, "apps.twilio.proxy.upstream", "required"),
    ({"upstream": "https://a.example", "nope": 1}, "apps.twilio.proxy.nope", "unknown key"),
    ({"upstream": 5}, "apps.twilio.proxy.upstream", "must be a string"),
    ({"upstream": "ftp://a.example"}, "apps.twilio.proxy.upstream", "not an http(s) URL"),
    ({"upstream": "https://"}, "apps.twilio.proxy.upstream", "not an http(s) URL"),
    ({"upstream": "https://a.example/v1"}, "apps.twilio.proxy.upstream", "scheme and host only"),
    ({"upstream": "https://a.example?x=1"}, "apps.twilio.proxy.upstream", "scheme and host only"),
    ({"upstream": "https://a.example#f"}, "apps.twilio.proxy.upstream", "scheme and host only"),
    ({"upstream": "https://u:p@a.example"}, "apps.twilio.proxy.upstream", "user name"),
    ({"upstream": "https://a.example:99999"}, "apps.twilio.proxy.upstream", "invalid port"),
    ({"upstream": "https://a_b!.example"}, "apps.twilio.proxy.upstream", "not a host name"),
    ({"upstream": "http://api.example.com"}, "apps.twilio.proxy.upstream", "must use https"),
    (
        {"upstream": "https://a.example", "path_prefixes": []},
        "apps.twilio.proxy.path_prefixes",
        "lists no prefix",
    ),
    (
        {"upstream": "https://a.example", "path_prefixes": "/v1"},
        "apps.twilio.proxy.path_prefixes",
        "must be a list",
    ),
    (
        {"upstream": "https://a.example", "path_prefixes": ["v1"]},
        "apps.twilio.proxy.path_prefixes[0]",
        "must start with /",
    ),
    (
        {"upstream": "https://a.example", "path_prefixes": ["/v1", "/a%2Fb"]},
        "apps.twilio.proxy.path_prefixes[1]",
        "percent-encoding",
    ),
    (
        {"upstream": "https://a.example", "path_prefixes": ["/v1/../admin"]},
        "apps.twilio.proxy.path_prefixes[0]",
        ". or .. segments",
    ),
    (
        {"upstream": "https://a.example", "path_prefixes": ["/v1//x"]},
        "apps.twilio.proxy.path_prefixes[0]",
        "empty (//)",
    ),
    (
        {"upstream": "https://a.example", "connect_timeout": "soon"},
        "apps.twilio.proxy.connect_timeout",
        "not a duration",
    ),
    (
        {"upstream": "https://a.example", "read_timeout": 0},
        "apps.twilio.proxy.read_timeout",
        "must be positive",
    ),
    (
        {"upstream": "https://a.example", "max_buffered_body": "1 TB"},
        "apps.twilio.proxy.max_buffered_body",
        "not a size",
    ),
    (
        {"upstream": "https://a.example", "max_buffered_body": "32MiB"},
        "apps.twilio.proxy.max_buffered_body",
        "at most 16MiB",
    ),
    (
        {"upstream": "https://a.example", "max_buffered_body": "2MiB", "max_request_body": "1MiB"},
        "apps.twilio.proxy.max_buffered_body",
        "must not exceed max_request_body",
    ),
    (
        {"upstream": "https://a.example", "max_request_body": 0},
        "apps.twilio.proxy.max_request_body",
        "must be positive",
    ),
    (
        {"upstream": "https://a.example", "max_concurrent": 0},
        "apps.twilio.proxy.max_concurrent",
        "from 1 to",
    ),
    (
        {"upstream": "https://a.example", "max_concurrent": True},
        "apps.twilio.proxy.max_concurrent",
        "from 1 to",
    ),
    (
        {"upstream": "https://a.example", "retry_on_401": "yes"},
        "apps.twilio.proxy.retry_on_401",
        "true or false",
    ),
    (
        {"upstream": "https://a.example", "refresh_on_status": 401},
        "apps.twilio.proxy.refresh_on_status",
        "must be a list",
    ),
    (
        {"upstream": "https://a.example", "refresh_on_status": [401, 500]},
        "apps.twilio.proxy.refresh_on_status[1]",
        "from 400 to 499",
    ),
    (
        {"upstream": "https://a.example", "refresh_on_status": [401, 401]},
        "apps.twilio.proxy.refresh_on_status",
        "twice",
    ),
    (
        {"upstream": "https://a.example", "ca_file": "missing.pem"},
        "apps.twilio.proxy.ca_file",
        "does not exist",
    ),
    (
        {"upstream": "https://a.example", "ca_file": "not-a-ca.pem"},
        "apps.twilio.proxy.ca_file",
        "no PEM CA certificate",
    ),
]


@pytest.mark.parametrize(("proxy", "key", "reason"), MISTAKES)
def test_mistakes_name_the_key_and_the_reason(
    config_dir: Path, proxy: Any, key: str, reason: str
) -> None:
    """Each mistake in the proxy block is a ConfigError naming its dotted key and why."""
    with pytest.raises(ConfigError) as caught:
        parse_config(document(proxy), base_dir=config_dir)
    assert caught.value.key == key
    assert reason in caught.value.reason


class TestProxyListen:
    def server(self, config_dir: Path, **server: Any) -> Any:
        config = {**document({"upstream": "https://api.twilio.com"}), "server": server}
        return parse_config(config, base_dir=config_dir).server

    def test_a_loopback_port_or_a_unix_socket(self, config_dir: Path) -> None:
        """`proxy_listen` takes what `listen` takes; none by default."""
        assert self.server(config_dir).proxy_listen is None
        assert self.server(config_dir, proxy_listen="127.0.0.1:8412").proxy_listen == (
            "127.0.0.1:8412"
        )
        server = self.server(config_dir, proxy_listen="unix:/run/broker/proxy.sock")
        assert server.proxy_unix_path == "/run/broker/proxy.sock"
        assert server.unix_path is None

    @pytest.mark.parametrize(
        ("server", "message"),
        [
            ({"proxy_listen": "0.0.0.0:8412"}, "is not a loopback address"),
            ({"proxy_listen": "127.0.0.1:8411"}, "already used by another listener"),
            ({"proxy_listen": "8412"}, "is not host:port"),
        ],
    )
    def test_mistakes_name_the_key(
        self, config_dir: Path, server: dict[str, Any], message: str
    ) -> None:
        """Beyond loopback (without allow_non_loopback), the API's own address, no port."""
        with pytest.raises(ConfigError) as caught:
            self.server(config_dir, listen="127.0.0.1:8411", **server)
        assert "server.proxy_listen" in str(caught.value)
        assert message in str(caught.value)

    def test_peer_identity_may_use_the_proxy_socket(self, config_dir: Path) -> None:
        """Clients by uid need a unix socket: the proxy listener's is one."""
        config = document({"upstream": "https://api.twilio.com"})
        config["clients"]["byuid"] = {"uids": [1000], "apps": ["twilio"]}
        config["server"] = {"proxy_listen": "unix:/run/broker/proxy.sock"}
        assert parse_config(config, base_dir=config_dir).clients["byuid"].uids == (1000,)
        config["server"] = {"proxy_listen": "127.0.0.1:8412"}
        with pytest.raises(ConfigError, match="peer identity works only over a unix socket"):
            parse_config(config, base_dir=config_dir)

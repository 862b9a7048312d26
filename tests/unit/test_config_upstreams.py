"""`proxy.upstreams` (several hosts per app) and `proxy.allowed_networks` (the egress guard's
exceptions): the shapes accepted, and a table of mistakes by key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import parse_config, summarize
from broker.errors import ConfigError, ConfigErrors
from broker.model import ProxySpec, UpstreamSpec
from tests.unit.test_config_proxy import KEY, document, proxy_of
from tests.unit.test_config_schema import schema_errors


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """The files `document()` names: the client secret and the client's key."""
    (tmp_path / "secret").write_text("client-secret-0123456789\n")
    (tmp_path / "billing.key").write_text(KEY + "\n")
    return tmp_path


class TestUpstreams:
    def test_string_and_mapping_forms(self, config_dir: Path) -> None:
        """A name maps to an origin, or to {origin, path_prefixes}; origins are normalized."""
        spec = proxy_of(
            {
                "upstreams": {
                    "api": "https://API.twilio.com/",
                    "messaging": {
                        "origin": "https://messaging.twilio.com",
                        "path_prefixes": ["/v1/Services/"],
                    },
                },
                "path_prefixes": ["/2010-04-01/"],
            },
            config_dir,
        )
        assert spec == ProxySpec(
            upstreams=(
                UpstreamSpec("api", "https://api.twilio.com"),
                UpstreamSpec("messaging", "https://messaging.twilio.com", ("/v1/Services/",)),
            ),
            path_prefixes=("/2010-04-01/",),
        )

    def test_the_summary_names_each_upstream_with_its_paths(self, config_dir: Path) -> None:
        """check-config shows every upstream, its origin and the prefixes it uses (its own, or
        the proxy's), and the allowed networks."""
        config = parse_config(
            document(
                {
                    "upstreams": {
                        "api": "https://api.twilio.com",
                        "verify": {
                            "origin": "https://verify.twilio.com",
                            "path_prefixes": ["/v2/"],
                        },
                    },
                    "path_prefixes": ["/2010-04-01/"],
                    "allowed_networks": ["10.0.0.0/8"],
                }
            ),
            base_dir=config_dir,
        )
        text = summarize(config)
        assert (
            "proxy to api https://api.twilio.com (paths /2010-04-01/); "
            "verify https://verify.twilio.com (paths /v2/)"
        ) in text
        assert "at once per upstream" in text
        assert "may reach 10.0.0.0/8" in text


class TestAllowedNetworks:
    def test_networks_are_normalized(self, config_dir: Path) -> None:
        """Addresses become one-address networks; IPv6 is compressed."""
        spec = proxy_of(
            {
                "upstream": "https://api.example.com",
                "allowed_networks": ["10.1.0.0/16", "127.0.0.1", "FD00:0::/8"],
            },
            config_dir,
        )
        assert spec is not None
        assert spec.allowed_networks == ("10.1.0.0/16", "127.0.0.1/32", "fd00::/8")

    @pytest.mark.parametrize(
        ("upstream", "allowed"),
        [
            ("https://127.0.0.1:8443", ["127.0.0.0/8"]),
            ("https://[::1]", ["::1"]),
            ("https://10.2.3.4", ["10.2.0.0/16"]),
            ("https://169.254.169.254", ["169.254.169.254/32"]),
            ("https://[::ffff:127.0.0.1]", ["127.0.0.0/8"]),
        ],
    )
    def test_a_special_address_inside_an_allowed_network_is_accepted(
        self, config_dir: Path, upstream: str, allowed: list[str]
    ) -> None:
        """An upstream given as a special address loads once its network is allowed."""
        assert proxy_of({"upstream": upstream, "allowed_networks": allowed}, config_dir)

    def test_a_public_address_needs_no_allowance(self, config_dir: Path) -> None:
        """https://93.184.216.34 is accepted without allowed_networks."""
        assert proxy_of({"upstream": "https://93.184.216.34"}, config_dir)


MISTAKES: list[tuple[Any, str, str]] = [
    ({}, "apps.twilio.proxy.upstream", "required: give upstream (one origin) or upstreams"),
    (
        {"upstream": "https://a.example", "upstreams": {"api": "https://b.example"}},
        "apps.twilio.proxy.upstreams",
        "give upstream or upstreams, not both",
    ),
    ({"upstreams": {}}, "apps.twilio.proxy.upstreams", "must be a mapping of names to origins"),
    ({"upstreams": ["https://a.example"]}, "apps.twilio.proxy.upstreams", "not a list"),
    ({"upstreams": {"API": "https://a.example"}}, "apps.twilio.proxy.upstreams.API", "names"),
    ({"upstreams": {"a/b": "https://a.example"}}, "apps.twilio.proxy.upstreams.a/b", "names"),
    (
        {"upstreams": {"api": "https://a.example/v1"}},
        "apps.twilio.proxy.upstreams.api",
        "scheme and host only",
    ),
    (
        {"upstreams": {"api": "http://a.example"}},
        "apps.twilio.proxy.upstreams.api",
        "must use https",
    ),
    ({"upstreams": {"api": 5}}, "apps.twilio.proxy.upstreams.api", "not int"),
    (
        {"upstreams": {"api": {"path_prefixes": ["/v1"]}}},
        "apps.twilio.proxy.upstreams.api.origin",
        "required",
    ),
    (
        {"upstreams": {"api": {"origin": "ftp://a.example"}}},
        "apps.twilio.proxy.upstreams.api.origin",
        "not an http(s) URL",
    ),
    (
        {"upstreams": {"api": {"origin": "https://a.example", "paths": ["/v1"]}}},
        "apps.twilio.proxy.upstreams.api.paths",
        "unknown key (allowed: origin, path_prefixes)",
    ),
    (
        {"upstreams": {"api": {"origin": "https://a.example", "path_prefixes": ["v1"]}}},
        "apps.twilio.proxy.upstreams.api.path_prefixes[0]",
        "must start with /",
    ),
    (
        {"upstream": "https://127.0.0.1:8443"},
        "apps.twilio.proxy.upstream",
        "127.0.0.1 is a loopback address: the proxy refuses it unless allowed_networks lists "
        "it (e.g. allowed_networks: [127.0.0.1/32])",
    ),
    (
        {"upstream": "https://169.254.169.254"},
        "apps.twilio.proxy.upstream",
        "169.254.169.254 is a link-local address",
    ),
    (
        {"upstream": "https://169.254.169.254", "allowed_networks": ["10.0.0.0/8"]},
        "apps.twilio.proxy.upstream",
        "link-local",
    ),
    ({"upstream": "https://[::ffff:10.0.0.1]"}, "apps.twilio.proxy.upstream", "private"),
    ({"upstream": "https://[fd00::1]"}, "apps.twilio.proxy.upstream", "private"),
    ({"upstream": "https://0.0.0.0"}, "apps.twilio.proxy.upstream", "unspecified"),
    (
        {"upstreams": {"imds": "https://169.254.169.254"}},
        "apps.twilio.proxy.upstreams.imds",
        "link-local",
    ),
    (
        {"upstream": "https://a.example", "allowed_networks": []},
        "apps.twilio.proxy.allowed_networks",
        "lists no network",
    ),
    (
        {"upstream": "https://a.example", "allowed_networks": ["10.1.2.3/8"]},
        "apps.twilio.proxy.allowed_networks[0]",
        "has host bits set: did you mean 10.0.0.0/8?",
    ),
    (
        {"upstream": "https://a.example", "allowed_networks": ["10.0.0.0/8", "intranet"]},
        "apps.twilio.proxy.allowed_networks[1]",
        "not an address or a network",
    ),
    (
        {"upstream": "https://a.example", "allowed_networks": "10.0.0.0/8"},
        "apps.twilio.proxy.allowed_networks",
        "must be a list",
    ),
]


@pytest.mark.parametrize(("proxy", "key", "reason"), MISTAKES)
def test_mistakes_name_the_key_and_the_reason(
    config_dir: Path, proxy: Any, key: str, reason: str
) -> None:
    """Each mistake is a ConfigError naming its dotted key and why."""
    with pytest.raises(ConfigError) as caught:
        parse_config(document(proxy), base_dir=config_dir)
    assert caught.value.key == key
    assert reason in caught.value.reason


def test_a_wrong_allow_list_is_reported_once(config_dir: Path) -> None:
    """A literal upstream is not checked against an allow-list that is itself wrong: one
    mistake, at allowed_networks, not a second one echoing it at upstream."""
    with pytest.raises(ConfigError) as caught:
        parse_config(
            document({"upstream": "https://127.0.0.1", "allowed_networks": ["127.0.0.1/8"]}),
            base_dir=config_dir,
        )
    assert not isinstance(caught.value, ConfigErrors)
    assert caught.value.key == "apps.twilio.proxy.allowed_networks[0]"


SCHEMA_CASES: list[tuple[Any, bool]] = [
    ({"upstreams": {"api": "https://a.example"}}, True),
    ({"upstreams": {"api": {"origin": "https://a.example", "path_prefixes": ["/v1"]}}}, True),
    ({"upstream": "https://a.example", "upstreams": {"api": "https://b.example"}}, False),
    ({"path_prefixes": ["/"]}, False),
    ({"upstreams": {"API": "https://a.example"}}, False),
    ({"upstreams": {"api": "https://a.example/v1"}}, False),
    ({"upstreams": {"api": {"origin": "https://a.example", "paths": ["/v1"]}}}, False),
    ({"upstreams": {"api": {"path_prefixes": ["/v1"]}}}, False),
]


@pytest.mark.parametrize(("proxy", "valid"), SCHEMA_CASES)
def test_the_json_schema_agrees_with_the_validator(
    config_dir: Path, proxy: Any, valid: bool
) -> None:
    """The chart's and editors' schema accepts and refuses the same upstreams shapes."""
    try:
        parse_config(document(proxy), base_dir=config_dir)
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted is valid
    assert (schema_errors(document(proxy)) == []) is valid

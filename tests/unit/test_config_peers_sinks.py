"""Config for the unix socket (mode, group), clients by uid/gid, and token files (sinks)."""

from __future__ import annotations

import copy
import grp
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.config import parse_config, summarize
from broker.errors import ConfigError
from broker.model import SinkFormat

SECRET = "s3cret-value-0123456789-abcdefghij"
Document = dict[str, Any]


def document(tmp_path: Path) -> Document:
    (tmp_path / "secret").write_text(SECRET)
    app = {
        "token_url": "https://auth.example/token",
        "client_id": "id",
        "client_secret_file": "secret",
    }
    return {
        "server": {"listen": "unix:/run/token-broker/api.sock"},
        "apps": {"app1": dict(app), "app2": dict(app)},
        "clients": {"billing": {"uids": [1001], "apps": ["app1"]}},
    }


def parse(tmp_path: Path, mutate: Callable[[Document], None] | None = None) -> Any:
    doc = copy.deepcopy(document(tmp_path))
    if mutate is not None:
        mutate(doc)
    return parse_config(doc, base_dir=tmp_path)


class TestValid:
    def test_socket_defaults_and_settings(self, tmp_path: Path) -> None:
        """socket_mode defaults to 0660 and no group; both parse from octal strings and ids."""
        assert parse(tmp_path).server.socket_mode == 0o660
        assert parse(tmp_path).server.socket_group is None

        def settings(doc: Document) -> None:
            doc["server"].update(socket_mode="0600", socket_group=1234)

        server = parse(tmp_path, settings).server
        assert (server.socket_mode, server.socket_group) == (0o600, 1234)

    def test_group_name_resolves_on_this_host(self, tmp_path: Path) -> None:
        """A group given by name becomes its gid."""
        name = grp.getgrgid(os.getgid()).gr_name
        config = parse(tmp_path, lambda d: d["server"].update(socket_group=name))
        assert config.server.socket_group == os.getgid()

    def test_clients_by_uid_gid_and_key(self, tmp_path: Path) -> None:
        """A client may be identified by uids, gids, a key, or several of them."""
        (tmp_path / "k").write_text("k" * 40)

        def clients(doc: Document) -> None:
            doc["clients"]["team"] = {"gids": [2000, 2001], "apps": ["app2"]}
            doc["clients"]["both"] = {"uids": [1002], "key_file": "k", "apps": ["app1"]}

        config = parse(tmp_path, clients)
        assert config.clients["billing"].uids == (1001,)
        assert config.clients["team"].gids == (2000, 2001)
        assert config.clients["both"].uids == (1002,)
        assert config.clients["both"].key_files == (tmp_path / "k",)

    def test_sinks(self, tmp_path: Path) -> None:
        """Sinks parse with their defaults: raw, mode 0600, the broker's ownership."""

        def sinks(doc: Document) -> None:
            doc["apps"]["app1"]["sinks"] = [
                {"path": "/tokens/a"},
                {"path": "/tokens/b", "format": "header", "mode": "0640", "owner": 0, "group": 0},
            ]

        first, second = parse(tmp_path, sinks).apps["app1"].sinks
        assert (first.path, first.format, first.mode, first.owner) == (
            Path("/tokens/a"),
            SinkFormat.RAW,
            0o600,
            None,
        )
        assert (second.format, second.mode, second.owner, second.group) == (
            SinkFormat.HEADER,
            0o640,
            0,
            0,
        )

    def test_summary_names_socket_peers_and_sinks(self, tmp_path: Path) -> None:
        """check-config's summary shows the socket's mode, the peer ids and the sinks."""
        config = parse(tmp_path, lambda d: d["apps"]["app1"].update(sinks=[{"path": "/t/a"}]))
        text = summarize(config)
        assert "unix:/run/token-broker/api.sock (mode 0660)" in text
        assert "billing: apps app1 (0 key(s)), by peer uids 1001" in text
        assert "sink /t/a (raw, mode 0600)" in text


def _set(path: str, value: object) -> Callable[[Document], None]:
    def mutate(doc: Document) -> None:
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value

    return mutate


def _add_client(name: str, body: Document) -> Callable[[Document], None]:
    return lambda doc: doc["clients"].__setitem__(name, body)


BROKEN = [
    (_set("server.socket_mode", 0o660), "server.socket_mode", "quoted octal"),
    (_set("server.socket_mode", "0999"), "server.socket_mode", "quoted octal"),
    (_set("server.socket_mode", "0460"), "server.socket_mode", "owner needs write"),
    (_set("server.socket_group", "no-such-group-here"), "server.socket_group", "no group"),
    (_set("server.socket_group", -5), "server.socket_group", "numeric id"),
    (_set("server.socket_group", True), "server.socket_group", "numeric id"),
    (
        lambda d: d["server"].update(listen="127.0.0.1:8411", socket_mode="0600"),
        "server.socket_mode",
        "only when server.listen or server.proxy_listen is unix",
    ),
    (
        lambda d: d["server"].update(listen="127.0.0.1:8411"),
        "clients.billing.uids",
        "only over a unix socket",
    ),
    (_set("clients.billing.uids", []), "clients.billing.uids", "non-empty list"),
    (_set("clients.billing.uids", [True]), "clients.billing.uids[0]", "not a numeric id"),
    (_set("clients.billing.uids", [-1]), "clients.billing.uids[0]", "not a numeric id"),
    (_set("clients.billing.uids", ["1001"]), "clients.billing.uids[0]", "not a numeric id"),
    (_set("clients.billing.uids", [7, 7]), "clients.billing.uids", "twice"),
    (
        _add_client("other", {"uids": [1001], "apps": ["app2"]}),
        "clients.other.uids[0]",
        "already identifies client billing",
    ),
    (
        lambda d: d["clients"].update(
            a={"gids": [5], "apps": ["app1"]}, b={"gids": [5], "apps": ["app2"]}
        ),
        "clients.b.gids[0]",
        "already identifies client a",
    ),
    (_set("clients.billing", {"apps": ["app1"]}), "clients.billing", "needs an identity"),
    (_set("apps.app1.sinks", {"path": "/t"}), "apps.app1.sinks", "must be a list"),
    (_set("apps.app1.sinks", [{"format": "raw"}]), "apps.app1.sinks[0].path", "required"),
    (_set("apps.app1.sinks", [{"path": "tokens/a"}]), "apps.app1.sinks[0].path", "absolute"),
    (_set("apps.app1.sinks", [{"path": "/t/../a"}]), "apps.app1.sinks[0].path", "normalized"),
    (_set("apps.app1.sinks", [{"path": "/t/"}]), "apps.app1.sinks[0].path", "normalized"),
    (
        _set("apps.app1.sinks", [{"path": "/t", "format": "xml"}]),
        "apps.app1.sinks[0].format",
        "not one of",
    ),
    (
        _set("apps.app1.sinks", [{"path": "/t", "mode": "0666"}]),
        "apps.app1.sinks[0].mode",
        "at most 0644",
    ),
    (
        _set("apps.app1.sinks", [{"path": "/t", "mode": "0700"}]),
        "apps.app1.sinks[0].mode",
        "at most 0644",
    ),
    (
        _set("apps.app1.sinks", [{"path": "/t", "mode": 384}]),
        "apps.app1.sinks[0].mode",
        "quoted octal",
    ),
    (
        _set("apps.app1.sinks", [{"path": "/t", "owner": "no-such-user-x"}]),
        "apps.app1.sinks[0].owner",
        "no user",
    ),
    (
        _set("apps.app1.sinks", [{"path": "/t", "group": "no-such-group-x"}]),
        "apps.app1.sinks[0].group",
        "no group",
    ),
    (
        _set("apps.app1.sinks", [{"path": "/t", "colour": "red"}]),
        "apps.app1.sinks[0].colour",
        "unknown key",
    ),
    (
        lambda d: (
            d["apps"]["app1"].update(sinks=[{"path": "/t/a"}]),
            d["apps"]["app2"].update(sinks=[{"path": "/t/a"}]),
        ),
        "apps.app2.sinks[0].path",
        "already used by apps.app1.sinks[0].path",
    ),
    (
        _set("apps.app1.sinks", [{"path": "/t/a"}, {"path": "/t/a"}]),
        "apps.app1.sinks[1].path",
        "already used",
    ),
    (
        _set("apps.app1.sinks", [{"path": "/run/token-broker/api.sock"}]),
        "apps.app1.sinks[0].path",
        "already used by server.listen",
    ),
]


class TestBroken:
    @pytest.mark.parametrize(("mutate", "key", "fragment"), BROKEN)
    def test_names_the_key_and_the_reason(
        self, tmp_path: Path, mutate: Callable[[Document], None], key: str, fragment: str
    ) -> None:
        """Each mistake is a ConfigError naming the key, with a reason."""
        with pytest.raises(ConfigError) as caught:
            parse(tmp_path, mutate)
        assert caught.value.key == key
        assert fragment in caught.value.reason

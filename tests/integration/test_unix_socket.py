"""The API on a real unix socket, callers identified by the kernel's peer credentials.

As root, every caller is a child process that drops to its own uid and gid before it connects,
so one broker sees several users. Without root, every caller is this process: the positive
cases map its uid (or gid), and the negative one runs a broker whose config maps neither.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.broker_process import BrokerProcess
from tests.support.config import edit_config, write_document
from tests.support.oauth_server import OAuthTestServer
from tests.support.peers import (
    IS_ROOT,
    SELF,
    Identity,
    cli_token,
    request_token,
    shared_directory,
)
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

CLIENT_KEY = "unix-socket-test-client-key-0123456789"
SECRET = "test-secret-0123456789-abcdefghij"
SOCKET_MODE = 0o660
SOCKET_GROUP = 61000 if IS_ROOT else os.getgid()
# As root, the broker runs without the capability that lets root give a file to any group.
NO_CHOWN = ("setpriv", "--bounding-set", "-chown", "--") if IS_ROOT else ()

if IS_ROOT:
    MAPPED = Identity(61001, SOCKET_GROUP)  # client "reader": app1
    UNMAPPED = Identity(61003, SOCKET_GROUP)  # may connect, names no client
    BY_GID = Identity(61006, 61005, (SOCKET_GROUP,))  # client "team" by its primary gid
    OUTSIDER = Identity(61004, 61004)  # not in the socket's group
else:
    MAPPED = UNMAPPED = BY_GID = OUTSIDER = SELF


def clients(variant: str) -> dict[str, Any]:
    """The clients of a broker variant ("main", "unmapped", "by_gid")."""
    keyed = {"key_file": "client.key", "apps": ["app1", "app2"]}
    if IS_ROOT:
        return {
            "reader": {"uids": [61001], "apps": ["app1"]},
            "other": {"uids": [61002], "apps": ["app2"]},
            "team": {"gids": [61005], "apps": ["app1"]},
            "keyed": keyed,
        }
    uid, gid = os.geteuid(), os.getegid()
    return {
        "main": {"reader": {"uids": [uid], "apps": ["app1"]}, "keyed": keyed},
        # Peer identity is on, but neither this uid nor this gid names a client.
        "unmapped": {"reader": {"uids": [uid + 1], "apps": ["app1"]}, "keyed": keyed},
        "by_gid": {"team": {"gids": [gid], "apps": ["app1"]}, "keyed": keyed},
    }[variant]


@dataclass
class SocketApi:
    """A running broker whose API is a unix socket."""

    socket: Path
    config: Path
    process: BrokerProcess
    metrics: str

    @property
    def url(self) -> str:
        """The API as `token-broker token --url` takes it."""
        return f"unix:{self.socket}"


def write_config(directory: Path, socket: Path, token_url: str, variant: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "secret").write_text(SECRET)
    (directory / "client.key").write_text(CLIENT_KEY)
    app = {"token_url": token_url, "client_id": "test-client", "client_secret_file": "secret"}
    config = {
        "server": {
            "listen": f"unix:{socket}",
            "metrics_listen": f"127.0.0.1:{free_port()}",
            "socket_mode": f"{SOCKET_MODE:04o}",
            "socket_group": SOCKET_GROUP,
        },
        "apps": {"app1": app, "app2": app},
        "clients": clients(variant),
    }
    return write_document(directory, config)


def metrics_url(config: Path) -> str:
    listen: str = yaml.safe_load(config.read_text())["server"]["metrics_listen"]
    return f"http://{listen}"


StartApi = Callable[[str], Awaitable[SocketApi]]


@pytest.fixture
async def start_api(tmp_path: Path, oauth_server: OAuthTestServer) -> AsyncIterator[StartApi]:
    """Starts (once per variant; as root one broker serves them all) a broker on a socket."""
    started: dict[str, SocketApi] = {}
    with ExitStack() as stack:

        async def start(variant: str) -> SocketApi:
            key = "main" if IS_ROOT else variant
            if key not in started:
                socket = stack.enter_context(shared_directory()) / "api.sock"
                config = write_config(tmp_path / key, socket, oauth_server.token_url, key)
                process = BrokerProcess(config, tmp_path / f"{key}.log")
                api = started[key] = SocketApi(socket, config, process, metrics_url(config))
                process.start()
                await process.wait_ready(api.metrics)
            return started[key]

        try:
            yield start
        finally:
            for api in started.values():
                try:
                    await api.process.terminate_async()
                finally:
                    api.process.kill()


class TestPeerIdentity:
    async def test_a_client_identified_by_its_uid_gets_its_token(
        self, start_api: StartApi, oauth_server: OAuthTestServer
    ) -> None:
        """A caller whose uid a client lists gets that client's token without any key."""
        api = await start_api("main")
        answer = request_token(MAPPED, api.url, "app1")
        assert answer["status"] == 200, answer
        oauth_server.verify_access_token(answer["body"]["access_token"])
        issued = [e for e in api.process.log_lines() if e.get("event") == "token.issued"]
        assert issued[-1]["client"] == "reader"

    async def test_the_cli_needs_no_key_when_its_uid_is_mapped(
        self, start_api: StartApi, oauth_server: OAuthTestServer
    ) -> None:
        """`token-broker token APP --url unix:/path` prints the token for a mapped uid."""
        api = await start_api("main")
        out = cli_token(MAPPED, api.url, "app1")
        assert out.returncode == 0, out.stderr
        oauth_server.verify_access_token(out.stdout.strip())

    async def test_the_cli_names_a_misspelled_app_and_the_callers_apps(
        self, start_api: StartApi
    ) -> None:
        """Over the socket a mapped uid asking for a misspelled app learns which apps it has."""
        api = await start_api("main")
        out = cli_token(MAPPED, api.url, "ap1")
        assert out.returncode == 1
        assert (
            "HTTP 404 unknown_app: no app named 'ap1' is configured; this client may use: app1"
            in out.stderr
        )

    async def test_an_unmapped_uid_gets_401(self, start_api: StartApi) -> None:
        """A caller whose uid and gid no client lists, without a key, gets 401."""
        api = await start_api("unmapped")
        answer = request_token(UNMAPPED, api.url, "app1")
        assert answer["status"] == 401, answer
        assert answer["body"]["error"] == "unauthorized"
        out = cli_token(UNMAPPED, api.url, "app1")
        assert out.returncode == 1
        assert "HTTP 401 unauthorized" in out.stderr
        denied = [e for e in api.process.log_lines() if e.get("event") == "client.denied"]
        assert denied[0]["peer_uid"] == UNMAPPED.effective_uid

    async def test_a_uid_mapped_to_another_app_gets_403(self, start_api: StartApi) -> None:
        """A mapped caller asking for an app its client may not use gets 403."""
        api = await start_api("main")
        answer = request_token(MAPPED, api.url, "app2")
        assert answer["status"] == 403, answer
        assert answer["body"]["error"] == "forbidden"
        assert "reader" in answer["body"]["message"]

    async def test_a_gid_identifies_a_client_when_no_uid_does(self, start_api: StartApi) -> None:
        """A caller whose uid is unmapped but whose primary gid a client lists is that client."""
        api = await start_api("by_gid")
        answer = request_token(BY_GID, api.url, "app1")
        assert answer["status"] == 200, answer
        issued = [e for e in api.process.log_lines() if e.get("event") == "token.issued"]
        assert issued[-1]["client"] == "team"

    async def test_a_key_still_works_and_is_judged_alone(self, start_api: StartApi) -> None:
        """A valid key works from an unmapped uid; a wrong key fails even from a mapped uid."""
        api = await start_api("unmapped")
        answer = request_token(UNMAPPED, api.url, "app2", key=CLIENT_KEY)
        assert answer["status"] == 200, answer
        main = await start_api("main")
        wrong = request_token(MAPPED, main.url, "app1", key="w" * 40)
        assert wrong["status"] == 401, wrong

    async def test_sighup_maps_a_new_uid(self, start_api: StartApi) -> None:
        """A uid added to a client by a config reload is that client from then on."""
        api = await start_api("unmapped")
        assert request_token(UNMAPPED, api.url, "app1")["status"] == 401
        newcomer = {"uids": [UNMAPPED.effective_uid], "apps": ["app1"]}
        edit_config(api.config, lambda data: data["clients"].update(newcomer=newcomer))
        assert api.process.process is not None
        api.process.process.send_signal(signal.SIGHUP)
        for _ in range(100):
            if any(e.get("event") == "config.reloaded" for e in api.process.log_lines()):
                break
            await asyncio.sleep(0.1)
        assert request_token(UNMAPPED, api.url, "app1")["status"] == 200


class TestSocketFile:
    async def test_mode_and_group_are_as_configured(self, start_api: StartApi) -> None:
        """The socket has the configured mode and group; as root, a uid outside it cannot connect."""
        api = await start_api("main")
        st = os.stat(api.socket)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == SOCKET_MODE
        assert st.st_gid == SOCKET_GROUP
        answer = request_token(OUTSIDER, api.url, "app1", key=CLIENT_KEY)
        if IS_ROOT:
            # Neither owner nor group: the kernel refuses the connection before any HTTP.
            assert answer == {"connect_error": "PermissionError"}
        else:
            # This process owns the socket: the owner bits let it in.
            assert answer["status"] == 200, answer

    async def test_a_live_socket_is_kept_and_a_stale_one_replaced(
        self, start_api: StartApi, tmp_path: Path
    ) -> None:
        """A second broker on a socket in use exits 1; after a crash, a restart takes it over."""
        api = await start_api("main")
        second = BrokerProcess(api.config, tmp_path / "second.log")
        second.start()
        try:
            assert second.process is not None
            assert second.process.wait(timeout=60) == 1
        finally:
            second.kill()  # only if it did not exit by itself
        assert f"another process listens on {api.socket}" in second.output()
        assert request_token(MAPPED, api.url, "app1")["status"] == 200

        api.process.kill()  # a crash leaves the socket file behind
        assert stat.S_ISSOCK(os.lstat(api.socket).st_mode)
        api.process.start()
        await api.process.wait_ready(api.metrics)
        assert request_token(MAPPED, api.url, "app1")["status"] == 200
        assert any(e.get("event") == "api.stale_socket_removed" for e in api.process.log_lines())

    async def test_a_group_the_broker_cannot_use_is_an_error_naming_the_key(
        self, tmp_path: Path, oauth_server: OAuthTestServer
    ) -> None:
        """A socket_group the broker may not give the socket to: exit 2, naming the key."""
        foreign = next(g for g in range(61000, 62000) if g not in os.getgroups())
        with shared_directory() as directory:
            socket = directory / "api.sock"
            config = write_config(tmp_path, socket, oauth_server.token_url, "main")
            text = config.read_text().replace(
                f"socket_group: {SOCKET_GROUP}", f"socket_group: {foreign}"
            )
            config.write_text(text)
            process = BrokerProcess(config, tmp_path / "broker.log", wrapper=NO_CHOWN)
            process.start()
            try:
                assert process.process is not None
                assert process.process.wait(timeout=60) == 2
            finally:
                process.kill()  # only if it did not exit by itself
            assert (
                f"server.socket_group: cannot give {socket} to group {foreign}" in process.output()
            )
            assert not socket.exists()

"""Binding the API's unix socket, and reading a connection's peer credentials."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer, TestClient

from broker.api import ApiDependencies, build_api
from broker.api.auth import ClientAuthenticator, PeerCredentials
from broker.api.server import api_server_options
from broker.api.unix_socket import bind_unix_socket
from broker.errors import ConfigError, TokenUnavailable
from broker.metrics import Metrics
from broker.model import ClientSpec, ServerSpec
from tests.support.fake_clock import FakeClock
from tests.unit.test_api import ClientFactory, fake_service


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    # A short path: unix socket paths are limited to 107 bytes, pytest's tmp_path can be long.
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"tb-unit-{os.getpid()}"
    directory.mkdir(exist_ok=True)
    path = directory / "api.sock"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        directory.rmdir()


def server(path: Path, mode: int = 0o660, group: int | None = None) -> ServerSpec:
    return ServerSpec(listen=f"unix:{path}", socket_mode=mode, socket_group=group)


class TestBind:
    @pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
    def test_mode_is_applied(self, sock_path: Path, mode: int) -> None:
        """The socket file has exactly the configured mode, whatever the umask."""
        previous = os.umask(0)
        try:
            listener = bind_unix_socket(server(sock_path, mode))
        finally:
            os.umask(previous)
        try:
            assert stat.S_IMODE(os.stat(sock_path).st_mode) == mode
        finally:
            listener.sock.close()

    def test_group_is_applied(self, sock_path: Path) -> None:
        """The socket file belongs to the configured group."""
        listener = bind_unix_socket(server(sock_path, group=os.getgid()))
        try:
            assert os.stat(sock_path).st_gid == os.getgid()
        finally:
            listener.sock.close()

    def test_a_stale_socket_file_is_replaced(self, sock_path: Path) -> None:
        """A socket file nobody listens on (a crashed broker's) is removed and bound anew."""
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(str(sock_path))
        dead.close()
        listener = bind_unix_socket(server(sock_path))
        try:
            listener.sock.listen()
            probe = socket.socket(socket.AF_UNIX)
            probe.connect(str(sock_path))
            probe.close()
        finally:
            listener.sock.close()

    def test_a_live_socket_is_not_taken_over(self, sock_path: Path) -> None:
        """A socket another process listens on stays: binding fails with EADDRINUSE."""
        live = socket.socket(socket.AF_UNIX)
        live.bind(str(sock_path))
        live.listen()
        try:
            with pytest.raises(OSError, match="another process listens") as caught:
                bind_unix_socket(server(sock_path))
            assert caught.value.errno == errno.EADDRINUSE
            assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        finally:
            live.close()

    def test_a_file_that_is_not_a_socket_is_left_alone(self, sock_path: Path) -> None:
        """A regular file at the path is an error naming server.listen, and is not deleted."""
        sock_path.write_text("precious")
        with pytest.raises(ConfigError) as caught:
            bind_unix_socket(server(sock_path))
        assert caught.value.key == "server.listen"
        assert sock_path.read_text() == "precious"

    def test_remove_deletes_only_its_own_file(self, sock_path: Path) -> None:
        """On shutdown the file is removed, unless another broker has bound the path since."""
        first = bind_unix_socket(server(sock_path))  # bound, never listening: looks stale
        second = bind_unix_socket(server(sock_path))
        try:
            first.remove()
            assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
            second.remove()
            assert not sock_path.exists()
        finally:
            first.sock.close()
            second.sock.close()


class FakeTransport:
    """The part of an asyncio transport PeerCredentials uses."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None


class TestPeerCredentials:
    def test_a_unix_peer_has_this_process_uid_and_gid(self) -> None:
        """Over a unix socket the kernel reports the peer's uid and gid, read once."""
        ours, theirs = socket.socketpair(socket.AF_UNIX)
        transport = FakeTransport(ours)
        peers = PeerCredentials()
        try:
            assert peers.of(transport) == (os.geteuid(), os.getegid())  # type: ignore[arg-type]
        finally:
            ours.close()
            theirs.close()
        # Cached for the connection: no socket call again.
        assert peers.of(transport) == (os.geteuid(), os.getegid())  # type: ignore[arg-type]

    def test_a_tcp_peer_has_none(self) -> None:
        """A TCP connection has no peer identity, even on loopback."""
        with (
            socket.create_server(("127.0.0.1", 0)) as listener,
            socket.create_connection(listener.getsockname()),
        ):
            accepted, _ = listener.accept()
            with accepted:
                assert PeerCredentials().of(FakeTransport(accepted)) is None  # type: ignore[arg-type]
                assert PeerCredentials().of(None) is None


class TestPeerIdentityNeverOnTcp:
    @pytest.mark.parametrize("peer_identity", [False, True])
    async def test_a_mapped_uid_without_key_gets_401_over_tcp(
        self, aiohttp_client: ClientFactory, peer_identity: bool
    ) -> None:
        """Over TCP a caller without a key is 401 even when a client maps its uid."""
        auth = ClientAuthenticator({"me": ClientSpec("me", ("app1",), uids=(os.geteuid(),))})
        handler = build_api(
            ApiDependencies(
                fake_service(), auth, Metrics(), FakeClock(), peer_identity=peer_identity
            )
        )
        client: TestClient[Any, Any] = await aiohttp_client(
            RawTestServer(handler), server_kwargs=api_server_options()
        )
        response = await client.get("/v1/token/app1")
        assert response.status == 401
        assert (await response.json())["error"] == "unauthorized"


class TestErrorMessagesOnTheSocket:
    async def test_a_mapped_caller_gets_the_same_messages_as_over_tcp(
        self, sock_path: Path
    ) -> None:
        """Over the socket, unknown_app lists the uid's client's apps and 503 names the last error."""
        service = fake_service()
        service.errors["app1"] = TokenUnavailable("x", retry_after=2)
        service.last_errors["app1"] = "transient: token endpoint answered 503"
        auth = ClientAuthenticator({"me": ClientSpec("me", ("app1",), uids=(os.geteuid(),))})
        api = web.Server(
            build_api(ApiDependencies(service, auth, Metrics(), FakeClock(), peer_identity=True)),
            **api_server_options(),
        )
        runner = web.ServerRunner(api)
        await runner.setup()
        listener = bind_unix_socket(server(sock_path, 0o600))
        try:
            await web.SockSite(runner, listener.sock).start()
            connector = aiohttp.UnixConnector(path=str(sock_path))
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.get("http://localhost/v1/token/twillio") as response:
                    assert response.status == 404
                    assert await response.json() == {
                        "error": "unknown_app",
                        "message": "no app named 'twillio' is configured; this client may use: app1",
                    }
                async with session.get("http://localhost/v1/token/app1") as response:
                    assert response.status == 503
                    message = (await response.json())["message"]
        finally:
            await runner.cleanup()
            listener.sock.close()
        assert "last error: transient: token endpoint answered 503" in message
        assert "retry in 2 s" in message


class TestIdentifyPeer:
    def test_uid_before_gid(self) -> None:
        """A uid mapping wins over a gid mapping; an unmapped pair is nobody."""
        auth = ClientAuthenticator(
            {
                "by-uid": ClientSpec("by-uid", ("a",), uids=(1001,)),
                "by-gid": ClientSpec("by-gid", ("a",), gids=(2000,)),
            }
        )
        assert auth.identify_peer(1001, 2000) == "by-uid"
        assert auth.identify_peer(1002, 2000) == "by-gid"
        assert auth.identify_peer(1002, 2001) is None

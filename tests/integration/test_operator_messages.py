"""What an operator sees from a real `serve`: a taken port, an unreachable Redis, a failing token
endpoint, a malformed request, a terminal. Each message names the setting or the reason."""

from __future__ import annotations

import asyncio
import os
import pty
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker_process import REPO_ROOT, BrokerFiles, BrokerProcess
from tests.support.config import edit_config
from tests.support.oauth_server import OAuthTestServer, Scripted
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

REDIS_PASSWORD = "redis-password-" + "p" * 20


@pytest.fixture
def files(tmp_path: Path, oauth_server: OAuthTestServer) -> BrokerFiles:
    return BrokerFiles(directory=tmp_path / "b", token_url=oauth_server.token_url)


@pytest.fixture
def held_port() -> Iterator[int]:
    """A reserved port that another socket listens on for the test."""
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        yield port


def events(broker: BrokerProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in broker.log_lines() if line["event"] == name]


async def until_logged(broker: BrokerProcess, name: str, timeout: float = 30.0) -> dict[str, Any]:
    """The first log line with event `name`; fails with the output when none comes in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = events(broker, name)
        if found:
            return found[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {name} within {timeout}s:\n{broker.output()[-3000:]}")


class TestTakenPort:
    @pytest.mark.parametrize("setting", ["server.listen", "server.metrics_listen"])
    async def test_names_the_setting_and_does_not_pretend_to_stop(
        self, files: BrokerFiles, tmp_path: Path, held_port: int, setting: str
    ) -> None:
        """A taken port: exit 1, broker.failed names the setting; no draining/stopped lines."""
        if setting == "server.listen":
            files.api_port = held_port
        else:
            files.metrics_port = held_port
        broker = BrokerProcess(files.write(), tmp_path / "broker.log")
        broker.start()
        code = await asyncio.to_thread(broker.wait_stopped, 60)
        assert code == 1
        [failed] = events(broker, "broker.failed")
        assert failed["level"] == "error"
        assert failed["setting"] == setting
        assert failed["address"] == f"127.0.0.1:{held_port}"
        assert "in use" in failed["error"]
        names = [line["event"] for line in broker.log_lines()]
        assert "broker.draining" not in names
        assert "broker.stopped" not in names
        assert "broker.started" not in names


class TestUnreachableRedis:
    async def test_store_unavailable_names_host_port_and_reason_not_the_password(
        self, files: BrokerFiles, tmp_path: Path
    ) -> None:
        """Nothing on the Redis port: store.unavailable says where and why, never the password."""
        port = free_port()  # reserved, and nothing listens on it
        files.store_url = f"redis://127.0.0.1:{port}/0"
        config = files.write()
        (files.directory / "redis.password").write_text(REDIS_PASSWORD + "\n")
        edit_config(
            config, lambda document: document["store"].update(password_file="redis.password")
        )
        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            line = await until_logged(broker, "store.unavailable")
        finally:
            await broker.terminate_async()
        assert line["level"] == "warning"
        assert f"127.0.0.1:{port}" in line["error"]
        assert "ConnectionError" in line["error"]
        assert "Connect call failed" in line["error"] or "refused" in line["error"].lower()
        assert REDIS_PASSWORD not in broker.output()


class TestFailingTokenEndpoint:
    @pytest.mark.parametrize(
        ("answer", "level", "kind"),
        [
            (Scripted(status=401, body=b'{"error": "invalid_client"}'), "error", "permanent"),
            (Scripted(status=503, body=b"{}"), "warning", "transient"),
        ],
        ids=["invalid_client", "503"],
    )
    async def test_level_and_the_token_command_say_why(
        self,
        files: BrokerFiles,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        answer: Scripted,
        level: str,
        kind: str,
    ) -> None:
        """A permanent failure is logged as an error, a transient one as a warning; `token`
        prints the 503 with the app's last error and where to look, exit 1."""
        oauth_server.mode = answer
        broker = BrokerProcess(files.write(), tmp_path / "broker.log")
        broker.start()
        try:
            failed = await until_logged(broker, "token.refresh_failed")
            result = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "broker",
                    "token",
                    "app1",
                    "--url",
                    files.api,
                    "--key-file",
                    str(files.directory / "client.key"),
                ],
                capture_output=True,
                text=True,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                timeout=60,
                check=False,
            )
        finally:
            await broker.terminate_async()
        assert failed["level"] == level
        assert failed["audit"] is True
        assert result.returncode == 1
        assert "HTTP 503 token_unavailable" in result.stderr
        assert f"last error: {kind}:" in result.stderr
        assert "GET /v1/apps" in result.stderr
        assert "token.refresh_failed" in result.stderr
        assert "(retry after " in result.stderr
        assert files.client_key not in result.stderr


class TestMalformedRequests:
    async def test_garbage_is_one_info_line_without_a_traceback(
        self, files: BrokerFiles, tmp_path: Path
    ) -> None:
        """Twenty malformed requests from a local caller: one info line, no error, no traceback."""
        broker = BrokerProcess(files.write(), tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics, timeout=60)
            for _ in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", files.api_port)
                writer.write(
                    b"GET /v1/apps HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n"
                )
                await writer.drain()
                assert (await reader.read(64)).startswith(b"HTTP/1.0 400")
                writer.close()
                await writer.wait_closed()
            await until_logged(broker, "http.malformed_request")
        finally:
            await broker.terminate_async()
        lines = broker.log_lines()  # fails on any non-JSON line, e.g. a bare traceback
        malformed = [line for line in lines if line["event"] == "http.malformed_request"]
        assert len(malformed) == 1
        assert malformed[0]["level"] == "info"
        assert malformed[0]["reason"] == "BadHttpMessage"
        assert not [line for line in lines if line["level"] == "error"]
        assert "Traceback" not in broker.output()


def read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    """Read a pty until `marker` shows up (or the time is up)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        # poll/epoll, not select(): a long run may hold descriptors numbered above 1024.
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            ready = selector.select(0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


class TestTerminal:
    @pytest.mark.parametrize("no_color", [False, True], ids=["colors", "NO_COLOR"])
    def test_serve_on_a_terminal_is_readable(self, tmp_path: Path, no_color: bool) -> None:
        """`serve` writing to a terminal logs the console view, in colors unless NO_COLOR."""
        # No token server is needed to see how the lines look: nothing listens on port 9.
        config = BrokerFiles(directory=tmp_path, token_url="http://127.0.0.1:9/token").write()
        controller, terminal = pty.openpty()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        env.pop("NO_COLOR", None)
        if no_color:
            env["NO_COLOR"] = "1"
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(config)],
            stdout=terminal,
            stderr=terminal,
            cwd=REPO_ROOT,
            env=env,
        )
        os.close(terminal)
        try:
            seen = read_until(controller, b"broker.started", timeout=60)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)
                os.close(controller)
        text = seen.decode(errors="replace")
        assert "broker.started" in text, text
        assert '{"' not in text  # not JSON
        assert ("\x1b[" in text) is not no_color

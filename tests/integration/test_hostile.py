"""Hostile local callers and API fuzzing (schemathesis against the broker's own OpenAPI)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from broker.app import Broker
from tests.support.broker_process import BrokerFiles, BrokerProcess, running_broker
from tests.support.oauth_server import OAuthTestServer

pytestmark = pytest.mark.integration


@pytest.fixture
def files(tmp_path: Path, oauth_server: OAuthTestServer) -> BrokerFiles:
    return BrokerFiles(directory=tmp_path / "broker", token_url=oauth_server.token_url)


@pytest.fixture
async def broker(files: BrokerFiles) -> AsyncIterator[Broker]:
    async with running_broker(files.write()) as running:
        yield running


async def raw(port: int, payload: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes to the API and read until the server closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


async def get(
    files: BrokerFiles, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{files.api}{path}", headers=headers or files.auth) as r:
            return r.status, await r.text()


class TestFuzzing:
    async def test_schemathesis_finds_no_failure(
        self, broker: Broker, files: BrokerFiles, tmp_path: Path
    ) -> None:
        """Every response to generated requests matches the OpenAPI description; no 500."""
        st = shutil.which("st") or str(Path(sys.executable).parent / "st")
        config = tmp_path / "schemathesis.toml"
        config.write_text('[parameters]\n"path.app" = "app1"\n')
        process = await asyncio.create_subprocess_exec(
            st,
            "--config-file",
            str(config),
            "run",
            f"{files.api}/openapi.json",
            "-H",
            f"Authorization: Bearer {files.client_key}",
            "--max-examples",
            "60",
            "--seed",
            "20261122",
            "--checks",
            "all",
            # The contract answers a schema-valid min_ttl above the token lifetime with 400:
            # a rule the schema cannot express.
            "--exclude-checks",
            "positive_data_acceptance",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,  # schemathesis keeps a cache in its working directory
        )
        out, _ = await asyncio.wait_for(process.communicate(), 300)
        text = out.decode(errors="replace")
        assert process.returncode == 0, text[-4000:]
        assert "passed" in text
        assert files.client_key not in text


class TestHostileCallers:
    async def test_oversized_headers_and_bodies_are_refused(
        self, broker: Broker, files: BrokerFiles
    ) -> None:
        """A 20 KB header and a 100 KB body are refused; the broker keeps serving."""
        status, _ = await get(files, "/v1/token/app1", {"Authorization": "Bearer " + "x" * 20000})
        assert status in (400, 431)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{files.api}/v1/token/app1/refresh", headers=files.auth, data=b"x" * 100_000
            ) as r:
                assert r.status in (413, 200)
        assert (await get(files, "/v1/token/app1"))[0] == 200

    async def test_slow_and_idle_connections_do_not_starve_callers(
        self, broker: Broker, files: BrokerFiles
    ) -> None:
        """300 connections that never finish their headers: a real caller is still served at once."""
        port = int(files.api.rsplit(":", 1)[1])
        writers = []
        for _ in range(300):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v1/token/app1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            writers.append(writer)
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, _ = await get(files, "/v1/token/app1")
        elapsed = loop.time() - started
        for writer in writers:
            writer.close()
        assert status == 200
        assert elapsed < 1.0

    @pytest.mark.parametrize(
        "path",
        [
            "/v1/token/..%2f",
            "/v1/token/app1%2f..%2f..%2fapps",
            "/v1/token/%2e%2e/v1/apps",
            "//v1/token/app1",
            "/v1/token/app1/",
            "/v1/token/APP1",
            "/v1/token/app1%00",
            "/v1/token/" + "a" * 5000,
        ],
    )
    async def test_path_tricks_never_yield_a_token_or_a_500(
        self, broker: Broker, files: BrokerFiles, path: str
    ) -> None:
        """Encoded traversal, case and length tricks get a JSON 4xx, never a token."""
        port = int(files.api.rsplit(":", 1)[1])
        response = await raw(
            port,
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {files.client_key}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        status = int(response.split(b" ", 2)[1])
        assert 400 <= status < 500, response[:300]
        assert b"access_token" not in response

    @pytest.mark.parametrize(
        ("headers", "status"),
        [
            ({"Host": "evil.example"}, 403),
            ({"Host": "localhost.evil.example"}, 403),
            ({"Host": "127.0.0.1.nip.io"}, 403),
            ({"Host": "0.0.0.0"}, 403),
            ({"Host": "[::1]:8411"}, 200),
            ({"Host": "127.0.0.2"}, 200),
            ({"Host": "LOCALHOST:8411"}, 200),
            ({"Forwarded": "for=10.0.0.1"}, 403),
            ({"forwarded": "for=10.0.0.1"}, 403),
            ({"X-Forwarded-For": "10.0.0.1"}, 403),
        ],
    )
    async def test_host_and_forwarded_variants(
        self, broker: Broker, files: BrokerFiles, headers: dict[str, str], status: int
    ) -> None:
        """Only loopback Host names pass; any Forwarded or X-Forwarded-For is refused."""
        got, body = await get(files, "/v1/token/app1", {**files.auth, **headers})
        assert got == status, body
        if status == 403:
            assert '"bad_host"' in body

    async def test_http_1_0_without_host_and_pipelining(
        self, broker: Broker, files: BrokerFiles
    ) -> None:
        """HTTP/1.0 without Host is served; two pipelined requests get two answers in order."""
        port = int(files.api.rsplit(":", 1)[1])
        auth = f"Authorization: Bearer {files.client_key}\r\n"
        one = await raw(port, f"GET /v1/token/app1 HTTP/1.0\r\n{auth}\r\n".encode())
        assert one.startswith(b"HTTP/1.0 200") or one.startswith(b"HTTP/1.1 200"), one[:200]
        pipelined = (
            f"GET /v1/apps HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n"
            f"GET /v1/token/nope HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
        ).encode()
        both = await raw(port, pipelined)
        assert both.count(b"HTTP/1.1 ") == 2
        assert both.index(b" 200 ") < both.index(b" 404 ")

    async def test_many_wrong_keys_are_refused_and_logged_once(
        self, files: BrokerFiles, oauth_server: OAuthTestServer, tmp_path: Path
    ) -> None:
        """2,000 requests with wrong keys: all 401, one client.denied line, no key in the logs."""
        broker = BrokerProcess(files.write(), tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            async with aiohttp.ClientSession() as session:

                async def attempt(i: int) -> int:
                    key = f"wrong-key-{i:06d}-" + "z" * 30
                    async with session.get(
                        f"{files.api}/v1/token/app1", headers={"Authorization": f"Bearer {key}"}
                    ) as r:
                        return r.status

                statuses = await asyncio.gather(*(attempt(i) for i in range(2000)))
        finally:
            await broker.terminate_async()
        assert set(statuses) == {401}
        denied = [e for e in broker.log_lines() if e["event"] == "client.denied"]
        assert len(denied) == 1
        assert "wrong-key-" not in broker.output()

"""Token files (sinks) written by a real broker process, read by a real reader, against a real
OAuth server (and a real Redis for the fleet case)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.broker_process import BrokerFiles, BrokerProcess
from tests.support.config import Document, edit_config
from tests.support.oauth_server import OAuthTestServer
from tests.support.peers import IS_ROOT, SELF, Identity, read_file, shared_directory
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

API_KEYS = {"access_token", "token_type", "expires_at", "expires_in", "scope"}
# Short tokens, refreshed at a quarter of their life, served until a tenth is left.
FAST_REFRESH = {"at_fraction": 0.25, "min_remaining": 0, "jitter": 0, "safety_margin": 0.2}
# As root, the broker runs without the capabilities that let root write anywhere.
NO_DAC_OVERRIDE = (
    ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--") if IS_ROOT else ()
)


@dataclass
class Seen:
    """One stretch of identical content a reader saw: from, until (wall time), the bytes."""

    first: float
    last: float
    content: bytes


@dataclass
class Reader:
    """Reads files in a loop on a thread, keeping every change of content it sees."""

    paths: list[Path]
    reads: int = 0
    seen: dict[Path, list[Seen]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.seen = {path: [] for path in self.paths}
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for path in self.paths:
                # Taken before the read: the content was in the file at this time or later, so
                # a token whose expiry is before it was held past its expiry (no false alarm if
                # the thread is descheduled after the read).
                now = time.time()
                content = path.read_bytes()
                self.reads += 1
                history = self.seen[path]
                if history and history[-1].content == content:
                    history[-1].last = now
                else:
                    history.append(Seen(now, now, content))
            time.sleep(0.001)


@pytest.fixture
def running() -> Iterator[list[BrokerProcess]]:
    """Broker processes a test starts; all terminated (or killed) at the end."""
    processes: list[BrokerProcess] = []
    try:
        yield processes
    finally:
        for process in processes:
            try:
                process.terminate()
            finally:
                process.kill()


async def start_broker(
    files: BrokerFiles, running: list[BrokerProcess], wrapper: tuple[str, ...] = ()
) -> BrokerProcess:
    process = BrokerProcess(files.write(), files.directory / "broker.log", wrapper=wrapper)
    running.append(process)
    process.start()
    await process.wait_ready(files.metrics)
    return process


async def api_token(files: BrokerFiles) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{files.api}/v1/token/app1", headers=files.auth) as response,
    ):
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def api_status(files: BrokerFiles) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{files.api}/v1/token/app1", headers=files.auth) as response,
    ):
        return response.status


async def sink_writes(files: BrokerFiles, outcome: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{files.metrics}/metrics") as r:
        text = await r.text()
    prefix = f'token_broker_sink_writes_total{{app="app1",outcome="{outcome}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def token_in(fmt: str, content: bytes) -> str | None:
    """The access token a file of format `fmt` holds (None: empty); fails on anything else."""
    if content == b"":
        return None
    text = content.decode()
    if fmt == "raw":
        return text
    if fmt == "header":
        assert text.startswith("Authorization: Bearer "), text[:30]
        return text.removeprefix("Authorization: Bearer ")
    body = json.loads(text)
    assert set(body) == API_KEYS
    token: str = body["access_token"]
    return token


def events(process: BrokerProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in process.log_lines() if e.get("event") == name]


class TestFollowsTheToken:
    async def test_changes_exactly_when_the_token_changes_and_is_never_partial(
        self, tmp_path: Path, oauth_server: OAuthTestServer, running: list[BrokerProcess]
    ) -> None:
        """Over 50 refreshes each file is rewritten once per token; a reader sees whole files."""
        oauth_server.lifetime = 2.0
        out = tmp_path / "tokens"
        out.mkdir()
        formats = {out / "raw": "raw", out / "json": "json", out / "header": "header"}
        files = BrokerFiles(
            directory=tmp_path / "broker",
            token_url=oauth_server.token_url,
            app_overrides={
                "refresh": FAST_REFRESH,
                "sinks": [{"path": str(p), "format": f} for p, f in formats.items()],
            },
        )
        process = await start_broker(files, running)
        await wait_for(lambda: all(p.exists() for p in formats), 10, "the files")
        reader = Reader(list(formats))
        reader.start()
        try:
            await wait_for(lambda: oauth_server.successes() >= 51, 120, "50 refreshes")
        finally:
            reader.stop()
        await process.terminate_async()

        refreshed = [e["token_fingerprint"] for e in events(process, "token.refreshed")]
        assert len(refreshed) >= 51
        for path in formats:
            written = [
                e["token_fingerprint"]
                for e in events(process, "sink.written")
                if e["path"] == str(path)
            ]
            # One write per token, in order (the last may have come as the broker stopped).
            assert written in (refreshed, refreshed[:-1]), path
        assert reader.reads > 1000
        for path, fmt in formats.items():
            tokens = [token_in(fmt, s.content) for s in reader.seen[path]]
            for stretch, token in zip(reader.seen[path], tokens, strict=True):
                if token is not None:
                    assert token in oauth_server.expiry, "a partial or unknown token"
                    assert stretch.last < oauth_server.expiry[token], "an expired token"
            assert len({t for t in tokens if t}) >= 40, "the reader saw the tokens change"
        output = process.output()
        for token in oauth_server.issued_tokens:
            assert token not in output

    async def test_emptied_when_the_token_can_no_longer_be_served(
        self, tmp_path: Path, oauth_server: OAuthTestServer, running: list[BrokerProcess]
    ) -> None:
        """With the OAuth server gone, the file is emptied once the token is past serving."""
        oauth_server.lifetime = 3.0
        path = tmp_path / "token"
        files = BrokerFiles(
            directory=tmp_path / "broker",
            token_url=oauth_server.token_url,
            app_overrides={"refresh": {"safety_margin": 0.3}, "sinks": [{"path": str(path)}]},
        )
        await start_broker(files, running)
        await wait_for(lambda: path.exists() and path.read_bytes() != b"", 10, "a token")
        reader = Reader([path])
        reader.start()
        try:
            await oauth_server.stop()
            await wait_for(lambda: path.read_bytes() == b"", 20, "the file to be emptied")
            assert await api_status(files) == 503
            await asyncio.sleep(1.0)
        finally:
            reader.stop()
        assert path.read_bytes() == b""
        history = reader.seen[path]
        assert history[-1].content == b""
        for stretch in history[:-1]:
            token = stretch.content.decode()
            assert stretch.last < oauth_server.expiry[token], "an expired token was readable"
        assert await sink_writes(files, "truncated") >= 1


class TestFileSettings:
    async def test_mode_owner_and_format_are_as_configured(
        self, tmp_path: Path, oauth_server: OAuthTestServer, running: list[BrokerProcess]
    ) -> None:
        """Each file has its mode, owner and group; its content is the token in its format."""
        owner, group = (61001, 61000) if IS_ROOT else (os.getuid(), os.getgid())
        with shared_directory() as out:
            sinks = [
                {"path": str(out / "raw"), "mode": "0640", "owner": owner, "group": group},
                {"path": str(out / "json"), "format": "json"},
                {"path": str(out / "header"), "format": "header", "mode": "0644"},
            ]
            files = BrokerFiles(
                directory=tmp_path / "broker",
                token_url=oauth_server.token_url,
                app_overrides={"sinks": sinks},
            )
            await start_broker(files, running)
            # The files exist (empty) from start-up; the token is written once it is fetched.
            names = ("raw", "json", "header")
            await wait_for(
                lambda: all((out / n).exists() and (out / n).stat().st_size for n in names),
                10,
                "the token in every file",
            )
            answer = await api_token(files)
            token = answer["access_token"]

            modes = {name: os.stat(out / name) for name in ("raw", "json", "header")}
            assert {n: stat.S_IMODE(s.st_mode) for n, s in modes.items()} == {
                "raw": 0o640,
                "json": 0o600,
                "header": 0o644,
            }
            assert (modes["raw"].st_uid, modes["raw"].st_gid) == (owner, group)
            assert (modes["json"].st_uid, modes["json"].st_gid) == (os.getuid(), os.getgid())
            assert (out / "raw").read_text() == token
            assert (out / "header").read_text() == f"Authorization: Bearer {token}"
            body = json.loads((out / "json").read_text())
            assert set(body) == API_KEYS
            assert {k: body[k] for k in ("access_token", "token_type", "expires_at", "scope")} == {
                k: answer[k] for k in ("access_token", "token_type", "expires_at", "scope")
            }

            # What other users may read follows from those modes.
            member, outsider = (
                (Identity(61002, 61000), Identity(61004, 61004)) if IS_ROOT else (SELF, SELF)
            )
            assert read_file(member, out / "raw") == {"content": token}
            assert read_file(outsider, out / "header")["content"].endswith(token)
            if IS_ROOT:
                assert read_file(outsider, out / "raw") == {"read_error": "PermissionError"}
                assert read_file(member, out / "json") == {"read_error": "PermissionError"}
            else:
                assert read_file(outsider, out / "json")["content"] == (out / "json").read_text()

    async def test_an_unwritable_directory_is_an_error_naming_the_path(
        self, tmp_path: Path, oauth_server: OAuthTestServer, running: list[BrokerProcess]
    ) -> None:
        """A sink in a directory the broker cannot write: an error naming it; the API serves."""
        oauth_server.lifetime = 3.0
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        good, bad = tmp_path / "good-token", locked / "token"
        files = BrokerFiles(
            directory=tmp_path / "broker",
            token_url=oauth_server.token_url,
            app_overrides={"sinks": [{"path": str(bad)}, {"path": str(good)}]},
        )
        process = await start_broker(files, running, wrapper=NO_DAC_OVERRIDE)
        await wait_for(lambda: good.exists() and good.read_bytes() != b"", 10, "the good file")

        answer = await api_token(files)
        oauth_server.verify_access_token(answer["access_token"])
        assert good.read_text() == answer["access_token"]
        assert not bad.exists()
        failures = events(process, "sink.write_failed")
        assert failures[0]["path"] == str(bad)
        assert failures[0]["error"] == "Permission denied"
        assert failures[0]["level"] == "error"
        assert await sink_writes(files, "error") >= 1
        for token in oauth_server.issued_tokens:
            assert token not in process.output()

        locked.chmod(0o700)  # fixed: the next attempt (backoff, or the next token) succeeds
        await wait_for(lambda: bad.exists() and bad.read_bytes() != b"", 20, "the retry")


class TestReload:
    async def test_sighup_moves_a_sink_and_a_removed_app_leaves_an_empty_file(
        self, tmp_path: Path, oauth_server: OAuthTestServer, running: list[BrokerProcess]
    ) -> None:
        """After SIGHUP the token goes to the new path; dropped paths and removed apps are emptied."""
        oauth_server.lifetime = 30.0
        old, new, other = tmp_path / "old", tmp_path / "new", tmp_path / "other"
        app = {"client_id": "test-client", "client_secret_file": "client_secret"}
        files = BrokerFiles(
            directory=tmp_path / "broker",
            token_url=oauth_server.token_url,
            apps={
                "app1": {"token_url": oauth_server.token_url, **app, "sinks": [{"path": str(old)}]},
                "app2": {
                    "token_url": oauth_server.token_url,
                    **app,
                    "sinks": [{"path": str(other)}],
                },
            },
        )
        process = await start_broker(files, running)
        await wait_for(lambda: old.exists() and old.read_bytes() != b"", 10, "app1's file")
        await wait_for(lambda: other.exists() and other.read_bytes() != b"", 10, "app2's file")
        token = old.read_text()

        def app1_alone(data: Document) -> None:
            data["apps"]["app1"]["sinks"] = [{"path": str(new)}]
            del data["apps"]["app2"]
            data["clients"]["svc"]["apps"] = ["app1"]

        edit_config(files.directory / "config.yaml", app1_alone)
        assert process.process is not None
        process.process.send_signal(signal.SIGHUP)

        await wait_for(lambda: new.exists() and new.read_bytes() != b"", 10, "the new file")
        await wait_for(lambda: old.read_bytes() == b"" and other.read_bytes() == b"", 10, "emptied")
        assert new.read_text() == token  # app1's sinks changed, not its credentials


class TestFleet:
    async def test_every_replica_writes_its_own_file_from_the_shared_store(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        redis_server: RedisServer,
        running: list[BrokerProcess],
    ) -> None:
        """Two replicas sharing Redis: both files hold the fleet's token, fetched once."""
        oauth_server.lifetime = 3.0
        started = time.monotonic()
        replicas = []
        for name in ("a", "b"):
            sink = tmp_path / f"token-{name}"
            files = BrokerFiles(
                directory=tmp_path / name,
                token_url=oauth_server.token_url,
                store_url=redis_server.url,
                app_overrides={"sinks": [{"path": str(sink)}]},
            )
            replicas.append((files, sink, await start_broker(files, running)))
        await asyncio.sleep(7.0)  # a few refreshes

        def same_token() -> bool:
            contents = {sink.read_bytes() for _, sink, _ in replicas}
            return len(contents) == 1 and b"" not in contents

        await wait_for(same_token, 10, "both files to hold the same token")
        token = replicas[0][1].read_text()
        assert token in oauth_server.expiry
        for _, _, process in replicas:
            assert len(events(process, "sink.written")) >= 2
        # Sharing through the store still works: one request per refresh (at 0.75 of the
        # lifetime, minus jitter: at least 2.1 s apart) for the fleet, not one per replica.
        assert oauth_server.count() <= (time.monotonic() - started) / 2.1 + 2

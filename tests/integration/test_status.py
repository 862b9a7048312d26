"""`token-broker status` against a real Redis while a real broker refreshes, backs off, or lost
an answer: each shows the right row, read from a read-only replica (or through an ACL user that
may only read), valid against the schema in docs/contract.md, with no secret in its output.

The broker is `python -m broker serve`, the status command `python -m broker status`, both
real processes; the test OAuth server runs in this event loop, so the command runs in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema_rs
import pytest
import redis

from broker.clock import SystemClock
from broker.config import load_config
from broker.metrics import Metrics
from broker.model import TokenSet
from broker.status import STATUS_SCHEMA
from broker.status_command import store_name
from broker.store.crypto import Keyring
from broker.store.redis_store import RedisStore, redis_client
from tests.support.authorization import ac_app, authorize_via_code
from tests.support.broker_process import REPO_ROOT, BrokerFiles, BrokerProcess
from tests.support.oauth_server import OAuthTestServer, Scripted
from tests.support.redis_server import RedisServer
from tests.support.store_keys import bound_key

pytestmark = pytest.mark.integration

STATUS_ON = {"status_endpoint": True}
# Generous: the machine may be at load 6; a status command takes about a second.
WITHIN = 30.0
VALIDATOR = jsonschema_rs.Draft7Validator(STATUS_SCHEMA)


@pytest.fixture
def replica(redis_server: RedisServer, tmp_path: Path) -> Iterator[RedisServer]:
    """A read-only replica of `redis_server` (`replicaof`), in sync before the test starts."""
    primary = redis.Redis(port=redis_server.port)
    primary.config_set("repl-diskless-sync-delay", 0)  # sync now, not in 5 s
    primary.close()
    server = RedisServer(
        directory=tmp_path / "replica",
        extra_args=("--replicaof", "127.0.0.1", str(redis_server.port)),
    )
    server.start()
    try:
        client = redis.Redis(port=server.port)
        deadline = time.monotonic() + WITHIN
        while client.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
        client.close()
        yield server
    finally:
        server.stop()


def run_status(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m broker status --config CONFIG ARGS` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "broker", "status", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )


async def status_until(
    config: Path, store_url: str, check: Callable[[dict[str, Any]], bool]
) -> tuple[dict[str, Any], str]:
    """Run `status --json` until app1's row passes `check` (the replica may lag a moment);
    the document and everything the command printed (also the table and `--app` forms)."""
    deadline = time.monotonic() + WITHIN
    while True:
        done = await asyncio.to_thread(run_status, config, "--json", "--store-url", store_url)
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        VALIDATOR.validate(document)
        (row,) = document["apps"]
        if check(row):
            break
        assert time.monotonic() < deadline, f"status never showed the row: {row}"
        await asyncio.sleep(0.2)
    table = await asyncio.to_thread(run_status, config, "--store-url", store_url)
    detail = await asyncio.to_thread(run_status, config, "--app", "app1", "--store-url", store_url)
    assert table.returncode == 0 and detail.returncode == 0, table.stderr + detail.stderr
    printed = done.stdout + done.stderr + table.stdout + table.stderr + detail.stdout
    return document, printed + detail.stderr


def secrets_of(oauth: OAuthTestServer, files: BrokerFiles, client: redis.Redis) -> set[str]:
    """Every value status must never print: tokens, secrets, keys and the stored fingerprints."""
    values = {files.client_secret, files.client_key, *oauth.issued_tokens}
    for grant in oauth.grants.values():
        values |= {grant.current_refresh, *grant.spent}
    values.add((files.directory / "store.key").read_text().split()[1])
    for key in client.keys("tb-test:*"):
        if client.type(key) == b"hash":
            for field in (b"fp", b"rfp"):
                value = client.hget(key, field)
                if isinstance(value, bytes) and value:
                    values.add(value.decode())
    return {v for v in values if v}


def assert_no_secret(printed: str, secrets: set[str]) -> None:
    """None of `secrets` appears in `printed` (named by position only, never by value)."""
    leaked = [i for i, value in enumerate(sorted(secrets)) if value in printed]
    assert leaked == [], f"{len(leaked)} secret value(s) printed by status"


async def wait_for(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Poll `check` until true, at most WITHIN seconds."""
    deadline = time.monotonic() + WITHIN
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def replica_status(files: BrokerFiles) -> dict[str, Any]:
    """The broker's own GET /v1/status."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{files.metrics}/v1/status") as response:
            assert response.status == 200, await response.text()
            document: dict[str, Any] = await response.json()
    VALIDATOR.validate(document)
    return document


def owner_prefix(process: BrokerProcess) -> str:
    """How the broker's lease owner id starts: host name and pid (then a random suffix)."""
    return f"{socket.gethostname()}-{process.pid}-"


async def onboarded(
    tmp_path: Path, oauth: OAuthTestServer, store_url: str, **refresh: Any
) -> BrokerFiles:
    """app1 as an authorization-code app, authorized once through `token-broker authorize`."""
    app = ac_app(oauth, **refresh)
    seed = BrokerFiles(tmp_path / "seed", oauth.token_url, store_url, apps={"app1": app})
    await authorize_via_code(seed.write(), oauth)
    files = BrokerFiles(
        tmp_path / "broker",
        oauth.token_url,
        store_url,
        apps={"app1": app},
        server_overrides=STATUS_ON,
    )
    files.write()
    return files


class TestStatusRows:
    async def test_during_a_refresh_read_from_a_replica(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        redis_server: RedisServer,
        replica: RedisServer,
    ) -> None:
        """While the refresh is on the wire, the row says refreshing: the broker holds the
        lease, its spend is `sent`, the stored rank is the one being spent. (20 s tokens,
        refreshed at 6 s: the authorize command, the broker's start and the status command are
        three Python processes, which took more than 8 s together on a loaded machine.)"""
        oauth_server.lifetime = 20.0
        files = await onboarded(
            tmp_path, oauth_server, redis_server.url, at_fraction=0.3, read_timeout=60
        )
        sent = oauth_server.expect_request("refresh_token")
        oauth_server.delays = [12.0]  # the answer to the first refresh comes 12 s late
        process = BrokerProcess(files.directory / "config.yaml", tmp_path / "broker.log")
        process.start()
        try:
            await process.wait_ready(files.metrics)
            await asyncio.wait_for(sent, WITHIN)
            document, printed = await status_until(
                files.directory / "config.yaml",
                replica.url,
                lambda row: row["spend"] is not None and row["spend"]["state"] == "sent",
            )
            (row,) = document["apps"]
            assert row["state"] == "refreshing"
            assert row["lease"]["holder"].startswith(owner_prefix(process))
            assert row["spend"]["owner"] == row["lease"]["holder"]
            assert row["spend"]["fence"] == row["lease"]["fence"] == row["fence"]
            assert (row["spend"]["lineage"], row["spend"]["generation"]) == (
                row["token"]["lineage"],
                row["token"]["generation"],
            )
            assert row["token"]["readable"] and row["token"]["expires_in"] > 0
            assert row["replica"]["state"] == "refreshing"  # the broker's own view, asked
            assert "refreshing" in printed and row["lease"]["holder"] in printed
            own = await replica_status(files)
            assert own["source"] == "replica"
            assert own["apps"][0]["lease"]["holder"] == row["lease"]["holder"]
            client = redis.Redis(port=redis_server.port)
            assert_no_secret(printed + json.dumps(own), secrets_of(oauth_server, files, client))
            client.close()
        finally:
            process.signal_stop()
            await asyncio.to_thread(process.wait_stopped, 60.0)

    async def test_during_a_shared_backoff_read_by_a_read_only_acl_user(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """A 503 with Retry-After 120 puts the fleet in a shared backoff: the row shows it, with
        the error, the count and the budget left, read by a user Redis lets only read."""
        oauth_server.mode = Scripted(
            status=503,
            body=b'{"error": "temporarily_unavailable"}',
            headers={"Retry-After": "120"},
        )
        files = BrokerFiles(
            tmp_path / "broker",
            oauth_server.token_url,
            redis_server.url,
            app_overrides={"max_token_requests_per_minute": 5},
            server_overrides=STATUS_ON,
        )
        config = files.write()
        admin = redis.Redis(port=redis_server.port)
        # Read commands, the connection's own (AUTH, CLIENT SETNAME, PING) and TIME: no write,
        # no script, no admin command. Anything else the status command sent would fail it.
        admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "reader", "on", ">reader-pw-0123456789", "~*", "resetchannels",
            "-@all", "+@read", "+@connection", "+time",
        )  # fmt: skip
        process = BrokerProcess(config, tmp_path / "broker.log")
        process.start()
        try:
            await wait_for(
                lambda: bool(admin.keys("tb-test:*:failure")), "the shared failure record"
            )
            reader = f"redis://reader:reader-pw-0123456789@127.0.0.1:{redis_server.port}/0"
            document, printed = await status_until(
                config, reader, lambda row: row["failure"] is not None
            )
            (row,) = document["apps"]
            assert row["state"] == "backoff"
            assert row["failure"]["failures"] >= 1 and not row["failure"]["permanent"]
            assert "503" in row["failure"]["error"]
            assert 60 < row["failure"]["retry_in"] <= 120
            assert row["token"] is None and row["lease"] is None
            assert row["budget"]["limit_per_minute"] == 5
            assert row["budget"]["used"] == oauth_server.count() >= 1
            assert row["budget"]["left"] == 5 - row["budget"]["used"]
            assert row["replica"]["state"] == "failing" and not row["replica"]["ready"]
            assert "backoff" in printed and "503" in printed
            assert_no_secret(printed, secrets_of(oauth_server, files, admin))
            # The same user may not write: the ACL is what made this test a proof.
            denied = await asyncio.to_thread(
                subprocess.run,
                ["redis-cli", "-u", reader, "SET", "tb-test:probe", "1"],
                capture_output=True,
                text=True,
                check=False,
            )
            assert "NOPERM" in denied.stdout + denied.stderr
        finally:
            admin.close()
            process.signal_stop()
            await asyncio.to_thread(process.wait_stopped, 60.0)

    async def test_during_an_unknown_spend_read_from_a_replica(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        redis_server: RedisServer,
        replica: RedisServer,
    ) -> None:
        """A refresh whose answer never came within read_timeout leaves the spend `unknown`:
        the row says outcome_unknown, names the spender and how long ago it sent."""
        oauth_server.lifetime = 8.0
        files = await onboarded(
            tmp_path, oauth_server, redis_server.url, at_fraction=0.3, read_timeout=2
        )
        oauth_server.delays = [8.0]  # far past the broker's 2 s read timeout
        process = BrokerProcess(files.directory / "config.yaml", tmp_path / "broker.log")
        process.start()
        admin = redis.Redis(port=redis_server.port)
        try:
            await process.wait_ready(files.metrics)
            await wait_for(
                lambda: admin.hget(bound_key(admin, "spend"), "state") == b"unknown",
                "the spend to turn unknown",
            )
            document, printed = await status_until(
                files.directory / "config.yaml",
                replica.url,
                lambda row: row["state"] == "outcome_unknown",
            )
            (row,) = document["apps"]
            assert row["spend"]["state"] == "unknown"
            assert row["spend"]["owner"].startswith(owner_prefix(process))
            assert row["spend"]["age"] >= 2.0  # sent before the read timeout ran out
            assert (row["spend"]["lineage"], row["spend"]["generation"]) == (
                row["token"]["lineage"],
                row["token"]["generation"],
            )
            assert row["replica"]["state"] in ("failing", "needs_authorization")
            assert "grant at risk" in (row["replica"]["last_error"] or "")
            assert "outcome_unknown" in printed and "unknown by" in printed
            assert_no_secret(printed, secrets_of(oauth_server, files, admin))
        finally:
            admin.close()
            process.signal_stop()
            await asyncio.to_thread(process.wait_stopped, 60.0)


class TestWatch:
    def test_prints_again_until_interrupted(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """`--watch 0.5` prints a fresh table again and again; Ctrl-C ends it with exit 0."""
        config = BrokerFiles(tmp_path, "http://127.0.0.1:9/token", redis_server.url).write()
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "status", "--config", str(config), "--watch", "0.5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        try:
            assert process.stdout is not None
            headers = 0
            deadline = time.monotonic() + WITHIN
            while headers < 3:
                line = process.stdout.readline()
                assert line and time.monotonic() < deadline, "status --watch stopped printing"
                headers += line.startswith("APP ")
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=WITHIN) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


class TestWithoutTheKey:
    async def test_a_set_no_key_opens_shows_its_rank_only(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """Status with another store key: the set is `unreadable`, its rank (plain text in
        Redis) shown, its expiry not; a failure record no key opens is said to exist."""
        files = BrokerFiles(tmp_path, "http://127.0.0.1:9/token", redis_server.url)
        config = files.write()
        spec = load_config(config).apps["app1"]
        store = RedisStore(
            redis_client(redis_server.url),
            key_prefix="tb-test",
            keyring=Keyring.from_file(files.directory / "store.key"),
            metrics=Metrics(),
            clock=SystemClock(),
        )
        name = store_name(spec)
        try:
            now = await store.server_time()
            token = TokenSet(
                "access-" + "x" * 24, "Bearer", now, now + 600, None, None, lineage=9, generation=4
            )
            assert (await store.commit(name, token)).stored
            await store.record_failure(
                name, failures=1, not_before=now + 300, error="transient: e", permanent=False
            )
        finally:
            await store.close()
        other_key = base64.b64encode(b"O" * 32).decode()
        (files.directory / "store.key").write_text(f"k2 {other_key}\n")
        done = await asyncio.to_thread(run_status, config, "--json")
        assert done.returncode == 0, done.stderr
        (row,) = json.loads(done.stdout)["apps"]
        assert row["state"] == "unreadable"
        assert (row["token"]["lineage"], row["token"]["generation"]) == (9, 4)
        assert row["token"]["expires_at"] is None and not row["token"]["readable"]
        assert row["failure"] is None and row["failure_unreadable"]
        assert token.access_token not in done.stdout + done.stderr

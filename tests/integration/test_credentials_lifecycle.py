"""Secret rotation by the kubelet's symlink swap, the previous-secret fallback, SIGHUP reloads."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.broker_process import CLIENT_KEY, BrokerFiles, BrokerProcess
from tests.support.config import edit_config
from tests.support.mounted_secret import MountedSecret
from tests.support.oauth_server import OAuthTestServer

pytestmark = pytest.mark.integration

OLD = "old-secret-0123456789-abcdefghijkl"
NEW = "new-secret-0123456789-mnopqrstuvwx"


async def hammer(files: BrokerFiles, stop: asyncio.Event) -> list[int]:
    """GET the token in a loop until `stop`; returns every status."""
    statuses = []
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as r:
                statuses.append(r.status)
            await asyncio.sleep(0.01)
    return statuses


class TestSymlinkSwap:
    async def test_rotation_under_load_uses_the_new_secret_with_no_failed_request(
        self, tmp_path: Path, oauth_server: OAuthTestServer
    ) -> None:
        """The kubelet swaps the secret: no failed request, the next token request uses it."""
        oauth_server.lifetime = 3.0
        oauth_server.accepted_secrets = {OLD}
        secret = MountedSecret(tmp_path / "secret", {"client_secret": OLD})
        files = BrokerFiles(
            directory=tmp_path / "b",
            token_url=oauth_server.token_url,
            app_overrides={"client_secret_file": str(secret.root / "client_secret")},
        )
        broker = BrokerProcess(files.write(), tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            stop = asyncio.Event()
            load = asyncio.ensure_future(hammer(files, stop))
            await asyncio.sleep(1)
            oauth_server.accepted_secrets = {OLD, NEW}  # Twilio keeps the old one valid 24 h
            swapped_at = time.time()
            secret.swap({"client_secret": NEW})
            await asyncio.sleep(5)
            oauth_server.accepted_secrets = {NEW}
            await asyncio.sleep(3)
            stop.set()
            statuses = await load
        finally:
            await broker.terminate_async()
        assert statuses
        assert set(statuses) == {200}, "a request failed during the rotation"
        after = [r for r in oauth_server.requests if r.at > swapped_at]
        assert after, "no token request after the swap"
        assert all(r.form["client_secret"] == NEW for r in after)
        events = broker.log_lines()
        rotated = [e for e in events if e["event"] == "app.secret_rotated"]
        assert rotated
        assert rotated[0]["audit"] is True
        assert OLD not in broker.output()
        assert NEW not in broker.output()

    async def test_an_emptied_secret_file_keeps_the_last_good_value(
        self, tmp_path: Path, oauth_server: OAuthTestServer
    ) -> None:
        """A secret file that becomes empty is an error, counted and logged; the old value stays."""
        oauth_server.lifetime = 3.0
        files = BrokerFiles(directory=tmp_path / "b", token_url=oauth_server.token_url)
        broker = BrokerProcess(files.write(), tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            (files.directory / "client_secret").write_text("")
            await asyncio.sleep(5)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as r:
                    status = r.status
                async with session.get(f"{files.metrics}/metrics") as r:
                    metrics = await r.text()
        finally:
            await broker.terminate_async()
        assert status == 200
        assert 'token_broker_credential_reloads_total{app="app1",outcome="error"}' in metrics
        assert all(r.status == 200 for r in oauth_server.requests)
        assert any(e["event"] == "credentials.reload_failed" for e in broker.log_lines())


class TestPreviousSecret:
    async def test_previous_then_new(self, tmp_path: Path, oauth_server: OAuthTestServer) -> None:
        """The server accepts only the previous secret, then only the new one: both work."""
        oauth_server.lifetime = 3.0
        oauth_server.accepted_secrets = {OLD}
        files = BrokerFiles(
            directory=tmp_path / "b",
            token_url=oauth_server.token_url,
            client_secret=NEW,
            app_overrides={"client_secret_previous_file": "previous_secret"},
        )
        config = files.write()
        (files.directory / "previous_secret").write_text(OLD)
        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            await asyncio.sleep(3)
            oauth_server.accepted_secrets = {NEW}
            switched_at = time.time()
            await asyncio.sleep(4)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as r:
                    assert r.status == 200
                async with session.get(f"{files.metrics}/metrics") as r:
                    metrics = await r.text()
        finally:
            await broker.terminate_async()
        before = [r for r in oauth_server.requests if r.at < switched_at]
        after = [r for r in oauth_server.requests if r.at > switched_at]
        assert any(r.form["client_secret"] == OLD and r.status == 200 for r in before)
        assert after
        assert all(r.form["client_secret"] == NEW and r.status == 200 for r in after)
        used = [e for e in broker.log_lines() if e["event"] == "app.previous_secret_used"]
        assert used
        assert used[0]["secret"] == "previous"
        assert (
            'token_broker_credential_reloads_total{app="app1",outcome="previous_secret"}' in metrics
        )


class TestSighup:
    async def test_adding_and_removing_an_app(
        self, tmp_path: Path, oauth_server: OAuthTestServer
    ) -> None:
        """SIGHUP adds an app (served at once) and removes one (404), keeping app1's token."""
        oauth_server.lifetime = 30.0
        files = BrokerFiles(directory=tmp_path / "b", token_url=oauth_server.token_url)
        config = files.write()
        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as r:
                    app1_token = (await r.json())["access_token"]

                def add(data: dict[str, Any]) -> None:
                    data["apps"]["app2"] = dict(data["apps"]["app1"])
                    data["clients"]["svc"]["apps"] = ["app1", "app2"]

                edit_config(config, add)
                assert broker.process is not None
                broker.process.send_signal(signal.SIGHUP)
                await asyncio.sleep(1.5)
                async with session.get(f"{files.api}/v1/token/app2", headers=files.auth) as r:
                    assert r.status == 200
                async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as r:
                    assert (await r.json())["access_token"] == app1_token

                def remove(data: dict[str, Any]) -> None:
                    del data["apps"]["app1"]
                    data["clients"]["svc"]["apps"] = ["app2"]

                edit_config(config, remove)
                broker.process.send_signal(signal.SIGHUP)
                await asyncio.sleep(1.5)
                async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as r:
                    assert r.status == 404
                async with session.get(f"{files.metrics}/readyz") as r:
                    assert r.status == 200
        finally:
            await broker.terminate_async()
        events = [(e["event"], e.get("app")) for e in broker.log_lines() if e.get("audit")]
        assert ("app.added", "app2") in events
        assert ("app.removed", "app1") in events

    async def test_a_broken_config_is_refused_and_the_old_one_runs_on(
        self, tmp_path: Path, oauth_server: OAuthTestServer
    ) -> None:
        """SIGHUP with an invalid file: the reason is logged, the old config keeps serving."""
        files = BrokerFiles(directory=tmp_path / "b", token_url=oauth_server.token_url)
        config = files.write()
        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            edit_config(config, lambda data: data["apps"]["app1"].update({"jitter_typo": 1}))
            assert broker.process is not None
            broker.process.send_signal(signal.SIGHUP)
            await asyncio.sleep(1.5)
            assert broker.process.poll() is None
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as r:
                    assert r.status == 200
        finally:
            await broker.terminate_async()
        failed = [e for e in broker.log_lines() if e["event"] == "config.reload_failed"]
        assert failed
        assert failed[0]["setting"] == "apps.app1.jitter_typo"


class TestClientKeyRotation:
    async def test_old_and_new_client_keys_both_work_during_a_rotation(
        self, tmp_path: Path, oauth_server: OAuthTestServer
    ) -> None:
        """With key_file and key_previous_file configured, both keys are accepted."""
        files = BrokerFiles(directory=tmp_path / "b", token_url=oauth_server.token_url)
        config = files.write()
        new_key = "n" * 20 + "new-client-key-0123456789"
        (files.directory / "client.key").write_text(new_key)
        (files.directory / "client.key.previous").write_text(CLIENT_KEY)
        edit_config(
            config,
            lambda data: data["clients"]["svc"].update(
                {"key_previous_file": "client.key.previous"}
            ),
        )
        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            async with aiohttp.ClientSession() as session:
                for key in (new_key, CLIENT_KEY, "w" * 40):
                    async with session.get(
                        f"{files.api}/v1/token/app1", headers={"Authorization": f"Bearer {key}"}
                    ) as r:
                        assert r.status == (401 if key.startswith("w") else 200)
        finally:
            await broker.terminate_async()
        assert new_key not in broker.output()
        assert CLIENT_KEY not in broker.output()

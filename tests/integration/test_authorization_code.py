"""Authorization code onboarding and refresh-token rotation against a real OAuth server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from tests.support.authorization import (
    REDIRECT,
    Onboarding,
    ac_app,
    authorize_via_code,
    consent,
)
from tests.support.broker_process import (
    REPO_ROOT,
    BrokerFiles,
    BrokerProcess,
    wait_until_answering,
    wait_until_ready,
    wall_time,
)
from tests.support.fleet import Fleet, Poller
from tests.support.oauth_server import OAuthTestServer, Scripted
from tests.support.redis_server import RedisServer
from tests.support.store_keys import bound_key

pytestmark = pytest.mark.integration


def files_for(
    root: Path, oauth: OAuthTestServer, redis_server: RedisServer, **refresh: Any
) -> BrokerFiles:
    return BrokerFiles(
        directory=root,
        token_url=oauth.token_url,
        store_url=redis_server.url,
        apps={"app1": ac_app(oauth, **refresh)},
    )


def run_authorize(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "authorize", "app1", "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=60,
        check=False,
    )


async def get_token(files: BrokerFiles) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{files.api}/v1/token/app1", headers=files.auth) as response:
            return response.status, await response.json()


class TestAuthorizeCommand:
    async def test_the_full_dance_and_a_running_broker_picks_it_up(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        redis_server: RedisServer,
    ) -> None:
        """URL printed, consent given, redirect pasted, state checked, stored, served at once."""
        files = files_for(tmp_path / "b", oauth_server, redis_server)
        config = files.write()
        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            await wait_until_answering(f"{files.metrics}/readyz/app1", timeout=30)
            status, body = await get_token(files)
            assert status == 409
            assert body["error"] == "needs_authorization"
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{files.metrics}/readyz") as response:
                    assert response.status == 503
                    assert (await response.json())["apps"] == ["app1"]
                async with session.get(f"{files.metrics}/readyz/app1") as response:
                    assert response.status == 503
                    assert (await response.json())["state"] == "needs_authorization"

            onboarding = Onboarding(config)
            url = onboarding.authorize_url()
            assert "state=" in url
            assert "code_challenge_method=S256" in url
            assert "scope=scim+offline_access" in url
            redirected = await consent(url)
            code, out, err = await asyncio.to_thread(onboarding.paste, redirected)
            assert code == 0, out + err
            assert "five minutes" in out

            await wait_until_ready(files.metrics, timeout=5)  # no restart
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{files.metrics}/readyz/app1") as response:
                    assert (response.status, await response.json()) == (
                        200,
                        {"status": "ready", "app": "app1"},
                    )
            status, body = await get_token(files)
            assert status == 200
            form = oauth_server.requests[0].form
            assert form["grant_type"] == "authorization_code"
            assert form["code_verifier"]
        finally:
            await broker.terminate_async()
        refresh_tokens = [g.current_refresh for g in oauth_server.grants.values()]
        assert refresh_tokens
        assert all(rt not in body.values() for rt in refresh_tokens)

    async def test_wrong_state_is_refused(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """A redirect whose state is not ours is refused and nothing is exchanged."""
        config = files_for(tmp_path, oauth_server, redis_server).write()
        onboarding = Onboarding(config)
        redirected = await consent(onboarding.authorize_url())
        tampered = redirected.replace("state=", "state=x")
        code, _, err = await asyncio.to_thread(onboarding.paste, tampered)
        assert code == 1
        assert "state does not match" in err
        assert oauth_server.count() == 0

    async def test_missing_state_is_refused(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """A redirect without state is refused."""
        config = files_for(tmp_path, oauth_server, redis_server).write()
        onboarding = Onboarding(config)
        onboarding.authorize_url()
        code, _, err = await asyncio.to_thread(onboarding.paste, f"{REDIRECT}?code=abc")
        assert code == 1
        assert "no state" in err

    async def test_reused_code_is_a_clear_error(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """A code used twice (or expired) gets an explanation, exit code 1."""
        config = files_for(tmp_path, oauth_server, redis_server).write()
        onboarding = Onboarding(config)
        redirected = await consent(onboarding.authorize_url())
        code_value = redirected.split("code=")[1].split("&")[0]
        assert (await asyncio.to_thread(onboarding.paste, redirected))[0] == 0
        again = await asyncio.to_thread(run_authorize, config, "--code", code_value)
        assert again.returncode == 1
        assert "expired" in again.stderr
        assert "already used" in again.stderr

    async def test_no_refresh_token_is_a_clear_error(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """A server that returns no refresh token is reported, and nothing is stored."""
        oauth_server.issue_refresh_tokens = False
        config = files_for(tmp_path, oauth_server, redis_server).write()
        onboarding = Onboarding(config)
        redirected = await consent(onboarding.authorize_url())
        code, _, err = await asyncio.to_thread(onboarding.paste, redirected)
        assert code == 1
        assert "no refresh token" in err
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        assert client.keys("tb-test:{app1*}:token") == []
        client.close()

    async def test_wrong_redirect_uri_is_a_clear_error(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """A code issued for another redirect URI is rejected with the reason named."""
        files = files_for(tmp_path, oauth_server, redis_server)
        config = files.write()
        onboarding = Onboarding(config)
        url = onboarding.authorize_url().replace("callback", "elsewhere")
        redirected = await consent(url)
        code, _, err = await asyncio.to_thread(onboarding.paste, redirected)
        assert code == 1
        assert "redirect_uri" in err


class TestRotation:
    @pytest.mark.parametrize("refresh_jwt", [False, True], ids=["opaque", "jwt"])
    async def test_five_replicas_rotate_without_reuse(
        self,
        tmp_path: Path,
        oauth_server: OAuthTestServer,
        redis_server: RedisServer,
        refresh_jwt: bool,
    ) -> None:
        """5 replicas over 8 lifetimes: rotation on every use, reuse never detected, never expired."""
        oauth_server.lifetime = 3.0
        oauth_server.refresh_jwt = refresh_jwt
        first = files_for(tmp_path / "seed", oauth_server, redis_server)
        await authorize_via_code(first.write(), oauth_server)
        fleet = Fleet(
            tmp_path / "fleet",
            oauth_server.token_url,
            redis_server.url,
            5,
            apps={"app1": ac_app(oauth_server)},
        )
        try:
            await fleet.start()
            stats = await fleet.poll(oauth_server, 24)
            logs = [line for r in fleet.replicas for line in r.process.log_lines()]
        finally:
            await fleet.stop_async()
        assert oauth_server.reuse_detected == 0, "a refresh token was spent twice"
        assert not any(g.revoked for g in oauth_server.grants.values())
        assert stats.expired == 0
        assert stats.unavailable == 0
        assert stats.other == [], "409 needs_authorization or another error was answered"
        assert oauth_server.count("refresh_token") >= 8
        assert not any(line["event"] == "app.needs_authorization" for line in logs)
        output = "".join(r.process.output() for r in fleet.replicas)
        for grant in oauth_server.grants.values():
            assert grant.current_refresh not in output
            for spent in grant.spent:
                assert spent not in output

    async def test_a_broker_started_after_the_access_token_expired_uses_the_grant(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """The stored access token has expired before the broker starts: it refreshes with the
        stored refresh token instead of asking for a new authorization (the load failure of
        test_five_replicas_rotate_without_reuse, made deterministic)."""
        oauth_server.lifetime = 2.0
        files = files_for(tmp_path, oauth_server, redis_server)
        config = files.write()
        await authorize_via_code(config, oauth_server)
        stored_refresh = next(iter(oauth_server.grants.values())).current_refresh
        await asyncio.sleep(3)  # the access token from the exchange is now expired
        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics, timeout=60)
            status, _ = await get_token(files)
        finally:
            await broker.terminate_async()
        assert status == 200
        presented = [r.form.get("refresh_token") for r in oauth_server.requests[1:]]
        assert presented[0] == stored_refresh
        assert not any(line["event"] == "app.needs_authorization" for line in broker.log_lines())

    async def test_a_response_without_a_new_refresh_token_keeps_the_old_one(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """A server that does not rotate: the one refresh token keeps working."""
        oauth_server.lifetime = 3.0
        oauth_server.rotate_refresh_tokens = False
        files = files_for(tmp_path, oauth_server, redis_server)
        config = files.write()
        await authorize_via_code(config, oauth_server)
        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            await asyncio.sleep(7)
            status, _ = await get_token(files)
        finally:
            await broker.terminate_async()
        assert status == 200
        presented = {
            r.form["refresh_token"] for r in oauth_server.requests if "refresh_token" in r.form
        }
        assert len(presented) == 1
        assert oauth_server.count("refresh_token") >= 2


class TestCrashAfterRotation:
    async def test_a_spend_lost_with_its_holder_is_announced_never_repeated(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """The holder dies after the server rotated: the old token is not presented again.

        What is lost: the rotated refresh token (it existed only in the dead process). Its spend
        record in Redis is marked sent, so the replica that takes the lease over does not
        present the old refresh token (a server with reuse detection would revoke the grant):
        it announces `grant.outcome_unknown` (audit, error level, metric), keeps serving the
        access token while it is valid, then answers 409 needs_authorization and stops calling
        the token endpoint.
        """
        # A lifetime that outlasts the dead holder's lease (about 12 s) by a few seconds, so the
        # takeover happens while the access token is still valid.
        oauth_server.lifetime = 24.0
        app = ac_app(oauth_server, at_fraction=0.25)
        seed = BrokerFiles(
            directory=tmp_path / "seed",
            token_url=oauth_server.token_url,
            store_url=redis_server.url,
            apps={"app1": app},
        )
        await authorize_via_code(seed.write(), oauth_server)
        fleet = Fleet(
            tmp_path / "fleet", oauth_server.token_url, redis_server.url, 3, apps={"app1": app}
        )
        poller = Poller(fleet, oauth_server)
        client = redis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            await fleet.start()
            poller.start()
            oauth_server.post_delays = [10.0]  # rotate, then hang before answering
            deadline = time.monotonic() + 20
            while oauth_server.count("refresh_token") == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert oauth_server.count("refresh_token") == 1, "no refresh was attempted"
            spent = oauth_server.requests[-1].form["refresh_token"]
            owner = client.get(bound_key(client, "lease"))
            assert owner is not None
            owner_text = owner.decode() if isinstance(owner, bytes) else str(owner)
            victim = int(owner_text.rsplit("-", 2)[1])
            os.kill(victim, signal.SIGKILL)
            killed_at = time.time()
            spend_state = client.hget(bound_key(client, "spend"), "state")
            alive = [i for i, r in enumerate(fleet.replicas) if r.process.pid != victim]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                statuses = [await get_token(fleet.replicas[i].files) for i in alive]
                if all(status == 409 for status, _ in statuses):
                    break
                await asyncio.sleep(0.2)
            calls_then = oauth_server.count()
            await asyncio.sleep(2)
            calls_later = oauth_server.count()
            stats = await poller.stop()
            readiness, metrics_texts = [], []
            async with aiohttp.ClientSession() as session:
                for i in alive:
                    metrics = fleet.replicas[i].files.metrics
                    async with session.get(f"{metrics}/readyz") as response:
                        readiness.append((response.status, await response.json()))
                    async with session.get(f"{metrics}/metrics") as response:
                        metrics_texts.append(await response.text())
            logs = {i: fleet.replicas[i].process.log_lines() for i in alive}
        finally:
            await poller.stop()
            client.close()
            await fleet.stop_async()
        assert spend_state == b"sent"
        assert all(s == 409 and b["error"] == "needs_authorization" for s, b in statuses)
        presented = [r.form.get("refresh_token") for r in oauth_server.requests]
        assert presented.count(spent) == 1, "the spent refresh token was presented again"
        assert oauth_server.count("refresh_token") == 1
        assert oauth_server.reuse_detected == 0
        assert not any(g.revoked for g in oauth_server.grants.values())
        assert stats.expired == 0
        for ready, metrics_text in zip(readiness, metrics_texts, strict=True):
            assert ready == (503, {"status": "not_ready", "apps": ["app1"]})
            assert 'token_broker_grant_outcome_unknown_total{app="app1"} 1.0' in metrics_text
            needs = 'token_broker_app_state{app="app1",state="needs_authorization"} 1.0'
            assert needs in metrics_text
        assert calls_later == calls_then, "the broker kept calling the token endpoint"
        announced = [
            line
            for i in alive
            for line in logs[i]
            if line["event"] == "grant.outcome_unknown" and line.get("audit")
        ]
        assert announced, "no replica announced grant.outcome_unknown"
        assert all(line["level"] == "error" for line in announced)
        # Announced while the access token was still valid, which was then served on.
        first = min(wall_time(line) for line in announced)
        assert first > killed_at
        assert any(status == 200 for i in alive for status in stats.of(i, since=first))


class TestServerErrorAfterRotating:
    """Issue 20, M4: a 5xx to a refresh-token request may follow a rotation."""

    async def test_a_500_after_rotating_is_unknown_and_never_respent(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """The server rotates, then answers 500: the broker audits grant.outcome_unknown and
        never presents the spent refresh token again (reuse detection would revoke the grant)."""
        oauth_server.lifetime = 3.0
        files = files_for(tmp_path, oauth_server, redis_server)
        config = files.write()
        await authorize_via_code(config, oauth_server)
        spent = next(iter(oauth_server.grants.values())).current_refresh
        oauth_server.fail_after_rotating = [500]
        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            # Not wait_ready: on a loaded machine the 3 s token may be refreshed (and the 500
            # make the grant unknown) before readiness is ever seen.
            await wait_until_answering(f"{files.metrics}/readyz/app1", timeout=30)
            deadline = time.monotonic() + 30
            while not any("refresh_token" in r.form for r in oauth_server.requests):
                assert time.monotonic() < deadline, "no refresh within 30 s"
                await asyncio.sleep(0.1)
            await asyncio.sleep(5)  # past the 3 s token's expiry
            status, body = await get_token(files)
        finally:
            await broker.terminate_async()
        presented = [r.form.get("refresh_token") for r in oauth_server.requests]
        assert presented.count(spent) == 1, "the spent refresh token was presented again"
        assert [r.status for r in oauth_server.requests if "refresh_token" in r.form] == [500]
        assert oauth_server.reuse_detected == 0
        assert (status, body["error"]) == (409, "needs_authorization")
        announced = [
            line
            for line in broker.log_lines()
            if line["event"] == "grant.outcome_unknown" and line.get("audit")
        ]
        assert announced, "grant.outcome_unknown was not audited"

    async def test_a_transactional_server_s_500_is_retried(
        self, tmp_path: Path, oauth_server: OAuthTestServer, redis_server: RedisServer
    ) -> None:
        """With refresh.server_transactional, a 500 means the server did not act: the same
        refresh token is sent again and the broker keeps serving."""
        oauth_server.lifetime = 3.0
        files = files_for(tmp_path, oauth_server, redis_server, server_transactional=True)
        config = files.write()
        await authorize_via_code(config, oauth_server)
        first = next(iter(oauth_server.grants.values())).current_refresh
        oauth_server.script = [Scripted(status=500)]
        broker = BrokerProcess(config, tmp_path / "broker.log")
        broker.start()
        try:
            await broker.wait_ready(files.metrics)
            await asyncio.sleep(8)
            status, _ = await get_token(files)
        finally:
            await broker.terminate_async()
        presented = [r.form.get("refresh_token") for r in oauth_server.requests]
        assert presented.count(first) == 2
        assert oauth_server.reuse_detected == 0
        assert status == 200
        assert not any(line["event"] == "grant.outcome_unknown" for line in broker.log_lines())
